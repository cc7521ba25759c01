"""RawBoost (Tak et al., ICASSP 2022) in torch: batched, on the waveform's device, seeded.

Three degradations of a raw waveform, with the reference implementation's default
parameters (see :class:`RawBoostConfig`):

1. **LnL** linear and non-linear convolutive noise: ``y = sum_{i=1..N_f} h_i * x^i``, each
   ``h_i`` a cascade of ``n_bands`` band-stop (notch) FIR filters (windowed sinc, Hamming
   window, random centre frequency, width and odd length), scaled to a peak gain of
   ``G_i`` dB drawn as the reference code does (:func:`lnl_gains`): ``G_1`` uniform between
   ``min_g`` and ``max_g``, the non-linear terms uniform between ``min_g - min_bias`` and
   ``max_g - max_bias`` (defaults: -5 and -20 dB); then mean removed and peak-normalised
   when it exceeds 1.
2. **ISD** impulsive signal-dependent noise: a fraction ``beta ~ U[0, P]`` % of the samples
   (chosen without replacement) become ``x + g_sd * x * z``, ``z`` a product of two
   uniforms on [-1, 1]; then peak-normalised when it exceeds 1.
3. **SSI** stationary signal-independent noise: white Gaussian noise through a notch
   cascade like LnL's (gain ``U[min_g, max_g]``), added at ``SNR ~ U[snr_min, snr_max]`` dB.

Configurations (the reference ``--algo``): 0 none, 1 LnL, 2 ISD, 3 SSI, 4 = 1+2+3 in
series, 5 = 1+2, 6 = 1+3, 7 = 2+3 (series), 8 = 1 and 2 in parallel (sum of LnL(x) and
ISD(x), peak-normalised when it exceeds 1).

Differences from the per-utterance numpy reference, all deliberate:
- every utterance of a batch gets its own random parameters, drawn from one
  ``torch.Generator`` on the batch's device (same seed, same device: same output);
- FIR filtering is linear-phase with its group delay removed exactly (centred), with zero
  padding at both ends; the reference's ``filterFIR`` is off by one sample;
- the batch is augmented after cropping/padding to a fixed length (batching needs it);
- SSI's intermediate peak normalisation of the noise is skipped: the noise is rescaled to
  the drawn SNR right after, so it cancels.

Each component is split into *draw parameters* and *apply*, so the tests can compare
``apply`` with an independent float64 implementation on the same parameters.
"""
from dataclasses import asdict, dataclass, fields

import torch

ALGOS = {0: (), 1: ("lnl",), 2: ("isd",), 3: ("ssi",), 4: ("lnl", "isd", "ssi"),
         5: ("lnl", "isd"), 6: ("lnl", "ssi"), 7: ("isd", "ssi"), 8: ("lnl||isd",)}
ALGO_NAMES = {0: "none", 1: "LnL", 2: "ISD", 3: "SSI", 4: "LnL+ISD+SSI (series)", 5: "LnL+ISD (series)",
              6: "LnL+SSI (series)", 7: "ISD+SSI (series)", 8: "LnL||ISD (parallel)"}

# scipy.signal.freqz's default grid: 512 frequencies in [0, pi), the reference's gain normalisation
_FREQZ_POINTS = 512


@dataclass
class RawBoostConfig:
    """Defaults are those of the RawBoost reference code's command line."""
    # LnL convolutive noise (the notch-filter parameters are shared with SSI, as in the reference)
    n_f: int = 5                   # order of the (non-)linearity; 1 = linear only
    n_bands: int = 5               # notch filters per cascade
    min_f: float = 20.0            # centre frequency range [Hz]
    max_f: float = 8000.0
    min_bw: float = 100.0          # notch width range [Hz]
    max_bw: float = 1000.0
    min_coeff: int = 10            # filter length range (made odd)
    max_coeff: int = 100
    min_g: float = 0.0             # peak gain of the linear term [dB]
    max_g: float = 0.0
    min_bias_lin_nonlin: float = 5.0   # gain difference linear vs non-linear terms [dB]
    max_bias_lin_nonlin: float = 20.0
    # ISD impulsive noise
    p: float = 10.0                # at most p % of the samples are hit
    g_sd: float = 2.0              # gain of the impulsive noise
    # SSI coloured additive noise
    snr_min: float = 10.0          # [dB]
    snr_max: float = 40.0
    fs: int = 16000

    def __post_init__(self):
        nyq = self.fs / 2
        if self.fs <= 0:
            raise ValueError(f"RawBoostConfig: fs must be > 0, got {self.fs}")
        if self.n_f < 1 or self.n_bands < 1:
            raise ValueError(f"RawBoostConfig: n_f and n_bands must be >= 1, got {self.n_f}, {self.n_bands}")
        if not 0 < self.min_f <= self.max_f <= nyq:
            raise ValueError(f"RawBoostConfig: need 0 < min_f <= max_f <= fs/2 = {nyq:g} Hz, "
                             f"got min_f={self.min_f}, max_f={self.max_f}")
        if not 0 < self.min_bw <= self.max_bw:
            raise ValueError(f"RawBoostConfig: need 0 < min_bw <= max_bw, got {self.min_bw}, {self.max_bw}")
        if not 2 <= self.min_coeff <= self.max_coeff:
            raise ValueError(f"RawBoostConfig: need 2 <= min_coeff <= max_coeff, got {self.min_coeff}, {self.max_coeff}")
        if not 0 <= self.p <= 100:
            raise ValueError(f"RawBoostConfig: p is a percentage in [0, 100], got {self.p}")
        if self.snr_min > self.snr_max:
            raise ValueError(f"RawBoostConfig: snr_min > snr_max ({self.snr_min} > {self.snr_max})")

    @classmethod
    def from_dict(cls, d):
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RawBoostConfig: unknown parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self):
        return asdict(self)

    @property
    def max_taps(self):
        """Longest single notch filter: lengths are floor(U[min, max)) made odd."""
        return self.max_coeff | 1


