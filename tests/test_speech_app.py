"""Speech app (DPDA + PCGrad): metrics vs brute force, min t-DCF by hand, loaders on fixtures,
the synthetic corpus, models, and tiny end-to-end runs of dpda-train / dpda-eval."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from roga_cuda.apps.common import load_config
from roga_cuda.apps.speech import data as sdata
from roga_cuda.apps.speech import scoring, synth
from roga_cuda.apps.speech.cli import eval_main, train_main
from roga_cuda.apps.speech.models import AASIST, RawNet2, SSLFrontEnd, build_model

from util import tiny_ssl_checkpoint

CL = torch.channels_last

try:
    import soundfile as sf
except ImportError:  # only the loader tests need it
    sf = None
needs_soundfile = pytest.mark.skipif(sf is None, reason="soundfile is not installed")


# ------------------------------------------------------------------------------- EER

def brute_eer(bona, spoof):
    """Every threshold t (accept when score >= t), from 'accept all' to 'reject all'; the EER
    is where FRR - FAR changes sign, linearly interpolated between neighbouring points."""
    ts = sorted(set(bona) | set(spoof)) + [math.inf]
    pts = [(sum(b < t for b in bona) / len(bona), sum(s >= t for s in spoof) / len(spoof)) for t in ts]
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        d0, d1 = r0 - a0, r1 - a1
        if d0 == 0:
            return a0
        if d0 < 0 < d1 or d1 == 0:
            f = -d0 / (d1 - d0)
            return a0 + f * (a1 - a0)
    raise AssertionError("no crossing")


def test_eer_matches_brute_force():
    rs = np.random.RandomState(0)
    for n_b, n_s, ties in [(5, 7, False), (30, 50, True), (100, 40, False), (3, 3, True)]:
        for _ in range(5):
            b = rs.randn(n_b) + 1.0
            s = rs.randn(n_s)
            if ties:
                b, s = np.round(b, 0), np.round(s, 0)
            e, _ = scoring.eer_bona_spoof(b, s)
            assert e == pytest.approx(brute_eer(b.tolist(), s.tolist()), abs=1e-12)
    assert scoring.eer_bona_spoof([2, 3], [0, 1])[0] == 0.0
    assert scoring.eer_bona_spoof([0, 1], [2, 3])[0] == 1.0


def test_per_attack_eer_matches_brute_force():
    rs = np.random.RandomState(1)
    labels = np.r_[np.ones(40), np.zeros(90)].astype(int)
    attacks = np.array(["-"] * 40 + ["A01"] * 30 + ["A02"] * 30 + ["A07"] * 30)
    scores = rs.randn(130) + labels * 1.5 - (attacks == "A07") * 1.0
    per = scoring.per_attack_eer(labels, scores, attacks)
    assert sorted(per) == ["A01", "A02", "A07"]
    for a, e in per.items():
        assert e == pytest.approx(brute_eer(scores[labels == 1].tolist(), scores[attacks == a].tolist()), abs=1e-12)


# ------------------------------------------------------------------------------ t-DCF

def test_min_tdcf_hand_computed_legacy():
    """Pfa_asv = Pmiss_asv = 0.1, Pmiss_spoof_asv = 0.5 with the 2019 cost model:
    C1 = 0.9405 (1 - 0.1) - 0.0095 * 10 * 0.1 = 0.83695, C2 = 10 * 0.05 * 0.5 = 0.25.
    CM bona fide [1, 3], spoof [0, 2]: operating points (Pmiss, Pfa) = (0, 1), (0, .5),
    (.5, .5), (.5, 0), (1, 0) -> t-DCF (C1 Pmiss + C2 Pfa) / C2 = 1, 0.5, 2.1739, 1.6739, 3.3478."""
    curve, thr = scoring.tdcf_curve([1.0, 3.0], [0.0, 2.0], 0.1, 0.1, 0.5)
    c1, c2 = 0.9405 * 0.9 - 0.0095, 0.25
    expect = [c2 / c2, 0.5 * c2 / c2, (0.5 * c1 + 0.5 * c2) / c2, 0.5 * c1 / c2, c1 / c2]
    np.testing.assert_allclose(curve, expect, rtol=1e-12)
    assert curve.min() == pytest.approx(0.5) and thr[np.argmin(curve)] == 1.0


def test_min_tdcf_hand_computed_revised():
    """Revised: C0 = Ptar Cmiss Pmiss_asv + Pnon Cfa Pfa_asv = 0.09405 + 0.0095 = 0.10355,
    C1 = 0.9405 - C0 = 0.83695, C2 = 0.05 * 10 * (1 - 0.5) = 0.25; norm = C0 + min(C1, C2)."""
    curve, _ = scoring.tdcf_curve([1.0, 3.0], [0.0, 2.0], 0.1, 0.1, 0.5, formulation="revised")
    c0, c1, c2 = 0.10355, 0.83695, 0.25
    np.testing.assert_allclose(curve.min(), (c0 + 0.5 * c2) / (c0 + c2), rtol=1e-12)


def test_min_tdcf_from_asv_scores(tmp_path):
    """ASV targets [3, 4, 6], non-targets [0, 1, 5], spoofs [2, 4.5, 7]. Sorted trials
    0n 1n 3t 4t 5n 6t with candidate thresholds [-0.001, 0, 1, 3, 4, 5, 6]:
    Pmiss = 0, 0, 0, 1/3, 2/3, 2/3, 1 and Pfa = 1, 2/3, 1/3, 1/3, 1/3, 0, 0, so |Pmiss - Pfa|
    is 0 at index 3, threshold 3, EER 1/3. As the ASVspoof 2019 evaluation package then does:
    Pfa_asv = P(non >= 3) = 1/3, Pmiss_asv = P(tar < 3) = 0 (the target AT the threshold counts
    as accepted), Pmiss_spoof_asv = P(spoof < 3) = 1/3. C1 = 0.9405 - 0.0095 * 10 / 3,
    C2 = 10 * 0.05 * (2/3); CM points as in the test above: min = 0.5 C2 / C2 = 0.5."""
    asv = tmp_path / "asv.txt"
    lines = [f"LA_0001 LA_E_{i} bonafide target {s}" for i, s in enumerate([3, 4, 6])]
    lines += [f"LA_0002 LA_E_{10 + i} bonafide nontarget {s}" for i, s in enumerate([0, 1, 5])]
    lines += [f"LA_0003 LA_E_{20 + i} A07 spoof {s}" for i, s in enumerate([2, 4.5, 7])]
    asv.write_text("\n".join(lines) + "\n")
    tar, non, spf = scoring.read_asv_scores(str(asv))
    assert scoring.asv_eer_threshold(tar, non) == (pytest.approx(1 / 3), 3.0)
    r = scoring.min_tdcf([1.0, 3.0], [0.0, 2.0], tar, non, spf)
    assert r["asv_eer"] == pytest.approx(1 / 3) and r["pfa_asv"] == pytest.approx(1 / 3)
    assert r["pmiss_asv"] == 0 and r["pmiss_spoof_asv"] == pytest.approx(1 / 3)
    c1, c2 = 0.9405 - 0.0095 * 10 / 3, 0.5 * (2 / 3)
    assert c2 < c1 and r["min_tdcf"] == pytest.approx(0.5 * c2 / c2)
    curve, _ = scoring.tdcf_curve([1.0, 3.0], [0.0, 2.0], 1 / 3, 0.0, 1 / 3)
    np.testing.assert_allclose(curve, [1, 0.5, (0.5 * c1 + 0.5 * c2) / c2, 0.5 * c1 / c2, c1 / c2], rtol=1e-12)
    # the 3-column format, and a malformed line
    (tmp_path / "asv3.txt").write_text("bonafide target 1.0\nbonafide nontarget 0.0\nA07 spoof 0.5\n")
    assert [len(a) for a in scoring.read_asv_scores(str(tmp_path / "asv3.txt"))] == [1, 1, 1]
    (tmp_path / "bad.txt").write_text("LA_0001 LA_E_1 bonafide 1.0\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        scoring.read_asv_scores(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError):
        scoring.read_asv_scores(str(tmp_path / "missing.txt"))


def test_score_file_round_trip(tmp_path):
    p = scoring.write_score_file(str(tmp_path / "s.txt"), ["u1", "u2"], ["-", "A03"], [1, 0], [0.25, -1.5])
    assert open(p).read() == "u1 - bonafide 0.250000\nu2 A03 spoof -1.500000\n"
    ids, atk, lab, sc = scoring.read_score_file(p)
    assert ids == ["u1", "u2"] and atk == ["-", "A03"] and lab.tolist() == [1, 0] and sc.tolist() == [0.25, -1.5]


# ---------------------------------------------------------------------------- loaders

def _write_asvspoof(root, n_samples_list, fs=16000, asv=True):
    proto_dir = root / "ASVspoof2019_LA_cm_protocols"
    proto_dir.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for split, code, name in [("train", "T", "train.trn"), ("dev", "D", "dev.trl"), ("eval", "E", "eval.trl")]:
        (root / f"ASVspoof2019_LA_{split}" / "flac").mkdir(parents=True)
        lines = []
        for i, n in enumerate(n_samples_list):
            utt = f"LA_{code}_{1000 + i}"
            bona = i % 2 == 0
            attack = "-" if bona else ("A01" if split != "eval" else "A17")
            lines.append(f"LA_00{i % 3} {utt} - {attack} {'bonafide' if bona else 'spoof'}")
            sf.write(str(root / f"ASVspoof2019_LA_{split}" / "flac" / f"{utt}.flac"),
                     (0.1 * rs.randn(n)).astype(np.float32), fs)
        (proto_dir / f"ASVspoof2019.LA.cm.{name}.txt").write_text("\n".join(lines) + "\n")
    if asv:
        d = root / "ASVspoof2019_LA_asv_scores"
        d.mkdir()
        (d / "ASVspoof2019.LA.asv.eval.gi.trl.scores.txt").write_text(
            "LA_0001 LA_E_1 bonafide target 2.0\nLA_0001 LA_E_2 bonafide nontarget -1.0\nLA_0001 LA_E_3 A17 spoof 0.5\n")


@needs_soundfile
def test_asvspoof2019_loader(tmp_path):
    root = tmp_path / "LA"
    _write_asvspoof(root, [3000, 800, 5000, 2000])
    ws = sdata.asvspoof2019_set(str(root), "train", n_samples=2000)
    assert ws.utt_ids == ["LA_T_1000", "LA_T_1001", "LA_T_1002", "LA_T_1003"]
    assert ws.labels.tolist() == [1, 0, 1, 0] and ws.attacks == ["-", "A01", "-", "A01"]
    x = ws.load([0, 1, 2])
    assert x.shape == (3, 2000) and x.dtype == torch.float32
    raw, fs = sdata.read_audio(ws.paths[1])  # 800 samples: repeated from the start
    np.testing.assert_allclose(x[1, :800].numpy(), raw, atol=1e-6)
    np.testing.assert_allclose(x[1, 800:1600].numpy(), raw, atol=1e-6)
    raw0, _ = sdata.read_audio(ws.paths[0])  # longer: the first n samples
    np.testing.assert_allclose(x[0].numpy(), raw0[:2000], atol=1e-6)
    # parallel loading gives the same batches
    got = [b for _, b in sdata.iterate_batches(ws, [[0, 1], [2, 3]], workers=2)]
    torch.testing.assert_close(torch.cat(got), ws.load([0, 1, 2, 3]))
    cfg = load_config("smoke", overrides=["data.source=asvspoof2019", f"data.root={root}", "data.n_samples=2000"],
                      app="speech")
    d = sdata.build_data(cfg.data, log=lambda *a: None)
    assert set(d.tests) == {"dev", "eval"} and d.asv_scores["eval"].endswith("eval.gi.trl.scores.txt")
    assert d.tests["eval"].attacks[1] == "A17"


@needs_soundfile
def test_loader_errors_name_the_file(tmp_path):
    root = tmp_path / "LA"
    _write_asvspoof(root, [1000, 1000], asv=False)
    victim = root / "ASVspoof2019_LA_dev" / "flac" / "LA_D_1001.flac"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="LA_D_1001.flac"):
        sdata.asvspoof2019_set(str(root), "dev")
    with pytest.raises(FileNotFoundError, match="ASVspoof2019.LA.cm.train.trn.txt"):
        sdata.asvspoof2019_set(str(tmp_path / "nowhere"), "train")
    bad = root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.eval.trl.txt"
    bad.write_text("LA_0001 LA_E_1000 - - maybe\n")
    with pytest.raises(ValueError, match="eval.trl.txt:1"):
        sdata.asvspoof2019_set(str(root), "eval")
    ws = sdata.asvspoof2019_set(str(root), "train", fs=8000)
    with pytest.raises(ValueError, match="16000 Hz, expected 8000"):
        ws.load([0])
    with pytest.raises(FileNotFoundError, match="missing.flac"):
        sdata.read_audio(str(tmp_path / "missing.flac"))


def test_non_utf8_protocol_names_the_file(tmp_path):
    proto = tmp_path / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.train.trn.txt"
    proto.parent.mkdir()
    proto.write_bytes("LA_0079 LA_T_1138215 - - bonafide  # Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"ASVspoof2019\.LA\.cm\.train\.trn\.txt is not UTF-8 text"):
        sdata.asvspoof2019_set(str(tmp_path), "train")
    itw = tmp_path / "itw"
    itw.mkdir()
    (itw / "meta.csv").write_bytes("file,speaker,label\n0.wav,Bj\u00f6rk,spoof\n".encode("latin-1"))
    with pytest.raises(ValueError, match="meta.csv is not UTF-8"):
        sdata.in_the_wild_set(str(itw))


@needs_soundfile
def test_nan_audio_is_caught_when_loaded(tmp_path):
    folder = tmp_path / "itw"
    folder.mkdir()
    good = (0.1 * np.random.RandomState(0).randn(1500)).astype(np.float32)
    bad = good.copy()
    bad[700] = np.nan
    sf.write(str(folder / "0.wav"), good, 16000, subtype="FLOAT")
    sf.write(str(folder / "1.wav"), bad, 16000, subtype="FLOAT")
    (folder / "meta.csv").write_text("file,speaker,label\n0.wav,a,spoof\n1.wav,b,bona-fide\n")
    ws = sdata.in_the_wild_set(str(folder), n_samples=1000)
    assert torch.isfinite(ws.load([0])).all()
    with pytest.raises(ValueError, match=r"1\.wav: 1 non-finite.*at sample 700"):
        ws.load([0, 1])
    with pytest.raises(ValueError, match=r"1\.wav"):  # from a DataLoader worker too
        list(sdata.iterate_batches(ws, [[0], [1]], workers=1))
    # past the crop length the NaN is never used: not an error
    assert torch.isfinite(sdata.in_the_wild_set(str(folder), n_samples=500).load([1])).all()


@needs_soundfile
def test_in_the_wild_loader(tmp_path):
    folder = tmp_path / "itw"
    folder.mkdir()
    rs = np.random.RandomState(1)
    rows = [("0.wav", "Alec Guinness", "spoof"), ("1.wav", "Alec Guinness", "bona-fide"), ("2.wav", "Ayn Rand", "spoof")]
    for f, _, _ in rows:
        sf.write(str(folder / f), (0.1 * rs.randn(1500)).astype(np.float32), 16000)
    with open(folder / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "speaker", "label"])
        w.writerows(rows)
    ws = sdata.in_the_wild_set(str(folder), n_samples=1000)
    assert ws.labels.tolist() == [0, 1, 0] and ws.attacks == ["spoof", "-", "spoof"]
    assert ws.speakers[2] == "Ayn Rand" and ws.load([1]).shape == (1, 1000)
    (folder / "2.wav").unlink()
    with pytest.raises(FileNotFoundError, match="2.wav"):
        sdata.in_the_wild_set(str(folder))
    with open(folder / "meta.csv", "w", newline="") as fh:
        fh.write("file,speaker,label\n0.wav,x,fake-ish\n")
    with pytest.raises(ValueError, match="meta.csv:2"):
        sdata.in_the_wild_set(str(folder))


# -------------------------------------------------------------------------- synthetic

def test_synthetic_corpus_in_worker_processes_equals_one_process():
    """Large splits are generated on every core: the same waveforms bit for bit, in order
    (chunks of 16 utterances, the last one short), with the progress bar fed per chunk."""
    spec = {"bonafide": 20, "per_attack": 8, "attacks": ["A01", "A02"], "speakers": 3, "channel": "studio"}
    one = synth.generate_split(3, "dev", spec, 800, workers=0)
    seen = []

    def progress(it, desc):
        for x in it:
            seen.append(desc)
            yield x
    two = synth.generate_split(3, "dev", spec, 800, workers=2, progress=progress)
    assert one["waves"].shape == (36, 800) and torch.equal(one["waves"], two["waves"])
    assert seen == ["synth dev"] * 3
    # several splits share one pool (its processes start once), each split as generated alone
    seen.clear()
    spec_e = dict(spec, attacks=["A05"], channel="wild")
    both = synth.generate_splits(3, {"dev": spec, "eval": spec_e}, 800, workers=2, progress=progress)
    alone = synth.generate_split(3, "eval", spec_e, 800, workers=0)
    assert torch.equal(both["dev"]["waves"], one["waves"]) and torch.equal(both["eval"]["waves"], alone["waves"])
    assert both["eval"]["utt_ids"] == alone["utt_ids"] and both["dev"]["attacks"] == one["attacks"]
    assert seen == ["synth dev"] * 3 + ["synth eval"] * 2
    assert synth._worker_count(10) == 0 and synth._worker_count(1000) in (0, os.cpu_count())


def test_synthetic_corpus_is_deterministic_and_laid_out():
    spec = {"bonafide": 3, "per_attack": 2, "attacks": ["A01", "A05"], "speakers": 2, "channel": "studio"}
    a = synth.generate_split(7, "eval", spec, 1600)
    b = synth.generate_split(7, "eval", spec, 1600)
    assert torch.equal(a["waves"], b["waves"])
    assert a["labels"].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert a["attacks"] == ["-", "-", "-", "A01", "A01", "A05", "A05"]
    assert a["utt_ids"][0] == "SYN_E_00000" and a["speakers"][:3] == ["SPK_E_000", "SPK_E_001", "SPK_E_000"]
    # one utterance alone equals its row: independent of generation order
    one = synth.generate_utterance(7, "eval", 5, "A05", 0, 1600, "studio")  # 1st of the A05 block: speaker 0
    np.testing.assert_array_equal(one, a["waves"][5].numpy())
    assert not torch.equal(a["waves"], synth.generate_split(8, "eval", spec, 1600)["waves"])
    w = a["waves"]
    assert torch.isfinite(w).all() and w.abs().max() < 1
    rms_db = 20 * torch.log10(w.pow(2).mean(1).sqrt())
    assert rms_db.min() > -27 and rms_db.max() < -17  # the channel's level range
    assert set(synth.DEFAULT_SPLITS["train"]["attacks"]).isdisjoint(synth.UNSEEN_ATTACKS)
    assert set(synth.UNSEEN_ATTACKS) <= set(synth.DEFAULT_SPLITS["eval"]["attacks"])


def test_every_synthetic_system_and_channel_renders():
    for system in ["bonafide"] + list(synth.ATTACKS):
        for ch in ("studio", "wild"):
            x = synth.generate_utterance(1, "t", 0, system, 0, 4000, ch)
            assert x.shape == (4000,) and np.isfinite(x).all() and np.abs(x).max() > 0
    with pytest.raises(ValueError, match="unknown synthetic system"):
        synth.generate_utterance(1, "t", 0, "A99", 0, 4000, "studio")


def test_band_limited_attack_has_no_energy_above_its_cutoff():
    """A03's defining artefact, before the channel: the band above 2 x cut-off is empty."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8000)
    y = synth.band_limit_with_images(rng, x, 3000.0, -25.0)
    spec = np.abs(np.fft.rfft(y)) ** 2
    f = np.fft.rfftfreq(8000, 1 / 16000)
    assert spec[f > 6100].sum() < 1e-12 * spec.sum()
    img = spec[(f > 3300) & (f < 5700)].mean() / spec[(f > 300) & (f < 2700)].mean()
    assert 10 * np.log10(img) == pytest.approx(-25, abs=0.5)  # the mirrored band, 25 dB down


