"""SynthFF: a procedural, deterministic multi-domain face-forgery-like image dataset.

Design (fixed before any optimizer was compared; see docs/datasets.md, section "image"):

* **Real frames.** A cartoon face renderer: background (two-colour gradient + smooth
  texture), hair, a skin ellipse with identity-specific tone, shading and skin texture,
  eyes (whites, iris, pupil, blinks), brows, nose shading, mouth (opens and closes).
  Identity (appearance and feature layout) is fixed per *video*; pose drift, expression,
  gaze, blinks and lighting vary per *frame*. A per-video camera adds blur and
  luminance-correlated sensor noise, then a per-video JPEG-like compression (8x8 DCT,
  standard quantisation tables) is applied to the whole frame.
* **Fake frames (face swap).** For each target video a source identity from another video
  of the same split is rendered with the *target's* geometry, pose, expression and
  lighting, processed by the method, partially colour-corrected towards the target, and
  blended into the target's inner face through a soft elliptical mask; the frame then goes
  through the target's final compression like a real one. Every method therefore shares
  the generic swap cues (a foreign inner face from a different processing chain, a
  blending boundary, residual skin-tone mismatch), and adds its own artefact:

  ================  ===========================================================  =========
  method            artefact signature                                           role
  ================  ===========================================================  =========
  ``blend``         face synthesised at 1/2-1/3 resolution and upsampled          train
                    (no sensor noise), sharp mask edge (DeepFakes-like)
  ``color``         weak colour correction + per-channel gain mismatch, wide      train
                    feathering (FaceSwap-like colour mismatch)
  ``jpeg2``         inner face compressed at low quality on a shifted 8x8 grid   train
                    (double compression, misaligned blocks)
  ``noise``         camera noise replaced by chroma (per-channel) noise of a     train
                    different strength (noise-texture mismatch)
  ``upsample``      half-resolution face upsampled with a transposed-conv-like    held out
                    checkerboard (periodic spectral peaks)
  ``warp``          re-rendered at the wrong scale/offset plus ghosting from a    held out
                    second, shifted copy (warping / temporal blending)
  ``hq``            another "dataset": its own real videos (different camera,     held out
                    lighting, compression) and high-quality swaps: full colour
                    transfer, wide feathering, only slight extra blur
                    (Celeb-DF-like cross-dataset test)
  ================  ===========================================================  =========

* **Splits and videos.** Videos are split train/val/test; fakes are made only from
  targets and sources of the same split, so no identity crosses splits. Training domains
  use their train split, model selection their val split, and in-domain results their
  test split; held-out domains are only ever evaluated (test split).

Everything is a pure function of ``(seed, sizes)``: each quantity is drawn from its own
``torch.Generator`` keyed by ``(seed, pool, split, purpose)``. Labels: 1 = fake, 0 = real.
"""
import math

import torch
import torch.nn.functional as F

from ..common.runtime import derive_seed

__all__ = ["METHODS", "TRAIN_METHODS", "HELDOUT_METHODS", "SynthFF", "generate", "jpeg_like"]

TRAIN_METHODS = ("blend", "color", "jpeg2", "noise")
HELDOUT_METHODS = ("upsample", "warp", "hq")
METHODS = TRAIN_METHODS + HELDOUT_METHODS
SPLITS = ("train", "val", "test")


def _gen(*key):
    return torch.Generator().manual_seed(derive_seed(*key))


def _u(g, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g)


# ------------------------------------------------------------------------ image processing
def _smooth_noise(g, n, c, size, cells):
    z = torch.randn(n, c, cells, cells, generator=g)
    return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)


def _blur(x, sigma):
    """Per-sample Gaussian blur; sigma: (n,) in pixels (<= 0.05 leaves the sample as is)."""
    n, c, h, w = x.shape
    r = int(math.ceil(3 * float(sigma.max()))) if sigma.numel() else 0
    if r < 1:
        return x
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp(min=0.05)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (n, 2r+1)
    k = k.repeat_interleave(c, 0)  # one kernel per (sample, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def _dct_matrix(n=8):
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