# ----------------------------------------------------------------------- helpers

def _uniform(shape, lo, hi, gen, device):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device, dtype=torch.float64)


def peak_normalise(y, always=False):
    """Divide each row by its peak magnitude (always, or only where the peak exceeds 1)."""
    peak = y.abs().amax(dim=-1, keepdim=True)
    if always:
        return y / peak.clamp_min(torch.finfo(y.dtype).tiny)
    return torch.where(peak > 1, y / peak.clamp_min(1), y)


def _fft_len(n):
    """Smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


# ------------------------------------------------------------------ notch filters

def draw_notch_params(batch, cfg, gen, device, n_cascades=1):
    """Random notch parameters, shape (batch, n_cascades, n_bands): centre fc [Hz], width bw
    [Hz] and odd length ntaps, as the reference draws them."""
    shape = (batch, n_cascades, cfg.n_bands)
    fc = _uniform(shape, cfg.min_f, cfg.max_f, gen, device)
    bw = _uniform(shape, cfg.min_bw, cfg.max_bw, gen, device)
    ntaps = _uniform(shape, cfg.min_coeff, cfg.max_coeff, gen, device).floor().long()
    ntaps = ntaps + (ntaps % 2 == 0).long()  # band-stop FIRs need an odd length
    return fc, bw, ntaps


def notch_cascade(fc, bw, ntaps, gain_db, fs, max_taps=None):
    """FIR taps of a cascade of band-stop filters with a given peak gain.

    fc, bw, ntaps: (..., n_bands); gain_db: (...). Each band is a Hamming-windowed ideal
    band-stop with edges ``fc -+ bw/2`` (clipped to (0, fs/2)), normalised to unit DC gain
    (scipy.signal.firwin's construction); the cascade is scaled so the peak of its
    magnitude response on freqz's 512-point grid is ``gain_db``. Returns float64 taps
    (..., L), centred: linear phase with delay (L - 1) / 2, ``L = n_bands * (max_taps - 1) + 1``.
    """
    device = fc.device
    nyq = fs / 2
    max_taps = int(ntaps.max()) | 1 if max_taps is None else int(max_taps)
    if int(ntaps.max()) > max_taps:
        raise ValueError(f"notch_cascade: a filter has {int(ntaps.max())} taps > max_taps={max_taps}")
    half = (max_taps - 1) // 2
    m = torch.arange(-half, half + 1, device=device, dtype=torch.float64)      # centred tap index
    f1 = (fc - bw / 2).clamp_min(1e-3) / nyq
    f2 = (fc + bw / 2).clamp_max(nyq - 1e-3) / nyq
    f1, f2 = f1[..., None], f2[..., None]
    # band-stop = pass [0, f1] + pass [f2, 1]; sinc(m) is the unit impulse at integer m
    h = torch.sinc(m) - f2 * torch.sinc(f2 * m) + f1 * torch.sinc(f1 * m)
    hw = (ntaps[..., None] - 1) / 2                                             # half length per filter
    win = 0.54 + 0.46 * torch.cos(torch.pi * m / hw)                            # symmetric Hamming, centred
    h = torch.where(m.abs() <= hw, h * win, torch.zeros_like(h))
    h = h / h.sum(dim=-1, keepdim=True)                                         # unit gain at DC
    # cascade = product of the bands' spectra (exact: FFT length >= cascade length)
    n_bands = fc.shape[-1]
    length = n_bands * (max_taps - 1) + 1
    nfft = 2 * _FREQZ_POINTS
    while nfft < length:
        nfft *= 2
    spec = torch.fft.rfft(h, n=nfft, dim=-1).prod(dim=-2)                      # (..., nfft//2+1)
    taps = torch.fft.irfft(spec, n=nfft, dim=-1)[..., :length]
    # peak |H| on freqz's grid w = pi k / 512, k < 512 (the centring delay does not change |H|)
    peak = spec[..., : nfft // 2 : nfft // (2 * _FREQZ_POINTS)].abs().amax(dim=-1)
    scale = torch.pow(10.0, gain_db / 20) / peak
    return taps * scale[..., None]


def fir_filter(x, taps):
    """Apply centred (zero-phase-delay) FIR taps per row: ``y[n] = sum_k taps[k] x[n + c - k]``,
    c = (L - 1) / 2, zeros outside the signal. x: (B, T); taps: (B, L) or (B, K, L) with x
    given as (B, K, T) (summed over K). FFT convolution in float64."""
    L = taps.shape[-1]
    T = x.shape[-1]
    c = (L - 1) // 2
    nfft = _fft_len(T + L - 1)
    X = torch.fft.rfft(x.double(), n=nfft, dim=-1)
    Hf = torch.fft.rfft(taps, n=nfft, dim=-1)
    Y = X * Hf
    if Y.dim() == 3:
        Y = Y.sum(dim=1)
    return torch.fft.irfft(Y, n=nfft, dim=-1)[..., c:c + T]


# ------------------------------------------------------------------------- LnL

def lnl_gains(u, cfg):
    """Peak gains [dB] of the LnL terms from uniform draws ``u`` (..., n_f) in [0, 1), mapped
    as the reference code maps its draws: its loop shifts both gain bounds once, at the first
    non-linear term (``min_g - min_bias``, ``max_g - max_bias``), and each term draws
    ``numpy.random.uniform(low, high) = low + (high - low) u`` (valid for low > high too:
    the defaults give low = -5, high = -20 for the non-linear terms)."""
    low = torch.full(u.shape[-1:], float(cfg.min_g), dtype=torch.float64, device=u.device)
    high = torch.full(u.shape[-1:], float(cfg.max_g), dtype=torch.float64, device=u.device)
    low[1:] -= cfg.min_bias_lin_nonlin
    high[1:] -= cfg.max_bias_lin_nonlin
    return low + (high - low) * u


def draw_lnl_params(batch, cfg, gen, device):
    fc, bw, ntaps = draw_notch_params(batch, cfg, gen, device, n_cascades=cfg.n_f)
    u = torch.empty(batch, cfg.n_f, dtype=torch.float64, device=device)
    u[:, 0] = torch.rand(batch, generator=gen, device=device, dtype=torch.float64)
    if cfg.n_f > 1:
        u[:, 1:] = torch.rand(batch, cfg.n_f - 1, generator=gen, device=device, dtype=torch.float64)
    return {"fc": fc, "bw": bw, "ntaps": ntaps, "gain_db": lnl_gains(u, cfg)}


def lnl_apply(x, params, cfg):
    taps = notch_cascade(params["fc"], params["bw"], params["ntaps"], params["gain_db"], cfg.fs, cfg.max_taps)
    xd = x.double()
    powers = torch.stack([xd ** (i + 1) for i in range(cfg.n_f)], dim=1)        # (B, N_f, T)
    y = fir_filter(powers, taps)
    y = y - y.mean(dim=-1, keepdim=True)
    return peak_normalise(y).to(x.dtype)


def lnl_convolutive_noise(x, cfg=None, generator=None, return_params=False):
    cfg = cfg or RawBoostConfig()
    params = draw_lnl_params(x.shape[0], cfg, generator, x.device)
    y = lnl_apply(x, params, cfg)
    return (y, params) if return_params else y


# ------------------------------------------------------------------------- ISD

def draw_isd_params(batch, length, cfg, gen, device):
    beta = _uniform((batch,), 0.0, cfg.p, gen, device)                          # percent of samples
    n_hit = (length * (beta / 100)).floor().long()
    # the first n_hit entries of a random permutation = the n_hit smallest of i.i.d. uniform keys
    keys = torch.rand(batch, length, generator=gen, device=device)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    k_max = min(length, int(length * cfg.p / 100))  # upper bound of n_hit, known without a device sync
    if k_max > 0:
        idx = keys.topk(k_max, dim=-1, largest=False, sorted=True).indices
        mask.scatter_(1, idx, torch.arange(k_max, device=device) < n_hit[:, None])
    u = torch.rand(2, batch, length, generator=gen, device=device, dtype=torch.float64)
    z = (2 * u[0] - 1) * (2 * u[1] - 1)
    return {"beta": beta, "mask": mask, "z": z}


def isd_apply(x, params, cfg):
    xd = x.double()
    y = torch.where(params["mask"], xd + cfg.g_sd * xd * params["z"], xd)
    return peak_normalise(y).to(x.dtype)


def isd_additive_noise(x, cfg=None, generator=None, return_params=False):
    cfg = cfg or RawBoostConfig()
    params = draw_isd_params(x.shape[0], x.shape[-1], cfg, generator, x.device)
    y = isd_apply(x, params, cfg)
    return (y, params) if return_params else y


# ------------------------------------------------------------------------- SSI

def draw_ssi_params(batch, length, cfg, gen, device):
    fc, bw, ntaps = draw_notch_params(batch, cfg, gen, device, n_cascades=1)
    g = _uniform((batch, 1), cfg.min_g, cfg.max_g, gen, device)
    noise = torch.randn(batch, length, generator=gen, device=device, dtype=torch.float64)
    snr = _uniform((batch,), cfg.snr_min, cfg.snr_max, gen, device)
    return {"fc": fc, "bw": bw, "ntaps": ntaps, "gain_db": g, "noise": noise, "snr_db": snr}


def ssi_apply(x, params, cfg):
    taps = notch_cascade(params["fc"], params["bw"], params["ntaps"], params["gain_db"], cfg.fs, cfg.max_taps)[:, 0]
    noise = fir_filter(params["noise"], taps)
    xd = x.double()
    tiny = torch.finfo(torch.float64).tiny
    scale = xd.norm(dim=-1) / (noise.norm(dim=-1).clamp_min(tiny) * torch.pow(10.0, params["snr_db"] / 20))
    return (xd + noise * scale[:, None]).to(x.dtype)


def ssi_additive_noise(x, cfg=None, generator=None, return_params=False):
    cfg = cfg or RawBoostConfig()
    params = draw_ssi_params(x.shape[0], x.shape[-1], cfg, generator, x.device)
    y = ssi_apply(x, params, cfg)
    return (y, params) if return_params else y


# ------------------------------------------------------------------ configurations

_COMPONENTS = {"lnl": lnl_convolutive_noise, "isd": isd_additive_noise, "ssi": ssi_additive_noise}


def rawboost(x, algo=4, cfg=None, generator=None):
    """Apply RawBoost configuration ``algo`` (0-8) to a batch of waveforms x: (B, T) or (T,).

    Runs on x's device; ``generator`` must live on that device (None: the global RNG)."""
    if algo not in ALGOS:
        raise ValueError(f"rawboost: algo must be one of {sorted(ALGOS)} "
                         f"({', '.join(f'{k}={v}' for k, v in ALGO_NAMES.items())}), got {algo!r}")
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError("rawboost: x must be a floating-point tensor of waveforms, shape (batch, samples)")
    squeeze = x.dim() == 1
    if squeeze:
        x = x[None]
    if x.dim() != 2:
        raise ValueError(f"rawboost: x must have shape (batch, samples) or (samples,), got {tuple(x.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"rawboost: generator is on {generator.device}, waveforms on {x.device}")
    cfg = cfg or RawBoostConfig()
    y = x
    for step in ALGOS[algo]:
        if step == "lnl||isd":
            y = peak_normalise(lnl_convolutive_noise(y, cfg, generator).double()
                               + isd_additive_noise(y, cfg, generator).double()).to(x.dtype)
        else:
            y = _COMPONENTS[step](y, cfg, generator)
    return y[0] if squeeze else y


class RawBoost:
    """Callable batch augmenter with its own generator on the batch's device.

    ``reseed(seed)`` makes the next calls a pure function of ``seed`` (the trainer reseeds
    per step from (seed, epoch, step), so a resumed run augments exactly as an
    uninterrupted one)."""

    def __init__(self, algo=4, cfg=None, seed=0):
        if algo not in ALGOS:
            raise ValueError(f"RawBoost: algo must be one of {sorted(ALGOS)}, got {algo!r}")
        self.algo = algo
        self.cfg = cfg if isinstance(cfg, RawBoostConfig) else RawBoostConfig.from_dict(cfg)
        self.seed = int(seed)
        self._gens = {}

    def _gen(self, device):
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[key]

    def reseed(self, seed):
        self.seed = int(seed)
        for g in self._gens.values():
            g.manual_seed(self.seed)

    @torch.no_grad()
    def __call__(self, x):
        return rawboost(x, self.algo, self.cfg, self._gen(x.device))

    def __repr__(self):
        return f"RawBoost(algo={self.algo} [{ALGO_NAMES[self.algo]}], seed={self.seed})"
