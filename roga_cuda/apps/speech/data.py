"""Speech datasets: the built-in synthetic corpus, ASVspoof 2019 LA, ASVspoof 5 and In-the-Wild layouts.

Labels: 1 = bona fide (the positive class of the metrics, scored by the bona fide logit
margin), 0 = spoof. Every set yields fixed-length waveforms: the first ``n_samples``
samples, repeated from the start when shorter (the ASVspoof recipes' ``pad``).

Layouts
-------
ASVspoof 2019 LA (``data.source=asvspoof2019``, ``data.root=<LA folder>``)::

    <root>/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt   # "LA_0079 LA_T_1138215 - - bonafide"
    <root>/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.dev.trl.txt     # "LA_0069 LA_D_1047731 - A01 spoof"
    <root>/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.eval.trl.txt
    <root>/ASVspoof2019_LA_{train,dev,eval}/flac/<utterance>.flac
    <root>/ASVspoof2019_LA_asv_scores/ASVspoof2019.LA.asv.{dev,eval}.gi.trl.scores.txt   # optional: min t-DCF

ASVspoof 5 (``data.source=asvspoof5``, ``data.root=<folder>``; test sets ``dev`` and, when its
protocol is there, ``eval``; scored with the challenge's metrics, :mod:`.asvspoof5`)::

    <root>[/ASVspoof5_protocols]/ASVspoof5.train.tsv            # or ASVspoof5.train.metadata.txt (challenge phase)
    <root>[/ASVspoof5_protocols]/ASVspoof5.dev.track_1.tsv      # or ASVspoof5.dev.metadata.txt
    <root>[/ASVspoof5_protocols]/ASVspoof5.eval.track_1.tsv     # optional
        # "T_4850 T_0000000000 F - - - - A05 spoof -": SPEAKER FILE GENDER CODEC CODEC_Q CODEC_SEED
        # ATTACK_TAG ATTACK KEY - (the challenge-phase files: SPEAKER FILE GENDER CODEC ATTACK KEY)
    <root>/flac_T/<file>.flac, <root>/flac_D/<file>.flac, <root>/flac_E_eval/<file>.flac

In-the-Wild (``data.in_the_wild=<folder>``, an extra test set named ``itw``)::

    <folder>/meta.csv      # header "file,speaker,label"; label "bona-fide" or "spoof"
    <folder>/<file>        # e.g. 0.wav
"""
import csv
import os

import numpy as np
import torch

AUDIO_EXTS = (".flac", ".wav", ".ogg")


class AudioReadError(RuntimeError):
    """An audio file exists but cannot be decoded."""