_DCT = _dct_matrix()
_QY = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_QC = torch.full((8, 8), 99.0)
_QC[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
                           dtype=torch.float32)


def jpeg_like(x, quality, offset=None):
    """JPEG-style lossy compression of ``x`` (n,3,H,W) in [0,1]: YCbCr, 8x8 DCT, the
    standard quantisation tables scaled by ``quality`` (n,) in [1,100] (libjpeg's
    formula), rounding, inverse DCT. ``offset`` (n,2) ints shifts the 8x8 grid."""
    n, _, h, w = x.shape
    rgb2ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    y = torch.einsum("ij,njhw->nihw", rgb2ycc, x) * 255.0
    y[:, 0] -= 128.0
    q = quality.float().clamp(1, 100)
    s = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)  # libjpeg quality scaling
    qt = torch.stack([_QY, _QC, _QC])  # (3, 8, 8)
    qt = ((qt[None] * s[:, None, None, None] + 50.0) / 100.0).floor().clamp(1, 255)  # (n,3,8,8)
    if offset is not None:  # shift the grid: pad top/left by the offset (per sample), crop afterwards
        outs = []
        for i in range(n):
            dy, dx = int(offset[i, 0]), int(offset[i, 1])
            yi = F.pad(y[i:i + 1], (dx, (-(w + dx)) % 8, dy, (-(h + dy)) % 8), mode="replicate")
            outs.append(_dct_quant(yi, qt[i:i + 1])[..., dy:dy + h, dx:dx + w])
        y = torch.cat(outs)
    else:
        y = _dct_quant(y, qt)
    y[:, 0] += 128.0
    ycc2rgb = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
    return (torch.einsum("ij,njhw->nihw", ycc2rgb, y / 255.0)).clamp(0, 1)


def _dct_quant(y, qt):
    n, c, h, w = y.shape
    b = y.reshape(n, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)  # (n,c,H/8,W/8,8,8)
    coef = _DCT @ b @ _DCT.T
    qt = qt[:, :, None, None]
    coef = torch.round(coef / qt) * qt
    b = _DCT.T @ coef @ _DCT
    return b.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def _sensor_noise(g, shape, sigma):
    """Luminance-correlated sensor noise (most energy shared by the three channels)."""
    n, c, h, w = shape
    lum = torch.randn(n, 1, h, w, generator=g)
    chroma = torch.randn(n, c, h, w, generator=g)
    return sigma[:, None, None, None] * (0.85 * lum + 0.53 * chroma)


# --------------------------------------------------------------------------------- renderer
_SKIN_LIGHT = torch.tensor([0.93, 0.77, 0.66])
_SKIN_DARK = torch.tensor([0.42, 0.28, 0.20])
_EYE_WHITE = torch.tensor([0.93, 0.92, 0.90])[None, :, None, None]
_IRIS = torch.tensor([[0.35, 0.22, 0.12], [0.25, 0.45, 0.70], [0.30, 0.50, 0.30], [0.12, 0.08, 0.05]])