# ------------------------------------------------------------------------------ models

def test_models_forward_shapes():
    x = 0.1 * torch.randn(3, 4000)
    m = AASIST(sinc_channels=8, sinc_kernel=32, filts=(4, 8), gat_dims=(8, 8), branches=2, front_log=True)
    assert m(x).shape == (3, 2)
    r = RawNet2(sinc_channels=8, sinc_kernel=32, filts=(8, 8), gru_hidden=8, gru_layers=1, fc_dim=8)
    assert r(x).shape == (3, 2)
    with pytest.raises(ValueError, match="no option"):
        build_model("aasist", nope=1)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("lcnn")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.save/load: deprecated, still supported
def test_ssl_front_end_local_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        SSLFrontEnd(str(tmp_path / "xlsr.pt"))
    with pytest.raises(ValueError, match="local checkpoint"):
        SSLFrontEnd(None)
    path = tiny_ssl_checkpoint(tmp_path, stride=160)  # like a wav2vec 2.0 encoder
    m = AASIST(filts=(4, 8), gat_dims=(8, 8), branches=1, ssl_checkpoint=path, ssl_dim=16)
    out = m(0.1 * torch.randn(2, 8000))
    assert out.shape == (2, 2)
    out.sum().backward()
    assert m.ssl.model.conv.weight.grad is not None  # fine-tuned unless ssl_freeze