def _text_lines(path):
    """The lines of a UTF-8 text file; any other encoding is an error naming the file."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


# ----------------------------------------------------------------------------- audio I/O

def read_audio(path):
    """(float32 mono waveform, sample rate) via soundfile, else torchaudio."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is not None:
        try:
            x, fs = sf.read(path, dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioReadError(f"cannot read audio file {path}: {e}") from e
        return x.mean(axis=1), int(fs)
    try:
        import torchaudio
    except ImportError:
        raise ImportError(f"reading {path} needs soundfile (pip install soundfile, or roga_cuda[audio]) "
                          "or torchaudio") from None
    try:
        x, fs = torchaudio.load(path)
    except Exception as e:
        raise AudioReadError(f"cannot read audio file {path}: {e}") from e
    return x.mean(0).numpy().astype(np.float32), int(fs)


def fix_length(x, n):
    """First n samples; shorter signals are repeated from the start (ASVspoof recipes' pad)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(n, dtype=np.float32)
    if len(x) >= n:
        return x[:n]
    return np.tile(x, n // len(x) + 1)[:n]


# -------------------------------------------------------------------------------- sets

class WaveSet:
    """Utterances with labels (1 bona fide / 0 spoof), attack ids ('-' for bona fide),
    utterance ids and speakers; ``load(indices)`` returns a float32 (B, n_samples) tensor.
    ``protocol`` names a challenge whose metrics and score files the set also gets
    ("asvspoof5"), ``codecs`` the per-utterance codec condition ('-': none) when known."""

    def __init__(self, name, utt_ids, labels, attacks, speakers=None, codecs=None, protocol=None):
        self.name = name
        self.utt_ids = list(utt_ids)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.attacks = list(attacks)
        self.speakers = list(speakers) if speakers is not None else ["-"] * len(self.utt_ids)
        self.codecs = list(codecs) if codecs is not None else None
        self.protocol = protocol
        if not (len(self.utt_ids) == len(self.labels) == len(self.attacks) == len(self.speakers)):
            raise ValueError(f"set {name!r}: ids, labels, attacks and speakers differ in length")
        if self.codecs is not None and len(self.codecs) != len(self.utt_ids):
            raise ValueError(f"set {name!r}: {len(self.codecs)} codecs for {len(self.utt_ids)} utterances")

    def __len__(self):
        return len(self.utt_ids)

    def load(self, indices):
        raise NotImplementedError

    def summary(self):
        n_bona = int(self.labels.sum())
        atk = sorted({a for a in self.attacks if a != "-"})
        return f"{self.name}: {len(self)} utterances ({n_bona} bona fide, {len(self) - n_bona} spoof; attacks {', '.join(atk) or '-'})"


class MemoryWaveSet(WaveSet):
    def __init__(self, name, waves, labels, attacks, utt_ids, speakers=None):
        super().__init__(name, utt_ids, labels, attacks, speakers)
        self.waves = waves
        if waves.shape[0] != len(self.utt_ids):
            raise ValueError(f"set {name!r}: {waves.shape[0]} waveforms for {len(self.utt_ids)} ids")

    def load(self, indices):
        return self.waves[torch.as_tensor(np.asarray(indices), dtype=torch.long)]


class FileWaveSet(WaveSet):
    """Audio files read on demand (in DataLoader workers when ``workers > 0``)."""

    def __init__(self, name, paths, labels, attacks, utt_ids, speakers=None, n_samples=64600, fs=16000, codecs=None,
                 protocol=None):
        super().__init__(name, utt_ids, labels, attacks, speakers, codecs, protocol)
        self.paths = list(paths)
        self.n_samples, self.fs = int(n_samples), int(fs)
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"set {name!r}: audio file not found: {missing[0]}{more}")

    def read(self, i):
        x, fs = read_audio(self.paths[i])
        if fs != self.fs:
            raise ValueError(f"{self.paths[i]}: sample rate {fs} Hz, expected {self.fs} Hz "
                             "(resample the corpus or set data.fs)")
        x = fix_length(x, self.n_samples)
        if not np.isfinite(x).all():  # one NaN sample would poison every gradient it touches
            bad = ~np.isfinite(x)
            raise ValueError(f"{self.paths[i]}: {int(bad.sum())} non-finite (NaN/inf) audio sample(s), the first "
                             f"at sample {int(np.flatnonzero(bad)[0])}; fix or drop the file")
        return torch.from_numpy(x)

    def load(self, indices):
        return torch.stack([self.read(int(i)) for i in indices])


class _ItemView(torch.utils.data.Dataset):
    def __init__(self, ws):
        self.ws = ws

    def __len__(self):
        return len(self.ws)

    def __getitem__(self, i):
        return self.ws.read(i)


def iterate_batches(ws, index_batches, workers=0):
    """Yield (indices, waves) for each list of indices, loading in parallel when
    ``ws`` reads files and ``workers > 0``."""
    index_batches = [list(map(int, b)) for b in index_batches]
    if workers > 0 and isinstance(ws, FileWaveSet):
        loader = torch.utils.data.DataLoader(_ItemView(ws), batch_sampler=index_batches, num_workers=workers)
        for b, x in zip(index_batches, loader):
            yield b, x
    else:
        for b in index_batches:
            yield b, ws.load(b)


# ----------------------------------------------------------------------------- ASVspoof

ASV19_PROTOCOLS = {"train": "ASVspoof2019.LA.cm.train.trn.txt", "dev": "ASVspoof2019.LA.cm.dev.trl.txt",
                   "eval": "ASVspoof2019.LA.cm.eval.trl.txt"}


def read_asvspoof_protocol(path):
    """[(speaker, utt_id, attack ('-' for bona fide), key)] from a CM protocol file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ASVspoof protocol file not found: {path}")
    rows = []
    for ln, line in enumerate(_text_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 or parts[4] not in ("bonafide", "spoof"):
            raise ValueError(f"{path}:{ln}: expected 'SPEAKER UTT_ID - ATTACK bonafide|spoof', got {line.strip()!r}")
        spk, utt, _, attack, key = parts
        rows.append((spk, utt, "-" if key == "bonafide" else attack, key))
    if not rows:
        raise ValueError(f"ASVspoof protocol file {path} is empty")
    return rows


def asvspoof2019_set(root, split, n_samples=64600, fs=16000, limit=None):
    """One ASVspoof 2019 LA split (train/dev/eval) as a FileWaveSet."""
    if split not in ASV19_PROTOCOLS:
        raise ValueError(f"ASVspoof 2019 LA split must be one of {sorted(ASV19_PROTOCOLS)}, got {split!r}")
    proto = os.path.join(root, "ASVspoof2019_LA_cm_protocols", ASV19_PROTOCOLS[split])
    rows = read_asvspoof_protocol(proto)
    if limit:
        rows = rows[:int(limit)]
    audio_dir = os.path.join(root, f"ASVspoof2019_LA_{split}", "flac")
    paths = [os.path.join(audio_dir, utt + ".flac") for _, utt, _, _ in rows]
    return FileWaveSet(split, paths, [1 if r[3] == "bonafide" else 0 for r in rows], [r[2] for r in rows],
                       [r[1] for r in rows], [r[0] for r in rows], n_samples, fs)


def asvspoof2019_asv_scores(root, split):
    """Path of the organisers' ASV score file for ``split`` in the standard layout, or None."""
    p = os.path.join(root, "ASVspoof2019_LA_asv_scores", f"ASVspoof2019.LA.asv.{split}.gi.trl.scores.txt")
    return p if os.path.isfile(p) else None


ASV5_PROTOCOLS = {"train": ("ASVspoof5.train.tsv", "ASVspoof5.train.metadata.txt"),
                  "dev": ("ASVspoof5.dev.track_1.tsv", "ASVspoof5.dev.metadata.txt"),
                  "eval": ("ASVspoof5.eval.track_1.tsv",)}
ASV5_AUDIO = {"train": ("flac_T",), "dev": ("flac_D",), "eval": ("flac_E_eval", "flac_E")}


def asvspoof5_protocol(root, split):
    """Path of the ASVspoof 5 ``split`` protocol under ``root`` or ``root/ASVspoof5_protocols``, or None."""
    if split not in ASV5_PROTOCOLS:
        raise ValueError(f"ASVspoof 5 split must be one of {sorted(ASV5_PROTOCOLS)}, got {split!r}")
    for d in (root, os.path.join(root, "ASVspoof5_protocols")):
        for name in ASV5_PROTOCOLS[split]:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def asvspoof5_set(root, split, n_samples=64600, fs=16000, limit=None):
    """One ASVspoof 5 split (train/dev/eval) as a FileWaveSet scored with the challenge's metrics."""
    from .asvspoof5 import read_track1_protocol
    proto = asvspoof5_protocol(root, split)
    if proto is None:
        raise FileNotFoundError(f"ASVspoof 5 {split} protocol not found under {root} or "
                                f"{os.path.join(root, 'ASVspoof5_protocols')} "
                                f"(looked for {', '.join(ASV5_PROTOCOLS[split])})")
    rows = read_track1_protocol(proto)
    if limit:
        rows = rows[:int(limit)]
    dirs = [os.path.join(root, d) for d in ASV5_AUDIO[split]]
    audio_dir = next((d for d in dirs if os.path.isdir(d)), dirs[0])
    return FileWaveSet(split, [os.path.join(audio_dir, r.file + ".flac") for r in rows],
                       [1 if r.key == "bonafide" else 0 for r in rows], [r.attack for r in rows],
                       [r.file for r in rows], [r.speaker for r in rows], n_samples, fs,
                       codecs=[r.codec for r in rows], protocol="asvspoof5")


def in_the_wild_set(folder, n_samples=64600, fs=16000, name="itw", limit=None):
    """An In-the-Wild style folder: meta.csv (file, speaker, label) + audio files."""
    meta = os.path.join(folder, "meta.csv")
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"In-the-Wild metadata not found: {meta}")
    reader = csv.DictReader(_text_lines(meta))
    need = {"file", "label"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise ValueError(f"{meta}: needs columns file,label (and optionally speaker); got {reader.fieldnames}")
    rows = list(reader)
    if limit:
        rows = rows[:int(limit)]
    labels, paths, ids, spk = [], [], [], []
    for ln, r in enumerate(rows, 2):
        lab = r["label"].strip().lower().replace("_", "-")
        if lab in ("bona-fide", "bonafide", "bona fide", "real"):
            labels.append(1)
        elif lab in ("spoof", "fake"):
            labels.append(0)
        else:
            raise ValueError(f"{meta}:{ln}: label must be 'bona-fide' or 'spoof', got {r['label']!r}")
        paths.append(os.path.join(folder, r["file"]))
        ids.append(os.path.splitext(r["file"])[0])
        spk.append(r.get("speaker") or "-")
    if not rows:
        raise ValueError(f"{meta} lists no files")
    attacks = ["-" if y == 1 else "spoof" for y in labels]
    return FileWaveSet(name, paths, labels, attacks, ids, spk, n_samples, fs)


# ----------------------------------------------------------------------------- builder

class SpeechData:
    """train, dev and the test sets (name -> WaveSet), plus optional ASV score files per set."""

    def __init__(self, train, dev, tests, asv_scores=None, fs=16000, description=""):
        self.train, self.dev, self.tests = train, dev, dict(tests)
        self.asv_scores = dict(asv_scores or {})
        self.fs = fs
        self.description = description

    def summary(self):
        lines = [self.description] if self.description else []
        sets = [self.train, self.dev] + [v for v in self.tests.values() if v is not self.dev]
        lines += ["  " + s.summary() for s in sets]
        return "\n".join(lines)


def _scaled_splits(scale, splits=None):
    from .synth import DEFAULT_SPLITS
    out = {}
    for name, spec in (splits or DEFAULT_SPLITS).items():
        s = dict(spec)
        s["bonafide"] = max(2, int(round(spec["bonafide"] * scale)))
        s["per_attack"] = max(1, int(round(spec["per_attack"] * scale)))
        s["speakers"] = max(1, min(spec["speakers"], s["bonafide"]))
        out[name] = s
    return out


def build_data(cfg_data, log=print, progress=None):
    """The data a run needs, from the ``data`` section of the config."""
    src = cfg_data["source"]
    n, fs = int(cfg_data["n_samples"]), int(cfg_data["fs"])
    if src == "synthetic":
        from .synth import FS, load_corpus
        if fs != FS:
            raise ValueError(f"the synthetic corpus is generated at {FS} Hz; set data.fs={FS}")
        syn = cfg_data["synthetic"]
        splits = _scaled_splits(float(syn["scale"]))
        corpus = load_corpus(int(syn["seed"]), n, splits, cache_dir=syn["cache_dir"], progress=progress, log=log)
        sets = {k: MemoryWaveSet(k, v["waves"], v["labels"], v["attacks"], v["utt_ids"], v["speakers"])
                for k, v in corpus.items()}
        tests = {k: v for k, v in sets.items() if k not in ("train",)}
        data = SpeechData(sets["train"], sets["dev"], tests, fs=fs,
                          description=f"synthetic SynthSpoof corpus (seed {syn['seed']}, scale {syn['scale']}, "
                                      f"{n / fs:.2f} s clips)")
    elif src == "asvspoof2019":
        root = cfg_data["root"]
        if not root:
            raise ValueError("data.source=asvspoof2019 needs data.root=<folder with ASVspoof2019_LA_* subfolders>")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.root not found: {root}")
        lim = cfg_data["limit"]
        train = asvspoof2019_set(root, "train", n, fs, lim)
        dev = asvspoof2019_set(root, "dev", n, fs, lim)
        tests = {"dev": dev, "eval": asvspoof2019_set(root, "eval", n, fs, lim)}
        asv = {s: asvspoof2019_asv_scores(root, s) for s in ("dev", "eval")}
        data = SpeechData(train, dev, tests, {k: v for k, v in asv.items() if v}, fs, f"ASVspoof 2019 LA at {root}")
    elif src == "asvspoof5":
        root = cfg_data["root"]
        if not root:
            raise ValueError("data.source=asvspoof5 needs data.root=<folder with the ASVspoof 5 protocols and flac_* "
                             "folders>")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.root not found: {root}")
        lim = cfg_data["limit"]
        train = asvspoof5_set(root, "train", n, fs, lim)
        dev = asvspoof5_set(root, "dev", n, fs, lim)
        tests = {"dev": dev}
        if asvspoof5_protocol(root, "eval"):
            tests["eval"] = asvspoof5_set(root, "eval", n, fs, lim)
        data = SpeechData(train, dev, tests, fs=fs, description=f"ASVspoof 5 at {root}")
    else:
        raise ValueError(f"unknown data.source {src!r}; use synthetic, asvspoof2019 or asvspoof5")
    if cfg_data["in_the_wild"]:
        data.tests["itw"] = in_the_wild_set(cfg_data["in_the_wild"], n, fs, name="itw", limit=cfg_data["limit"])
    if cfg_data["asv_scores"]:
        if not os.path.isfile(cfg_data["asv_scores"]):
            raise FileNotFoundError(f"data.asv_scores not found: {cfg_data['asv_scores']}")
        main = "eval" if "eval" in data.tests else next(iter(data.tests))
        data.asv_scores[main] = cfg_data["asv_scores"]
    return data