def _identities(g, n, hq=False):
    """Per-video appearance and feature layout (dict of tensors with leading dim n)."""
    t = torch.rand(n, generator=g)
    skin = _SKIN_LIGHT * (1 - t[:, None]) + _SKIN_DARK * t[:, None]
    skin = skin * _u(g, (n, 3), 0.95, 1.05)
    if hq:  # warmer capture
        skin = skin * torch.tensor([1.04, 1.0, 0.93])
    hair = _u(g, (n, 1), 0.05, 0.55) * torch.tensor([1.0, 0.8, 0.6]) * _u(g, (n, 3), 0.85, 1.15)
    bg0, bg1 = _u(g, (n, 3), 0.1, 0.9), _u(g, (n, 3), 0.1, 0.9)
    if hq:
        bg0, bg1 = bg0 * 0.6, bg1 * 0.6
    ang = _u(g, (n,), 0, 2 * math.pi)
    return {
        "skin": skin, "hair": hair, "bg0": bg0, "bg1": bg1, "bg_dir": torch.stack([ang.cos(), ang.sin()], 1),
        "iris": _IRIS[torch.randint(0, 4, (n,), generator=g)] * _u(g, (n, 3), 0.85, 1.15),
        "lip": torch.stack([_u(g, (n,), 0.55, 0.8), _u(g, (n,), 0.2, 0.35), _u(g, (n,), 0.22, 0.35)], 1),
        "eye_sep": _u(g, (n,), 0.30, 0.42), "eye_y": _u(g, (n,), -0.22, -0.10), "eye_w": _u(g, (n,), 0.13, 0.18),
        "brow_t": _u(g, (n,), 0.025, 0.05), "mouth_y": _u(g, (n,), 0.40, 0.52), "mouth_w": _u(g, (n,), 0.18, 0.30),
        "nose_len": _u(g, (n,), 0.14, 0.22), "hair_h": _u(g, (n,), 0.05, 0.20),
        "tex_amp": _u(g, (n,), 0.015, 0.04),
    }


def _frames(g, n_videos, n_frames, hq=False):
    """Per-frame geometry/expression/lighting: dict of (n_videos, n_frames[, k]) tensors."""
    v, f = n_videos, n_frames
    fr = torch.arange(f, dtype=torch.float32)[None]
    phase, speed = _u(g, (v, 1), 0, 2 * math.pi), _u(g, (v, 1), 0.3, 0.9)
    blink = torch.rand(v, f, generator=g) < 0.15
    light = _u(g, (v, 1), 0, 2 * math.pi) + 0.1 * torch.randn(v, f, generator=g)
    return {
        "cx": _u(g, (v, 1), -0.06, 0.06) + 0.03 * torch.sin(speed * fr + phase),
        "cy": _u(g, (v, 1), 0.02, 0.12) + 0.02 * torch.cos(speed * fr + phase),
        "ax": _u(g, (v, 1), 0.52, 0.62).expand(v, f), "ay": _u(g, (v, 1), 0.68, 0.80).expand(v, f),
        "rot": _u(g, (v, 1), -0.15, 0.15) + 0.03 * torch.randn(v, f, generator=g),
        "open_eye": torch.where(blink, _u(g, (v, f), 0.05, 0.3), _u(g, (v, f), 0.8, 1.0)),
        "open_mouth": _u(g, (v, f), 0.0, 1.0) ** 2,
        "gaze": 0.03 * torch.randn(v, f, 2, generator=g),
        "light": torch.stack([light.cos(), light.sin()], -1) * _u(g, (v, 1, 1), 0.1, 0.3),
        "bright": _u(g, (v, 1), 0.85, 1.1) * (1 + 0.03 * torch.randn(v, f, generator=g)) * (0.9 if hq else 1.0),
    }


def _soft(r2, edge, inplace=False):
    """Soft inside-mask of a normalised ellipse field r2 (1 on the boundary), edge in radius
    units. inplace: r2 is a temporary and may be overwritten (saves allocations)."""
    r = r2 if inplace else r2.clone()
    return r.clamp_(min=0).sqrt_().neg_().add_(1.0).div_(edge).sigmoid_()


def _ell(p, q, cx, cy, rx, ry):
    dp = (p - cx).div_(rx)
    dq = (q - cy).div_(ry)
    return dp.mul_(dp).addcmul_(dq, dq)


def _mask(p, q, cx, cy, rx, ry, edge):
    return _soft(_ell(p, q, cx, cy, rx, ry), edge, inplace=True)


def _col(c):
    return c[:, :, None, None]