# -------------------------------------------------------------------------- end to end

TINY = ["data.n_samples=2000", "data.synthetic.scale=0.05", "train.epochs=2", "train.batch_size=8",
        "eval.batch_size=32", "runtime.progress=false", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synth_cache"))


@pytest.mark.parametrize("mode,extra", [
    ("baseline", ["train.probe_conflict_every=2"]),
    ("dpda", ["optim.align=pcgrad"]),
    ("dpda", ["optim.align=sum", "train.forward=separate", "model.name=rawnet2"]),
])
def test_end_to_end(tmp_path, cache_dir, mode, extra):
    out = tmp_path / "run"
    rc = train_main(["--preset", "smoke", "--out", str(out), "--method", mode,
                     f"data.synthetic.cache_dir={cache_dir}"] + TINY + extra)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == mode and 0 <= m["eer"] <= 1
    assert 0 <= m["conflict_rate"] <= 1 and len(m["conflict_rate_by_epoch"]) == 2
    assert set(m["per_attack_eer"]) == set(synth.ATTACKS)            # main set = eval: seen + unseen
    assert set(m["sets"]) == {"dev", "eval", "wild"} and "min_tdcf" not in m
    assert m["epochs_to_best"] in (1, 2) and m["epochs_run"] == 2
    for f in ("scores/eval.txt", "scores/wild.txt", "det.png", "roc.png", "conflict_rate.png", "training_curves.png",
              "steps.csv", "epochs.csv", "config.yaml", "model_avg.pt"):
        assert (out / f).is_file(), f
    ids, atk, lab, sc = scoring.read_score_file(str(out / "scores" / "eval.txt"))
    assert scoring.eer_bona_spoof(sc[lab == 1], sc[lab == 0])[0] == pytest.approx(m["eer"])
    steps = list(csv.DictReader(open(out / "steps.csv")))
    if mode == "dpda":  # every step logs the cosine and the conflict flag
        assert len(steps) == m["steps"] and {"cos", "conflict", "conflict_rate", "loss_clean", "loss_aug"} <= set(steps[0])
        flags = [int(r["conflict"]) for r in steps]
        assert all((float(r["cos"]) < 0) == bool(int(r["conflict"])) for r in steps)
        assert m["conflict_rate"] == pytest.approx(sum(flags) / len(flags))
    # dpda-eval rescoring the averaged model reproduces the scores
    ev = tmp_path / "eval"
    assert eval_main([str(out / "model_avg.pt"), "--out", str(ev)]) == 0
    e = json.loads((ev / "metrics.json").read_text())
    assert e["eer"] == pytest.approx(m["eer"], abs=1e-6)
    # score-file mode
    assert eval_main(["--scores", str(out / "scores" / "eval.txt"), "--out", str(tmp_path / "sc")]) == 0
    assert json.loads((tmp_path / "sc" / "metrics.json").read_text())["eer"] == pytest.approx(m["eer"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_resume_continues_exactly(tmp_path, cache_dir, monkeypatch, channels_last):
    """A run that crashes mid-epoch, is moved to another folder and resumed from its last
    checkpoint ends with the same weights, conflict statistics and scores as an
    uninterrupted run (in either weight layout)."""
    from roga_cuda.apps.speech import train as strain
    args = ["--preset", "smoke", "--method", "dpda", f"data.synthetic.cache_dir={cache_dir}",
            "train.checkpoint_every=3", "train.average_best=1", "runtime.device=cpu",  # CPU: bit-exact
            f"runtime.channels_last={channels_last}"] + TINY
    assert train_main(args + ["--out", str(tmp_path / "full")]) == 0
    original = strain.SpeechTrainer.train_step
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint and one more step
            raise KeyboardInterrupt("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(strain.SpeechTrainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(strain.SpeechTrainer, "train_step", original)
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step_00000003.pt"]
    # the run folder is moved (another disk, another machine) before it is resumed: the kept
    # best epochs are found under the new folder
    import shutil
    shutil.move(str(tmp_path / "cut"), str(tmp_path / "moved"))
    assert train_main(args + ["--out", str(tmp_path / "moved"), "--resume"]) == 0
    a = torch.load(tmp_path / "full" / "model_avg.pt", weights_only=True)["model"]
    moved = torch.load(tmp_path / "moved" / "model_avg.pt", weights_only=True)
    assert moved["averaged"] == [os.path.join("best", f"epoch_{e:04d}.pt") for e in
                                 json.loads((tmp_path / "moved" / "metrics.json").read_text())["averaged_epochs"]]
    b = moved["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    convs = [v for v in a.values() if v.dim() == 4 and v.is_contiguous() != v.is_contiguous(memory_format=CL)]
    assert convs and all(v.is_contiguous(memory_format=CL) == channels_last for v in convs)  # the layout reached them
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "moved" / "metrics.json").read_text())
    assert ma["conflict_rate"] == mb["conflict_rate"] and ma["eer"] == mb["eer"]
    assert ma["conflict_rate_by_epoch"] == mb["conflict_rate_by_epoch"]
    steps_a = (tmp_path / "full" / "steps.csv").read_text()
    assert steps_a == (tmp_path / "moved" / "steps.csv").read_text()


def test_cli_errors(tmp_path, capsys):
    assert train_main(["--preset", "smoke", "--out", str(tmp_path), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert train_main(["--preset", "smoke", "--out", str(tmp_path), "augment.algo=0"]) == 2
    assert "augment.algo" in capsys.readouterr().err
    assert train_main(["--preset", "smoke", "--out", str(tmp_path), "data.source=asvspoof2019"]) == 2
    assert "data.root" in capsys.readouterr().err
    assert eval_main(["--out", str(tmp_path)]) == 2
    assert train_main(["--preset", "smoke", "--out", str(tmp_path), "--compare", "dpda,dpda:pcgrad"]) == 2
    assert "listed twice" in capsys.readouterr().err
    assert train_main(["--preset", "smoke", "--out", str(tmp_path), "--compare", "baseline:pcgrad"]) == 2


def _ddp_worker(rank, world, port, overrides, out, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        from roga_cuda.apps.common.runtime import cleanup_distributed
        from roga_cuda.apps.speech.train import SpeechTrainer
        tr = SpeechTrainer(load_config("smoke", overrides=overrides, app="speech"), out)
        tr.fit()
        flat = torch.cat([p.detach().flatten().double() for p in tr.model.parameters()]).numpy()  # by value
        results.put((rank, flat, tr.opt.conflict_rate))
        cleanup_distributed()
    except BaseException as e:  # report, do not hang the test
        results.put((rank, f"{type(e).__name__}: {e}", None))


def test_ddp_two_processes(tmp_path, cache_dir):
    """dpda-train under DDP (2 gloo processes): PCGrad all-reduces both paths' gradients, so
    the ranks end with identical weights and conflict statistics; rank 0 writes the outputs."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    overrides = ["method=dpda", f"data.synthetic.cache_dir={cache_dir}", "runtime.device=cpu"] + TINY + \
        ["train.batch_size=4"]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, overrides, out, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (w, c)) for r, w, c in (results.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(got[r][0], np.ndarray) for r in (0, 1)), got
    np.testing.assert_array_equal(got[0][0], got[1][0])
    assert got[0][1] == got[1][1]
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert m["conflict_rate"] == pytest.approx(got[0][1]) and m["steps_per_epoch"] == 32 // (2 * 2)


@needs_soundfile
def test_end_to_end_on_asvspoof_layout_with_tdcf(tmp_path):
    """Training on the ASVspoof 2019 LA layout (+ an In-the-Wild folder as an extra test set):
    the organisers' ASV scores are found and min t-DCF is reported for the eval set."""
    root = tmp_path / "LA"
    _write_asvspoof(root, [1200, 2500, 1800, 2100, 900, 2000, 1600, 2400])
    itw = tmp_path / "itw"
    itw.mkdir()
    with open(itw / "meta.csv", "w") as fh:
        fh.write("file,speaker,label\n")
        for i in range(4):
            sf.write(str(itw / f"{i}.wav"), (0.05 * np.random.RandomState(i).randn(1500)).astype(np.float32), 16000)
            fh.write(f"{i}.wav,spk{i % 2},{'bona-fide' if i < 2 else 'spoof'}\n")
    out = tmp_path / "run"
    rc = train_main(["--preset", "smoke", "--out", str(out), "--data-root", str(root), "--in-the-wild", str(itw),
                     "data.n_samples=2000", "train.epochs=1", "train.batch_size=4", "runtime.progress=false",
                     "data.workers=0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["sets"]) == {"dev", "eval", "itw"} and m["main_set"] == "eval"
    assert set(m["per_attack_eer"]) == {"A17"} and 0 <= m["min_tdcf"]
    # ASV trials: target 2.0, non-target -1.0 -> the package's EER operating point is the
    # threshold -1.0 and its Pfa counts the non-target AT the threshold as accepted (>=): 1.0
    asv = m["sets"]["eval"]["tdcf_asv"]
    assert asv["pfa_asv"] == 1.0 and asv["pmiss_asv"] == 0.0 and asv["pmiss_spoof_asv"] == 0.0
    assert "min_tdcf" not in m["sets"]["dev"]
    assert (out / "scores" / "itw.txt").read_text().count("\n") == 4
