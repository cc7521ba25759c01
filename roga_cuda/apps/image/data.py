"""Image data for the detector: the built-in SynthFF data and two real layouts.

Everything becomes :class:`DomainData` objects: a domain (a manipulation method, or a
whole dataset) with its real and fake frames per split. Frames are served as uint8
``(3, S, S)`` tensors; normalisation and augmentation happen on the batch, on the device.

Real layouts
------------
* **Folder**: ``<root>/<domain>/{real,fake}/<video>/<frame>.png|jpg|jpeg`` (face crops).
  Training domains are split by video into train/val/test with a stable hash of the video
  name (``data.split``, default 0.8/0.1/0.1); held-out domains use all their videos as test.
* **DeepfakeBench JSON** (``dataset_json/<Dataset>.json``): ``{dataset: {label: {split:
  [{compression:}] {video: {"label": label, "frames": [paths]}}}}}``. Label names
  containing "real" (any case) are real, the others fake (override with
  ``data.real_labels``). A JSON with one fake label is one domain named after the dataset
  (``Celeb-DF-v2``); with several (FaceForensics++: FF-DF, FF-F2F, FF-FS, FF-NT) each fake
  label is a domain, paired with the JSON's real videos. Relative frame paths are resolved
  against ``data.root`` (DeepfakeBench's ``rgb_dir``), else the JSON file's folder.

A missing file is an error naming it (checked when the data is indexed); an unreadable
image is an error naming it when loaded, unless ``skip_corrupt`` is set: then every image
is decoded once up front, the unreadable ones are dropped, and the count is logged.
"""
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..common.runtime import hash_str, print0