def render(ident, fr, size, g, scale=1.0, shift=None):
    """Render faces: ``ident`` (appearance, per sample) with geometry/expression ``fr`` (per
    sample). scale/shift distort the face geometry (the ``warp`` method). Returns the
    image (n,3,S,S) in [0,1] and the face-local coordinates (p, q) used for masks."""
    n = ident["skin"].shape[0]
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(lin, lin, indexing="ij")
    u, v = u[None, None], v[None, None]
    e = lambda k: fr[k][:, None, None, None]  # noqa: E731
    ax, ay = e("ax") * scale, e("ay") * scale
    cx, cy = e("cx"), e("cy")
    if shift is not None:
        cx, cy = cx + shift[:, 0, None, None, None], cy + shift[:, 1, None, None, None]
    cr, sr = torch.cos(e("rot")), torch.sin(e("rot"))
    du, dv = u - cx, v - cy
    p = (cr * du + sr * dv) / ax  # face-local, normalised: the face ellipse is p^2 + q^2 = 1
    q = (-sr * du + cr * dv) / ay
    edge = 1.5 / size / 0.5  # ~1.5 px anti-aliasing in face units

    d = ident["bg_dir"]
    grad = 0.5 + 0.5 * (d[:, 0, None, None, None] * u + d[:, 1, None, None, None] * v)
    img = _col(ident["bg0"]) * (1 - grad) + _col(ident["bg1"]) * grad
    img = img + 0.05 * _smooth_noise(g, n, 3, size, 5)

    hair_a = _mask(p, q, 0, -0.12 - ident["hair_h"][:, None, None, None], 1.12, 1.0, edge)
    img = torch.lerp(img, _col(ident["hair"]) * (1 + 0.15 * _smooth_noise(g, n, 1, size, 12)), hair_a)

    r2 = p ** 2 + q ** 2
    light = fr["light"]
    shade = (1.0 + light[:, 0, None, None, None] * p + light[:, 1, None, None, None] * q) * (1 - 0.18 * r2.clamp(max=1))
    tex = ident["tex_amp"][:, None, None, None] * (_smooth_noise(g, n, 1, size, 7) + 0.5 * _smooth_noise(g, n, 3, size, 18))
    skin = _col(ident["skin"]) * shade + tex
    img = torch.lerp(img, skin, _soft(r2, edge))

    es, ey, ew = (ident[k][:, None, None, None] for k in ("eye_sep", "eye_y", "eye_w"))
    oe = e("open_eye")
    gz = fr["gaze"]
    for side in (-1.0, 1.0):
        brow = _mask(p, q, side * es, ey - 0.17, ew * 1.15, ident["brow_t"][:, None, None, None], 0.15)
        img = torch.lerp(img, _col(ident["hair"]) * 0.8, brow)
        eye = _mask(p, q, side * es, ey, ew, 0.55 * ew * oe + 1e-3, 0.12)
        ix, iy = side * es + gz[:, 0, None, None, None], ey + gz[:, 1, None, None, None]
        iris = _mask(p, q, ix, iy, 0.45 * ew, 0.45 * ew * 1.3, 0.1).mul_(eye)
        pupil = _mask(p, q, ix, iy, 0.2 * ew, 0.2 * ew * 1.3, 0.1).mul_(eye)
        img = torch.lerp(img, _EYE_WHITE * shade, eye)
        img = torch.lerp(img, _col(ident["iris"]).expand_as(img), iris)
        img = torch.lerp(img, torch.full_like(img, 0.03), pupil)

    nl = ident["nose_len"][:, None, None, None]
    nose = _mask(p, q, 0.05, ey + 0.1 + nl, 0.07, nl, 0.4)
    img = img * nose.mul_(-0.12).add_(1.0)
    for side in (-1.0, 1.0):
        nostril = _mask(p, q, side * 0.07, ey + 0.12 + 2 * nl, 0.035, 0.02, 0.2)
        img = img * nostril.mul_(-0.5).add_(1.0)

    my, mw, om = ident["mouth_y"][:, None, None, None], ident["mouth_w"][:, None, None, None], e("open_mouth")
    lips = _mask(p, q, 0, my, mw, 0.035 + 0.07 * om, 0.1)
    img = torch.lerp(img, _col(ident["lip"]) * shade, lips)
    inner = _mask(p, q, 0, my, 0.8 * mw, 0.065 * om + 1e-3, 0.1)
    img = torch.lerp(img, torch.full_like(img, 0.08), inner)

    img = img * e("bright")
    return img.clamp(0, 1), (p, q)


