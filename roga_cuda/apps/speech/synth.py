"""SynthSpoof: a built-in synthetic bona fide / spoof speech corpus, deterministic from a seed.

The design is documented in docs/datasets.md ("speech" section); it was fixed before any
method was compared on it and is not tuned to favour one. In short:

* **Bona fide**: source-filter speech. A glottal source with a natural pitch contour
  (declination + intonation + cycle-level jitter and shimmer, aspiration noise pulsed at the
  glottal rate) is synthesised harmonic by harmonic through a cascade of five formant
  resonances whose tracks glide between vowel targets (coarticulation); fricatives
  (band-shaped noise), plosives (closure + burst) and pauses between syllables.
* **Spoofs**: six synthetic "TTS/vocoder" systems that render the same kind of utterance
  plan for the same speakers, each with its own artefacts (A01-A04 seen in training,
  A05-A06 only at evaluation, as unseen attacks).
* **Channel**: every utterance, bona fide or spoof, goes through the same random recording
  channel (level, mild EQ, optional low-pass, background noise). The ``wild`` split uses a
  harsher channel (reverberation, low SNR, telephone band, clipping), unseen in training.

Every utterance is generated from its own ``numpy.random.Generator`` seeded by
``(seed, split, index)``, so the corpus does not depend on generation order.
"""
import hashlib
import json
import math
import os

import numpy as np
import torch

FS = 16000

# F1-F3 (Hz) of eight vowels, adult male averages (Peterson & Barney 1952); F4, F5 fixed.
VOWELS = np.array([(270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410),
                   (730, 1090, 2440), (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240)], dtype=np.float64)
F45 = (3500.0, 4500.0)
BANDWIDTHS = np.array([60.0, 90.0, 130.0, 180.0, 250.0])
HOP = 80  # frame hop of the control tracks (5 ms)

ATTACKS = {
    "A01": "statistical-parametric TTS with a pulse/noise vocoder (no jitter/shimmer, over-smoothed F0 and formants)",
    "A02": "Griffin-Lim phase reconstruction from a magnitude spectrogram",
    "A03": "band-limited neural vocoder upsampled to 16 kHz (no energy above the cut-off, spectral images)",
    "A04": "GAN vocoder with frame-periodic (checkerboard) modulation and a metallic high-band floor",
    "A05": "unit-selection concatenation (pitch/phase jumps at unit joins, no formant transitions)",
    "A06": "low-bitrate neural codec (spectral holes filled with noise, coarse magnitudes, mu-law)",
}
SEEN_ATTACKS = ("A01", "A02", "A03", "A04")
UNSEEN_ATTACKS = ("A05", "A06")

# Split sizes: (bona fide, spoofs per attack, attacks, speakers, channel)
DEFAULT_SPLITS = {
    "train": {"bonafide": 160, "per_attack": 120, "attacks": list(SEEN_ATTACKS), "speakers": 20, "channel": "studio"},
    "dev": {"bonafide": 80, "per_attack": 40, "attacks": list(SEEN_ATTACKS), "speakers": 8, "channel": "studio"},
    "eval": {"bonafide": 120, "per_attack": 60, "attacks": list(SEEN_ATTACKS + UNSEEN_ATTACKS), "speakers": 12,
             "channel": "studio"},
    "wild": {"bonafide": 120, "per_attack": 60, "attacks": list(SEEN_ATTACKS + UNSEEN_ATTACKS), "speakers": 12,
             "channel": "wild"},
}
_SPLIT_KEY = {"train": "T", "dev": "D", "eval": "E", "wild": "W"}
VERSION = 1  # bump when the generator's output changes (invalidates caches)


def _seed(*parts):
    from ..common.runtime import derive_seed
    return derive_seed(*parts)


# ----------------------------------------------------------------------------- speakers

def make_speaker(rng):
    male = rng.random() < 0.5
    return {
        "male": bool(male),
        "f0": rng.uniform(95, 140) if male else rng.uniform(175, 245),      # median F0 [Hz]
        "vtl": rng.uniform(0.92, 1.04) if male else rng.uniform(1.08, 1.20),  # formant scale
        "jitter": rng.uniform(0.006, 0.015),      # relative cycle-level F0 perturbation (std)
        "shimmer": rng.uniform(0.03, 0.08),       # relative cycle-level amplitude perturbation (std)
        "breath": rng.uniform(0.02, 0.07),        # aspiration noise level
        "tilt": rng.uniform(-7.0, -4.0),          # source + radiation spectral slope [dB/octave]
        "rate": rng.uniform(0.85, 1.2),           # speaking rate factor
    }