__all__ = ["FrameSet", "DomainData", "ImageData", "build_image_data", "scan_folder_layout",
           "read_deepfakebench_json", "load_image", "ImageReadError", "IMAGE_EXTS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


class ImageReadError(RuntimeError):
    """An image file exists but cannot be decoded."""


def load_image(path, size):
    """A file -> uint8 (3, size, size) RGB tensor (bilinear resize with antialiasing).

    An image above Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 M pixels:
    a "decompression bomb", a small file that would decode to gigabytes) is an unreadable
    image like any other, never decoded."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("reading image files needs Pillow: pip install pillow (or the roga_cuda[apps] extra)") \
            from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), getattr(Image, "Resampling", Image).BILINEAR)
                arr = np.asarray(im, dtype=np.uint8).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"cannot read image {path}: too many pixels, refused as a possible decompression bomb "
                             f"({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class FrameSet(torch.utils.data.Dataset):
    """Frames with labels (1 = fake) and video ids, backed by a uint8 tensor or by files.

    ``item(i) -> (image uint8 (3,S,S), label)``."""

    def __init__(self, labels, videos, image_size, images=None, paths=None, name=""):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.videos = np.asarray(videos, dtype=object)
        self.image_size, self.images, self.paths, self.name = int(image_size), images, paths, name
        if (images is None) == (paths is None):
            raise ValueError("FrameSet needs exactly one of images= or paths=")
        n = len(images) if images is not None else len(paths)
        if not (n == len(self.labels) == len(self.videos)):
            raise ValueError(f"FrameSet {name!r}: {n} images, {len(self.labels)} labels, {len(self.videos)} video ids")

    def __len__(self):
        return len(self.labels)

    @property
    def in_memory(self):
        return self.images is not None

    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i], int(self.labels[i])
        return load_image(self.paths[i], self.image_size), int(self.labels[i])

    def batch(self, idx):
        """(uint8 (n,3,S,S), labels (n,)) for indices ``idx`` (in-memory sets only: direct)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.images is not None:
            return self.images[torch.from_numpy(idx)], torch.from_numpy(self.labels[idx])
        items = [self[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def subset(self, mask, name=None):
        sel = np.flatnonzero(mask)
        return FrameSet(self.labels[sel], self.videos[sel], self.image_size,
                        images=self.images[torch.from_numpy(sel)] if self.images is not None else None,
                        paths=[self.paths[i] for i in sel] if self.paths is not None else None,
                        name=name or self.name)

    @staticmethod
    def concat(sets, name=""):
        sets = [s for s in sets if s is not None and len(s)]
        if not sets:
            return None
        mem = sets[0].in_memory
        if any(s.in_memory != mem for s in sets):
            raise ValueError("cannot concatenate in-memory and file-backed frame sets")
        return FrameSet(np.concatenate([s.labels for s in sets]), np.concatenate([s.videos for s in sets]),
                        sets[0].image_size,
                        images=torch.cat([s.images for s in sets]) if mem else None,
                        paths=None if mem else [p for s in sets for p in s.paths], name=name)

    def describe(self):
        return f"{len(self)} frames ({int(self.labels.sum())} fake) from {len(set(self.videos.tolist()))} videos"


class DomainData:
    """One domain: ``splits[split] = FrameSet`` (real + fake frames) for the splits it has."""

    def __init__(self, name, splits):
        self.name, self.splits = name, {k: v for k, v in splits.items() if v is not None and len(v)}

    def real_fake(self, split):
        s = self.splits.get(split)
        if s is None:
            return None, None
        return s.subset(s.labels == 0, f"{self.name}/{split}/real"), s.subset(s.labels == 1, f"{self.name}/{split}/fake")

    def __repr__(self):
        return f"DomainData({self.name!r}, " + ", ".join(f"{k}: {v.describe()}" for k, v in self.splits.items()) + ")"


class ImageData:
    def __init__(self, train_domains, test_domains, image_size, source):
        self.train_domains, self.test_domains = train_domains, test_domains
        self.image_size, self.source = image_size, source


# -------------------------------------------------------------------------- synthetic
_SYNTH_CACHE = {}


def _synthetic(cfg, train, test, image_size):
    from . import synthetic
    sc = cfg.data.synthetic
    key = (int(sc.seed), image_size, tuple(sc.videos), int(sc.frames), tuple(train), tuple(test))
    ds = _SYNTH_CACHE.get(key)
    if ds is None:
        ds = synthetic.generate(seed=int(sc.seed), image_size=image_size, videos=tuple(sc.videos),
                                frames=int(sc.frames), train_methods=train, test_methods=test)
        _SYNTH_CACHE.clear()  # keep one (compare mode reuses it across optimizers)
        _SYNTH_CACHE[key] = ds
    names = np.asarray(ds.video_names, dtype=object)

    def fs(domain, split):
        if (domain, split, 0) not in ds.index:
            return None
        idx = torch.cat([ds.index[(domain, split, 0)], ds.index[(domain, split, 1)]])
        return FrameSet(ds.labels[idx].numpy(), names[ds.videos[idx].numpy()], image_size, images=ds.images[idx],
                        name=f"{domain}/{split}")

    tr = [DomainData(d, {s: fs(d, s) for s in SPLITS}) for d in train]
    te = [DomainData(d, {"test": fs(d, "test")}) for d in test]
    return tr, te


# ------------------------------------------------------------------------------ folders
def _natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _cap_frames(frames, cap):
    frames = sorted(frames, key=_natural_key)
    if cap and len(frames) > cap:  # evenly spaced
        pick = np.linspace(0, len(frames) - 1, cap).round().astype(int)
        frames = [frames[i] for i in pick]
    return frames


def scan_folder_layout(root, domain, frames_per_video=0):
    """``<root>/<domain>/{real,fake}/<video>/<frames>`` -> [(path, label, video_id)]."""
    ddir = os.path.join(root, domain)
    if not os.path.isdir(ddir):
        have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
        raise FileNotFoundError(f"domain folder not found: {ddir} (domains under {root}: {have or 'none'})")
    out = []
    for label_name, label in (("real", 0), ("fake", 1)):
        ldir = os.path.join(ddir, label_name)
        if not os.path.isdir(ldir):
            raise FileNotFoundError(f"{ldir} not found: the folder layout is <root>/<domain>/{{real,fake}}/<video>/<frame>")
        for video in sorted(os.listdir(ldir), key=_natural_key):
            vdir = os.path.join(ldir, video)
            if not os.path.isdir(vdir):
                continue
            frames = [f for f in os.listdir(vdir) if f.lower().endswith(IMAGE_EXTS)]
            for f in _cap_frames(frames, frames_per_video):
                out.append((os.path.join(vdir, f), label, f"{domain}/{label_name}/{video}"))
    if not any(lab == 0 for _, lab, _ in out) or not any(lab == 1 for _, lab, _ in out):
        raise ValueError(f"domain {ddir} needs frames in both real/ and fake/ (found "
                         f"{sum(1 for r in out if r[1] == 0)} real, {sum(1 for r in out if r[1] == 1)} fake)")
    return out


def _video_split(video_id, fractions, salt=""):
    """A stable split of a video by hash (same answer on every machine and run)."""
    h = (hash_str(salt + video_id) % 10_000_000) / 10_000_000
    a, b = fractions[0], fractions[0] + fractions[1]
    return "train" if h < a else ("val" if h < b else "test")


def _frameset(records, image_size, name):
    if not records:
        return None
    paths, labels, videos = zip(*records)
    return FrameSet(labels, videos, image_size, paths=list(paths), name=name)


def _folder(cfg, train, test, image_size):
    root = cfg.data.root
    if not root:
        raise ValueError("data.source=folder needs data.root=<folder with one sub-folder per domain>")
    fr = list(cfg.data.split)
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) < 0:
        raise ValueError(f"data.split must be three fractions summing to 1 (train, val, test), got {fr}")
    tr, te = [], []
    for d in train:
        recs = scan_folder_layout(root, d, cfg.data.frames_per_video)
        by = {s: [r for r in recs if _video_split(r[2], fr) == s] for s in SPLITS}
        tr.append(DomainData(d, {s: _frameset(by[s], image_size, f"{d}/{s}") for s in SPLITS}))
    for d in test:
        te.append(DomainData(d, {"test": _frameset(scan_folder_layout(root, d, cfg.data.frames_per_video),
                                                   image_size, f"{d}/test")}))
    return tr, te


# ------------------------------------------------------------------------ DeepfakeBench
def _is_real(label, real_labels):
    if real_labels:
        return label in real_labels
    return "real" in label.lower()


def read_deepfakebench_json(path, compression="c23", root=None, real_labels=(), frames_per_video=0):
    """Parse one DeepfakeBench dataset JSON -> {domain: {split: [(path, label, video)]}}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepfakeBench JSON not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"{path}: expected one top-level key (the dataset name), got {list(data)[:5]}")
    (dataset, labels), = data.items()
    base = root or os.path.dirname(os.path.abspath(path))
    fake_labels = [lab for lab in labels if not _is_real(lab, real_labels)]
    real = [lab for lab in labels if _is_real(lab, real_labels)]
    if not fake_labels or not real:
        raise ValueError(f"{path}: need real and fake labels, found real {real} and fake {fake_labels} "
                         "(set data.real_labels if the names do not contain 'real')")
    per_label = {}
    for lab, splits in labels.items():
        for split, videos in splits.items():
            if split not in SPLITS:
                continue
            if videos and all(isinstance(v, dict) and "frames" not in v for v in videos.values()):
                # FaceForensics++-style: {compression: {video: ...}}
                if compression not in videos:
                    raise ValueError(f"{path}: {lab}/{split} has compression levels {sorted(videos)}, "
                                     f"not data.compression={compression!r}")
                videos = videos[compression]
            recs = []
            for vname, info in videos.items():
                if not isinstance(info, dict) or "frames" not in info:
                    raise ValueError(f"{path}: {lab}/{split}/{vname} has no 'frames' list")
                for fp in _cap_frames(info["frames"], frames_per_video):
                    fp = fp.replace("\\", "/")
                    full = fp if os.path.isabs(fp) else os.path.normpath(os.path.join(base, fp))
                    recs.append((full, 0 if lab in real else 1, f"{dataset}/{lab}/{vname}"))
            per_label.setdefault(lab, {})[split] = recs
    out = {}
    for fl in fake_labels:
        dom = dataset if len(fake_labels) == 1 else fl
        out[dom] = {s: [r for lab in real + [fl] for r in per_label.get(lab, {}).get(s, [])] for s in SPLITS}
    return out


def _deepfakebench(cfg, train, test, image_size):
    files = cfg.data.json if isinstance(cfg.data.json, list) else [cfg.data.json]
    if not files or not files[0]:
        raise ValueError("data.source=deepfakebench needs data.json=[<Dataset>.json, ...]")
    domains = {}
    for path in files:
        for dom, splits in read_deepfakebench_json(path, cfg.data.compression, cfg.data.root, cfg.data.real_labels,
                                                   cfg.data.frames_per_video).items():
            if dom in domains:
                raise ValueError(f"domain {dom!r} appears in two JSON files")
            domains[dom] = splits
    missing = [d for d in list(train) + list(test) if d not in domains]
    if missing:
        raise ValueError(f"domains {missing} not in the JSON files; available: {', '.join(sorted(domains))}")
    tr = [DomainData(d, {s: _frameset(domains[d][s], image_size, f"{d}/{s}") for s in SPLITS}) for d in train]
    te = [DomainData(d, {"test": _frameset(domains[d]["test"], image_size, f"{d}/test")}) for d in test]
    return tr, te


# ------------------------------------------------------------------------- validation
def _check_files(domains, skip_corrupt, workers=8):
    """Missing files -> error naming them; with skip_corrupt, decode each image once and
    drop those that fail. Returns the number skipped."""
    skipped = 0
    for dom in domains:
        for split, fs in list(dom.splits.items()):
            if fs.in_memory:
                continue
            missing = [p for p in fs.paths if not os.path.isfile(p)]
            if missing and not skip_corrupt:
                raise FileNotFoundError(f"{len(missing)} image file(s) of domain {dom.name!r} ({split}) not found, "
                                        f"first: {missing[0]}")
            if skip_corrupt:
                def ok(p):
                    try:
                        load_image(p, 8)
                        return True
                    except (FileNotFoundError, ImageReadError):
                        return False
                with ThreadPoolExecutor(workers) as ex:
                    good = np.fromiter(ex.map(ok, fs.paths), dtype=bool, count=len(fs))
                bad = int((~good).sum())
                if bad:
                    first = fs.paths[int(np.flatnonzero(~good)[0])]
                    print0(f"[data] skipped {bad} unreadable/missing image(s) in {dom.name}/{split} (first: {first})")
                    skipped += bad
                    dom.splits[split] = fs.subset(good)
    return skipped


def build_image_data(cfg):
    """The :class:`ImageData` for ``cfg.data`` (source synthetic / folder / deepfakebench)."""
    d = cfg.data
    train, test = list(d.train_domains), list(d.test_domains)
    if not train:
        raise ValueError("data.train_domains is empty: give at least one training domain")
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"domains {overlap} are both training and held-out test domains; "
                         "in-domain results on training domains are reported anyway")
    size = int(d.image_size)
    if d.source == "synthetic":
        tr, te = _synthetic(cfg, train, test, size)
        skipped = 0
    elif d.source in ("folder", "deepfakebench"):
        tr, te = (_folder if d.source == "folder" else _deepfakebench)(cfg, train, test, size)
        skipped = _check_files(tr + te, bool(d.skip_corrupt))
    else:
        raise ValueError(f"unknown data.source {d.source!r}; use synthetic, folder or deepfakebench")
    for dom in tr:
        real, fake = dom.real_fake("train")
        if real is None or not len(real) or not len(fake):
            raise ValueError(f"training domain {dom.name!r} has no real or no fake training frames "
                             f"({dom.splits.get('train').describe() if 'train' in dom.splits else 'no train split'})")
    data = ImageData(tr, te, size, d.source)
    data.skipped = skipped
    return data


def to_input(x_uint8, device, mean, std, flip=None):
    """uint8 batch -> normalised float batch on ``device``; ``flip``: bool mask (n,) of
    samples to mirror horizontally (augmentation)."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255.0)
    if flip is not None and bool(flip.any()):
        flip = flip.to(device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s