# ------------------------------------------------------------------------------ the dataset
def _take(d, idx):
    return {k: v[idx] for k, v in d.items()}


def _flat_frames(fr):
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in fr.items()}


class SynthFF:
    """The generated dataset: ``images`` uint8 (N,3,S,S), ``labels`` (N,) 0/1, ``videos``
    (N,) global video index, ``video_names``, and ``index[(domain, split, label)]`` ->
    sample indices. A domain's real frames are its pool's real videos (``ff`` for the six
    FF++-like methods, ``hq`` for ``hq``)."""

    def __init__(self, images, labels, videos, video_names, index, info):
        self.images, self.labels, self.videos = images, labels, videos
        self.video_names, self.index, self.info = video_names, index, info

    def __len__(self):
        return self.labels.shape[0]

    def domain_indices(self, domain, split, label):
        return self.index[(domain, split, label)]


def generate(seed=0, image_size=64, videos=(24, 6, 12), frames=8, train_methods=TRAIN_METHODS,
             test_methods=HELDOUT_METHODS, chunk=64):
    """Build :class:`SynthFF`. ``videos``: real videos per split (train, val, test) in each
    pool (``ff``: the six FF++-like methods; ``hq``: its own). ``train_methods`` get all
    three splits, ``test_methods`` (held out) only the test split. The content of a given
    (pool, split, method) does not depend on which other methods are generated."""
    train_methods, test_methods = list(train_methods), [m for m in test_methods if m not in train_methods]
    if image_size % 8 or image_size < 32:
        raise ValueError(f"synthetic image_size must be a multiple of 8 and >= 32, got {image_size}")
    unknown = [m for m in train_methods + test_methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown synthetic method(s) {unknown}; available: {', '.join(METHODS)}")
    if len(videos) != 3:
        raise ValueError(f"videos must give (train, val, test) counts, got {videos}")
    vid_counts = dict(zip(SPLITS, (int(v) for v in videos)))
    if min(vid_counts.values()) < 2:
        raise ValueError(f"synthetic data needs >= 2 videos per split (sources differ from targets), got {videos}")
    need = {}  # (pool, split) -> methods
    for m in train_methods + test_methods:
        pool = "hq" if m == "hq" else "ff"
        for split in (SPLITS if m in train_methods else ("test",)):
            need.setdefault((pool, split), []).append(m)
    images, labels, vids, names, index = [], [], [], [], {}
    count = [0]

    def add(img, label, vid_ids, name_of, key):
        n = img.shape[0]
        images.append((img * 255).round().clamp(0, 255).to(torch.uint8))
        labels.append(torch.full((n,), label, dtype=torch.int64))
        local = {}
        for v_ in vid_ids.unique().tolist():
            local[v_] = len(names)
            names.append(name_of(v_))
        vids.append(torch.tensor([local[v_] for v_ in vid_ids.tolist()], dtype=torch.int64))
        index.setdefault(key, []).append(torch.arange(count[0], count[0] + n))
        count[0] += n

    for (pool, split), pool_methods in sorted(need.items(), key=lambda kv: (kv[0][0], SPLITS.index(kv[0][1]))):
        nv = vid_counts[split]
        hq = pool == "hq"
        ident = _identities(_gen(seed, pool, split, "identity"), nv, hq)
        frf = _flat_frames(_frames(_gen(seed, pool, split, "frames"), nv, frames, hq))
        gc = _gen(seed, pool, split, "camera")
        cam = {"blur": _u(gc, (nv,), 0.3, 1.0), "noise": _u(gc, (nv,), 0.006, 0.018) if hq else
               _u(gc, (nv,), 0.008, 0.03), "q": _u(gc, (nv,), 50, 70) if hq else _u(gc, (nv,), 65, 92)}
        vid_of = torch.arange(nv).repeat_interleave(frames)
        chunks = [slice(lo, min(lo + chunk, vid_of.numel())) for lo in range(0, vid_of.numel(), chunk)]
        gr = _gen(seed, pool, split, "render-real")
        start = count[0]
        captured = []  # the real frames before compression: the targets of the fakes
        for sl in chunks:  # real frames, rendered once and listed under every domain of the pool
            v_ = vid_of[sl]
            img, pq = render(_take(ident, v_), _take(frf, torch.arange(sl.start, sl.stop)), image_size, gr)
            img = _camera(img, cam, v_, gr)
            captured.append((img, pq))
            add(jpeg_like(img, cam["q"][v_]), 0, v_, lambda i, p=pool, s=split: f"{p}-{s}-real-{i:04d}", ("__real__",))
        index.pop(("__real__",))
        real_idx = torch.arange(start, count[0])
        for m in pool_methods:
            index[(m, split, 0)] = [real_idx]
            gm = _gen(seed, pool, split, m)
            src = (torch.arange(nv) + torch.randint(1, nv, (nv,), generator=gm)) % nv  # never its own target
            mp = _method_params(m, gm, nv)
            for sl, target in zip(chunks, captured):
                v_ = vid_of[sl]
                fake = _fake(m, target, _take(ident, src[v_]), _take(frf, torch.arange(sl.start, sl.stop)),
                             {k: t[v_] for k, t in cam.items()}, {k: t[v_] for k, t in mp.items()}, image_size, gm)
                fake = jpeg_like(fake, cam["q"][v_])
                add(fake, 1, v_, lambda i, p=pool, s=split, m=m: f"{p}-{s}-{m}-{i:04d}", (m, split, 1))
    index = {k: torch.cat(v) for k, v in index.items()}
    info = {"seed": seed, "image_size": image_size, "videos": list(videos), "frames": frames,
            "train_methods": train_methods, "test_methods": test_methods}
    return SynthFF(torch.cat(images), torch.cat(labels), torch.cat(vids), names, index, info)


def _camera(img, cam, v_, g):
    img = _blur(img, cam["blur"][v_])
    return (img + _sensor_noise(g, img.shape, cam["noise"][v_])).clamp(0, 1)


def _method_params(m, g, n):
    """Per-fake-video strengths of the method's artefacts (ranges fixed by design)."""
    p = {}
    if m == "blend":
        p["factor"] = torch.randint(2, 4, (n,), generator=g).float()
        p["edge"], p["cc"] = _u(g, (n,), 0.015, 0.03), _u(g, (n,), 0.6, 0.9)
    elif m == "color":
        sign = torch.where(torch.rand(n, 3, generator=g) < 0.5, -1.0, 1.0)
        p["gain"] = 1 + sign * _u(g, (n, 3), 0.04, 0.12)
        p["edge"], p["cc"] = _u(g, (n,), 0.08, 0.14), _u(g, (n,), 0.1, 0.4)
    elif m == "jpeg2":
        p["q1"] = _u(g, (n,), 20, 45)
        p["off"] = torch.randint(1, 8, (n, 2), generator=g).float()
        p["edge"], p["cc"] = _u(g, (n,), 0.04, 0.07), _u(g, (n,), 0.8, 1.0)
    elif m == "noise":
        p["ratio"] = _u(g, (n,), 1.4, 2.5)
        p["edge"], p["cc"] = _u(g, (n,), 0.04, 0.07), _u(g, (n,), 0.8, 1.0)
    elif m == "upsample":
        p["amp"] = _u(g, (n,), 0.02, 0.05)
        p["edge"], p["cc"] = _u(g, (n,), 0.05, 0.08), _u(g, (n,), 0.75, 0.95)
    elif m == "warp":
        p["scale"] = _u(g, (n,), 1.05, 1.12)
        p["shift"] = _u(g, (n, 2), -0.04, 0.04)
        p["ghost"] = _u(g, (n,), 0.25, 0.45)
        p["edge"], p["cc"] = _u(g, (n,), 0.04, 0.07), _u(g, (n,), 0.8, 1.0)
    elif m == "hq":
        p["blur"] = _u(g, (n,), 0.3, 0.7)
        p["edge"], p["cc"] = _u(g, (n,), 0.10, 0.16), torch.ones(n)
    return p


def _fake(m, target, source, fr, cam, mp, size, g):
    """Swap the inner face of the captured real frames ``target = (image, (p, q))``."""
    t_img, (p, q) = target
    # the source face with the target's geometry, pose, expression and lighting
    if m == "warp":
        f_img, _ = render(source, fr, size, g, scale=mp["scale"][:, None, None, None], shift=mp["shift"])
    else:
        f_img, _ = render(source, fr, size, g)
    mask = _soft(p ** 2 / 0.82 ** 2 + q ** 2 / 0.88 ** 2, mp["edge"][:, None, None, None])

    def camera(x, extra_blur=0.0):
        x = _blur(x, cam["blur"] + extra_blur)
        return (x + _sensor_noise(g, x.shape, cam["noise"])).clamp(0, 1)

    if m == "blend":  # low-resolution synthesis, upsampled; no sensor noise in the face
        outs = []
        for f in mp["factor"].unique().tolist():
            sel = mp["factor"] == f
            lo = F.interpolate(f_img[sel], scale_factor=1 / f, mode="area", recompute_scale_factor=False)
            outs.append((sel, F.interpolate(lo, size=(size, size), mode="bilinear", align_corners=False)))
        f_proc = torch.empty_like(f_img)
        for sel, x in outs:
            f_proc[sel] = x
        f_proc = _blur(f_proc, cam["blur"] * 0.5)
    elif m == "color":
        f_proc = camera(f_img) * mp["gain"][:, :, None, None]
    elif m == "jpeg2":
        f_proc = jpeg_like(camera(f_img), mp["q1"], offset=mp["off"].long())
    elif m == "noise":  # camera noise replaced by independent per-channel noise of another strength
        f_proc = _blur(f_img, cam["blur"])
        f_proc = f_proc + (cam["noise"] * mp["ratio"])[:, None, None, None] * torch.randn(f_proc.shape, generator=g)
    elif m == "upsample":  # half-res face, transposed-conv-like upsampling: a period-2 checkerboard
        lo = F.interpolate(f_img, scale_factor=0.5, mode="area")
        up = F.interpolate(lo, size=(size, size), mode="nearest")
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        checker = ((yy + xx) % 2 * 2 - 1).float()[None, None]
        f_proc = camera(up * (1 + mp["amp"][:, None, None, None] * checker), extra_blur=0.0)
    elif m == "warp":  # misregistered re-rendering plus a ghost of a shifted copy
        shifted = torch.roll(f_img, shifts=(1, 2), dims=(2, 3))
        gw = mp["ghost"][:, None, None, None]
        f_proc = camera((1 - gw) * f_img + gw * shifted)
    elif m == "hq":
        f_proc = camera(f_img, extra_blur=mp["blur"])
    else:
        raise ValueError(m)
    # colour correction towards the target inside the mask (strength cc per video)
    w = mask / mask.sum((2, 3), keepdim=True).clamp(min=1e-6)
    mt = (t_img * w).sum((2, 3), keepdim=True)
    mf = (f_proc * w).sum((2, 3), keepdim=True)
    f_proc = f_proc + mp["cc"][:, None, None, None] * (mt - mf)
    return (mask * f_proc + (1 - mask) * t_img).clamp(0, 1)