# --------------------------------------------------------------------------------- plans

def make_plan(rng, spk, n):
    """Segments filling n samples: (kind, start, end, params)."""
    segs = []
    t = int(rng.uniform(0.02, 0.12) * FS)
    segs.append(("pause", 0, t, {}))
    while t < n:
        onset = rng.choice(3, p=[0.4, 0.35, 0.25])
        if onset == 1:
            d = int(rng.uniform(0.05, 0.12) / spk["rate"] * FS)
            segs.append(("fric", t, t + d, {"fc": rng.uniform(2500, 6500), "bw": rng.uniform(1000, 3000),
                                            "level": rng.uniform(-16, -6)}))
            t += d
        elif onset == 2:
            d = int(rng.uniform(0.03, 0.06) * FS)
            segs.append(("pause", t, t + d, {}))
            t += d
            d = int(rng.uniform(0.008, 0.02) * FS)
            segs.append(("burst", t, t + d, {"fc": rng.uniform(1500, 4500), "level": rng.uniform(-12, -4)}))
            t += d
        d = int(rng.uniform(0.08, 0.22) / spk["rate"] * FS)
        v = VOWELS[rng.integers(len(VOWELS))]
        formants = np.r_[v, F45] * spk["vtl"] * (1 + 0.04 * rng.standard_normal(5))
        segs.append(("vowel", t, t + d, {"formants": np.sort(formants), "level": rng.uniform(-3, 0)}))
        t += d
        if rng.random() < 0.18:
            d = int(rng.uniform(0.06, 0.25) * FS)
            segs.append(("pause", t, t + d, {}))
            t += d
    return segs


# ------------------------------------------------------------------------------- helpers

def _smooth_noise(rng, n, step):
    """Unit-variance noise with one independent value every ``step`` samples, linearly interpolated."""
    k = n // step + 2
    pts = rng.standard_normal(k)
    return np.interp(np.arange(n) / step, np.arange(k), pts)


def _ramp_env(n, spans, ramp):
    """0/1 gate over [start, end) spans with raised-cosine ramps of ``ramp`` samples."""
    env = np.zeros(n)
    for s, e in spans:
        s, e = max(0, s), min(n, e)
        if e <= s:
            continue
        seg = np.ones(e - s)
        r = min(ramp, (e - s) // 2)
        if r > 0:
            w = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
            seg[:r] *= w
            seg[-r:] *= w[::-1]
        env[s:e] = np.maximum(env[s:e], seg)
    return env


def _resonance_mag(f, fc, bw):
    """|H(f)| of a resonance with unit gain at DC (Klatt-style pole pair)."""
    b2 = (bw / 2) ** 2
    return (fc * fc + b2) / np.sqrt(((f - fc) ** 2 + b2) * ((f + fc) ** 2 + b2))


def _band_noise(rng, n, fc, bw, fs=FS):
    """White noise shaped by a Gaussian band around fc (FFT domain)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / fs)
    spec *= np.exp(-0.5 * ((f - fc) / (bw / 2)) ** 2)
    y = np.fft.irfft(spec, n)
    return y / (np.sqrt(np.mean(y * y)) + 1e-12)


def _rms(x):
    return float(np.sqrt(np.mean(x * x)) + 1e-12)


# -------------------------------------------------------------------------------- render

def render(rng, spk, plan, n, *, jitter=1.0, shimmer=1.0, intonation=1.0, bw_scale=1.0, pulsed_breath=True,
           voicing_ramp=0.015, formant_glide=True, unit_f0_jumps=0.0, unit_phase_reset=False):
    """Synthesise a plan. The keyword knobs are what the spoof systems change; the
    defaults are the natural (bona fide) rendering."""
    t = np.arange(n) / FS
    dur = n / FS
    # ---- pitch: declination + intonation + jitter (+ per-unit offsets for concatenation)
    d0, d1 = rng.uniform(1, 3), -rng.uniform(1, 3)
    semis = d0 + (d1 - d0) * t / dur
    for _ in range(2):
        semis = semis + intonation * rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * rng.uniform(0.5, 3.0) * t
                                                                     + rng.uniform(0, 2 * np.pi))
    vowels = [s for s in plan if s[0] == "vowel"]
    if unit_f0_jumps > 0:
        for s in vowels:
            semis[s[1]:s[2]] += unit_f0_jumps * rng.standard_normal()
    f0 = spk["f0"] * 2 ** (semis / 12)
    period = int(FS / spk["f0"])
    if jitter > 0:
        f0 = f0 * (1 + jitter * spk["jitter"] * _smooth_noise(rng, n, period))
    phase = 2 * np.pi * np.cumsum(f0) / FS
    if unit_phase_reset:  # each unit starts at a random glottal phase: discontinuities at joins
        for s in vowels:
            phase[s[1]:] += rng.uniform(0, 2 * np.pi)
    amp = np.ones(n)
    if shimmer > 0:
        amp = amp * (1 + shimmer * spk["shimmer"] * _smooth_noise(rng, n, period))
    # ---- formant tracks at frame rate
    nf = n // HOP + 2
    ft = np.arange(nf) * HOP
    if vowels:
        if formant_glide:  # hold the central 40% of each vowel, glide in between
            kt, kv = [], []
            for s in vowels:
                d = s[2] - s[1]
                kt += [s[1] + 0.3 * d, s[2] - 0.3 * d]
                kv += [s[3]["formants"], s[3]["formants"]]
            kv = np.array(kv)
            tracks = np.stack([np.interp(ft, kt, kv[:, k]) for k in range(5)], axis=1)
        else:  # step-wise: each unit keeps its own formants up to the next one
            idx = np.searchsorted([s[1] for s in vowels], ft, side="right") - 1
            tracks = np.array([vowels[max(i, 0)][3]["formants"] for i in idx])
    else:
        tracks = np.tile(np.r_[VOWELS[4], F45] * spk["vtl"], (nf, 1))
    bws = BANDWIDTHS * bw_scale * rng.uniform(0.85, 1.15, 5)
    # ---- harmonic amplitudes at frame rate, interpolated to samples
    f0_frames = f0[np.minimum(ft, n - 1)]
    n_harm = int(7600 / f0.min())
    h = np.arange(1, n_harm + 1)
    fh = f0_frames[:, None] * h[None, :]                                        # (frames, harmonics)
    env = np.ones_like(fh)
    for k in range(5):
        env *= _resonance_mag(fh, tracks[:, k:k + 1], bws[k])
    a = env * h[None, :] ** (spk["tilt"] / 6.02) * np.clip((7800 - fh) / 400, 0, 1)
    a_s = np.empty((n, n_harm))
    for j in range(n_harm):
        a_s[:, j] = np.interp(np.arange(n), ft, a[:, j])
    psi = rng.uniform(0, 2 * np.pi, n_harm)
    voiced = np.einsum("nh,nh->n", a_s, np.sin(phase[:, None] * h[None, :] + psi[None, :]))
    voiced *= amp
    # ---- aspiration: high-passed noise, pulsed at the glottal rate (or steady, for vocoders)
    w = rng.standard_normal(n)
    w = np.r_[w[0], w[1:] - 0.9 * w[:-1]]
    if pulsed_breath:
        w *= (0.5 + 0.5 * np.cos(phase)) ** 2 * 2
    vrms = _rms(voiced)
    voiced = voiced + spk["breath"] * vrms * w / _rms(w)
    # ---- voicing gate with per-vowel levels
    gate = np.zeros(n)
    ramp = int(voicing_ramp * FS)
    for s in vowels:
        gate = np.maximum(gate, _ramp_env(n, [(s[1], s[2])], ramp) * 10 ** (s[3]["level"] / 20))
    y = voiced * gate
    ref = vrms
    # ---- fricatives and bursts
    for kind, s, e, p in plan:
        s, e = min(s, n), min(e, n)
        if e - s < 8:
            continue
        if kind == "fric":
            y[s:e] += ref * 10 ** (p["level"] / 20) * _band_noise(rng, e - s, p["fc"], p["bw"]) * \
                _ramp_env(e - s, [(0, e - s)], int(0.01 * FS))
        elif kind == "burst":
            decay = np.exp(-np.arange(e - s) / (rng.uniform(0.003, 0.006) * FS))
            y[s:e] += ref * 10 ** (p["level"] / 20) * _band_noise(rng, e - s, p["fc"], 3000) * decay
    return y / _rms(y)


# ------------------------------------------------------------------------- spoof systems

def _stft(x, n_fft, hop):
    w = torch.hann_window(n_fft, dtype=torch.float64)
    return torch.stft(torch.from_numpy(x), n_fft, hop, window=w, return_complex=True)


def _istft(X, n_fft, hop, n):
    w = torch.hann_window(n_fft, dtype=torch.float64)
    return torch.istft(X, n_fft, hop, window=w, length=n).numpy()


def griffin_lim(rng, x, n_iter, n_fft=512, hop=128):
    mag = _stft(x, n_fft, hop).abs()
    phase = torch.from_numpy(rng.uniform(0, 2 * np.pi, tuple(mag.shape)))
    X = torch.polar(mag, phase)
    for _ in range(n_iter):
        y = _istft(X, n_fft, hop, len(x))
        X = torch.polar(mag, _stft(y, n_fft, hop).angle())
    return _istft(X, n_fft, hop, len(x))


def band_limit_with_images(rng, x, cutoff, image_db):
    n = len(x)
    X = np.fft.rfft(x)
    f = np.fft.rfftfreq(n, 1 / FS)
    roll = np.clip((cutoff - f) / 200.0, 0, 1)
    Xl = X * roll
    kc = int(round(cutoff * n / FS))
    img = np.zeros_like(Xl)
    k = np.arange(kc + 1, min(2 * kc, len(f)))
    img[k] = Xl[2 * kc - k]
    return np.fft.irfft(Xl + 10 ** (image_db / 20) * img, n)


def gan_artefacts(rng, x, hop, depth, floor_db):
    n = len(x)
    t = np.arange(n)
    saw = (t % hop) / hop - 0.5
    saw = np.convolve(saw, np.ones(9) / 9, mode="same")                          # softened edges
    y = x * (1 + depth * saw / np.abs(saw).max())
    envv = np.sqrt(np.convolve(x * x, np.ones(400) / 400, mode="same"))
    hf = _band_noise(rng, n, 7000, 1600)
    return y + 10 ** (floor_db / 20) * envv * hf


def codec_artefacts(rng, x, keep, step_db, mu_bits, n_fft=320, hop=160):
    X = _stft(x, n_fft, hop)
    mag, ph = X.abs().numpy(), X.angle().numpy()
    logm = 20 * np.log10(mag + 1e-9)
    logm = np.round(logm / step_db) * step_db                                   # coarse magnitudes
    thr = np.quantile(logm, 1 - keep, axis=0, keepdims=True)
    kept = logm >= thr
    # holes filled with noise at the frame's mean dropped level, random phase
    fill = np.where(kept, -200.0, logm)
    fill_level = np.log10(np.mean(10 ** (fill / 10), axis=0, keepdims=True) + 1e-20) * 10
    mag2 = np.where(kept, 10 ** (logm / 20), 10 ** (fill_level / 20) * rng.rayleigh(0.8, mag.shape))
    ph2 = np.where(kept, ph, rng.uniform(-np.pi, np.pi, ph.shape))
    y = _istft(torch.polar(torch.from_numpy(mag2), torch.from_numpy(ph2)), n_fft, hop, len(x))
    peak = np.abs(y).max() + 1e-12
    mu = 2 ** mu_bits - 1
    c = np.sign(y / peak) * np.log1p(mu * np.abs(y / peak)) / np.log1p(mu)
    c = np.round((c + 1) / 2 * mu) / mu * 2 - 1
    return peak * np.sign(c) * np.expm1(np.abs(c) * np.log1p(mu)) / mu


def synthesize(rng, spk, n, system):
    """One utterance by ``system`` ('bonafide' or an attack id), before the channel."""
    plan = make_plan(rng, spk, n)
    if system == "bonafide":
        return render(rng, spk, plan, n)
    if system == "A01":
        return render(rng, spk, plan, n, jitter=0.0, shimmer=0.0, intonation=0.5,
                      bw_scale=rng.uniform(1.4, 2.2), pulsed_breath=False, voicing_ramp=0.002)
    if system == "A02":
        return griffin_lim(rng, render(rng, spk, plan, n), int(rng.integers(4, 17)))
    if system == "A03":
        return band_limit_with_images(rng, render(rng, spk, plan, n, jitter=0.5), rng.uniform(4000, 6500),
                                      rng.uniform(-35, -20))
    if system == "A04":
        return gan_artefacts(rng, render(rng, spk, plan, n), int(rng.choice([200, 256])), rng.uniform(0.05, 0.2),
                             rng.uniform(-40, -30))
    if system == "A05":
        return render(rng, spk, plan, n, formant_glide=False, unit_f0_jumps=1.5, unit_phase_reset=True,
                      voicing_ramp=0.003)
    if system == "A06":
        return codec_artefacts(rng, render(rng, spk, plan, n), rng.uniform(0.25, 0.5), rng.uniform(1.5, 3.0),
                               int(rng.integers(6, 9)))
    raise ValueError(f"unknown synthetic system {system!r}; known: bonafide, {', '.join(ATTACKS)}")


# ------------------------------------------------------------------------------- channel

def _pink(rng, n):
    X = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / FS)
    X /= np.sqrt(np.maximum(f, 20.0))
    y = np.fft.irfft(X, n)
    return y / _rms(y)


def _random_eq(rng, x, max_db):
    n = len(x)
    X = np.fft.rfft(x)
    f = np.fft.rfftfreq(n, 1 / FS)
    knots = np.geomspace(50, FS / 2, 7)
    gains = rng.uniform(-max_db, max_db, 7)
    g = np.interp(np.log(np.maximum(f, 50)), np.log(knots), gains)
    return np.fft.irfft(X * 10 ** (g / 20), n)


def _bandpass(x, lo, hi):
    n = len(x)
    X = np.fft.rfft(x)
    f = np.fft.rfftfreq(n, 1 / FS)
    m = np.clip((f - lo) / 100 + 1, 0, 1) * np.clip((hi - f) / 200 + 1, 0, 1) if lo > 0 else np.clip((hi - f) / 200 + 1, 0, 1)
    return np.fft.irfft(X * m, n)


def channel(rng, x, kind):
    """The recording channel, identical in distribution for bona fide and spoof."""
    n = len(x)
    if kind == "studio":
        x = _random_eq(rng, x, 2.0)
        if rng.random() < 0.5:
            x = _bandpass(x, 0, rng.uniform(7000, 8000))
        snr = rng.uniform(30, 55)
        noise = 0.5 * rng.standard_normal(n) / 1.0 + 0.5 * _pink(rng, n)
    elif kind == "wild":
        if rng.random() < 0.6:  # reverberation: exponentially decaying noise tail
            rt60 = rng.uniform(0.15, 0.7)
            L = int(rt60 * FS)
            rir = rng.standard_normal(L) * np.exp(-6.9 * np.arange(L) / L)
            rir[0] = rng.uniform(2, 8) * _rms(rir) * math.sqrt(L) / 10
            x = np.fft.irfft(np.fft.rfft(x, 2 * n + L) * np.fft.rfft(rir, 2 * n + L))[:n]
        x = _random_eq(rng, x, 6.0)
        if rng.random() < 0.3:
            x = _bandpass(x, 300, 3400)
        snr = rng.uniform(5, 20)
        babble = _pink(rng, n) * (1 + 0.6 * np.sin(2 * np.pi * rng.uniform(2, 6) * np.arange(n) / FS))
        noise = babble / _rms(babble)
    else:
        raise ValueError(f"unknown channel {kind!r}; use studio or wild")
    x = x / _rms(x)
    x = x + noise / _rms(noise) * 10 ** (-snr / 20)
    if kind == "wild" and rng.random() < 0.2:
        lim = rng.uniform(0.3, 0.7) * np.abs(x).max()
        x = np.clip(x, -lim, lim)
    level = 10 ** (rng.uniform(-26, -18) / 20)
    x = x / _rms(x) * level
    peak = np.abs(x).max()
    return x * (0.99 / peak) if peak > 0.99 else x


# -------------------------------------------------------------------------------- corpus

def split_layout(spec):
    """[(system, speaker index)] in utterance order: bona fide first, then attack blocks."""
    out = [("bonafide", i % spec["speakers"]) for i in range(spec["bonafide"])]
    for a in spec["attacks"]:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r} in the synthetic corpus; known: {', '.join(ATTACKS)}")
        out += [(a, i % spec["speakers"]) for i in range(spec["per_attack"])]
    return out


def generate_utterance(seed, split, index, system, speaker, n_samples, channel_kind):
    spk = make_speaker(np.random.default_rng(_seed(seed, split, "speaker", speaker)))
    rng = np.random.default_rng(_seed(seed, split, index))
    x = synthesize(rng, spk, n_samples, system)
    return channel(rng, x, channel_kind).astype(np.float32)


def _render_utterances(seed, split, items, n_samples, channel_kind):
    """(index, system, speaker) items -> their waveforms, (len(items), n_samples) float32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny STFTs: thread start-up costs far more than the work
    try:
        return np.stack([generate_utterance(seed, split, i, system, spk, n_samples, channel_kind)
                         for i, system, spk in items]) if items else np.zeros((0, n_samples), np.float32)
    finally:
        torch.set_num_threads(threads)


def _worker_count(n_items):
    """Processes for generating a corpus: every core for a large one, none (in this process)
    inside a distributed job, a worker process or on one core."""
    import multiprocessing
    cores = os.cpu_count() or 1
    if n_items < 64 or cores < 2 or "WORLD_SIZE" in os.environ or multiprocessing.current_process().daemon:
        return 0
    return cores


def generate_split(seed, split, spec, n_samples, progress=None, workers=None):
    """dict(waves float32 (N, T), labels (1 = bona fide), attacks, utt_ids, speakers)."""
    return generate_splits(seed, {split: spec}, n_samples, progress, workers)[split]


def generate_splits(seed, splits, n_samples, progress=None, workers=None):
    """{split: generate_split's dict} for ``splits`` ({name: spec}). Each utterance depends
    only on (seed, split, index), so ``workers`` processes (default: every core for a large
    corpus) generate the same waveforms as one, bit for bit; one pool serves every split, so
    its processes start (and import torch) once."""
    jobs = {}  # split -> (layout, chunks of (index, system, speaker) items)
    for split, spec in splits.items():
        layout = split_layout(spec)
        items = [(i, system, spk) for i, (system, spk) in enumerate(layout)]
        jobs[split] = layout, [items[c:c + 16] for c in range(0, len(items), 16)]
    n_items = sum(len(layout) for layout, _ in jobs.values())
    workers = _worker_count(n_items) if workers is None else workers
    waves = {split: np.zeros((len(layout), n_samples), dtype=np.float32) for split, (layout, _) in jobs.items()}
    pool = None
    if workers > 1:
        import concurrent.futures
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        # every chunk is queued before any result is awaited: the pool never idles between splits
        pending = {split: [pool.submit(_render_utterances, seed, split, ch, n_samples, splits[split]["channel"])
                           for ch in chunks] if pool else chunks for split, (_, chunks) in jobs.items()}
        for split, (_, chunks) in jobs.items():
            todo = pending[split]
            done = todo if progress is None else progress(todo, desc=f"synth {split}")
            for ch, x in zip(chunks, done):
                waves[split][ch[0][0]:ch[-1][0] + 1] = x.result() if pool else \
                    _render_utterances(seed, split, x, n_samples, splits[split]["channel"])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    out = {}
    for split, (layout, _) in jobs.items():
        key = _SPLIT_KEY.get(split, split[:1].upper())
        out[split] = {
            "waves": torch.from_numpy(waves[split]),
            "labels": torch.tensor([1 if s == "bonafide" else 0 for s, _ in layout]),
            "attacks": ["-" if s == "bonafide" else s for s, _ in layout],
            "utt_ids": [f"SYN_{key}_{i:05d}" for i in range(len(layout))],
            "speakers": [f"SPK_{key}_{k:03d}" for _, k in layout],
        }
    return out


def corpus_key(seed, n_samples, splits):
    blob = json.dumps({"v": VERSION, "seed": int(seed), "n": int(n_samples), "splits": splits}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def default_cache_dir():
    return os.environ.get("ROGA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "roga_cuda")


def load_corpus(seed=0, n_samples=16000, splits=None, cache_dir=None, progress=None, log=print):
    """All splits, generated once and cached as ``<cache_dir>/speech_synth/<key>.pt``
    (cache_dir False/'' disables caching)."""
    splits = splits or DEFAULT_SPLITS
    key = corpus_key(seed, n_samples, splits)
    path = None
    if cache_dir is None:
        cache_dir = default_cache_dir()
    if cache_dir:
        path = os.path.join(cache_dir, "speech_synth", f"{key}.pt")
        if os.path.isfile(path):
            try:
                return torch.load(path, weights_only=True)
            except Exception as e:  # a corrupt cache is regenerated, not fatal
                log(f"synthetic corpus cache {path} unreadable ({type(e).__name__}); regenerating")
    out = generate_splits(seed, splits, n_samples, progress)
    if path:
        from ..common.checkpoint import save_checkpoint
        try:
            save_checkpoint(path, out)
        except OSError as e:
            log(f"could not cache the synthetic corpus at {path}: {e}")
    return out
