"""RawBoost in torch vs float64 references written here from the algorithm's description.

The description (Tak et al., ICASSP 2022, and the reference code's documented behaviour):
- a notch cascade: per band, an odd-length (floor(U[min_coeff, max_coeff)), +1 if even)
  Hamming-windowed ideal band-stop FIR with edges fc -+ bw/2 (clipped to (0, fs/2)), scaled to
  unit gain at DC; bands convolved; the cascade scaled to a peak |H| of G dB on the 512-point
  grid w = pi k / 512;
- LnL: sum_i filter_i(x^i), i = 1..N_f, minus its mean, divided by its peak when that exceeds 1; the
  gains as the reference code draws them (its formula restated in float64 below);
- ISD: floor(T beta / 100) samples (beta ~ U[0, P]) become x + g_sd x z; peak-normalised when > 1;
- SSI: filtered white noise scaled to ||x|| / 10^(SNR/20), added.
Filtering here is the centred (zero-delay) linear-phase convolution with zero padding.
"""
import math

import numpy as np
import pytest
import torch

from roga_cuda.apps.speech import rawboost as rb
from roga_cuda.apps.speech.rawboost import RawBoost, RawBoostConfig

FS = 16000


# ------------------------------------------------------------------ float64 references

def ref_bandstop(ntaps, f1, f2, fs):
    """Windowed-sinc band-stop: ideal response = lowpass(f1) + highpass(f2), Hamming window,
    unit DC gain. Written with explicit sums over the taps."""
    nyq = fs / 2.0
    a, b = f1 / nyq, f2 / nyq
    half = (ntaps - 1) / 2.0
    h = np.zeros(ntaps)
    for n in range(ntaps):
        m = n - half
        ideal = (1.0 if m == 0 else 0.0) - b * np.sinc(b * m) + a * np.sinc(a * m)
        w = 0.54 - 0.46 * math.cos(2 * math.pi * n / (ntaps - 1))
        h[n] = ideal * w
    return h / h.sum()


def ref_response(b, points=512):
    """|H(e^{jw})| at w = pi k / points, k < points, by the DTFT sum."""
    w = np.pi * np.arange(points) / points
    n = np.arange(len(b))
    return np.abs(np.exp(-1j * np.outer(w, n)) @ b)


def ref_cascade(fc, bw, ntaps, gain_db, fs):
    b = np.array([1.0])
    for f, w, c in zip(fc, bw, ntaps):
        f1 = max(f - w / 2, 1e-3)
        f2 = min(f + w / 2, fs / 2 - 1e-3)
        b = np.convolve(b, ref_bandstop(int(c), f1, f2, fs))
    return b * 10 ** (gain_db / 20) / ref_response(b).max()


def ref_filter(x, b):
    """Centred convolution: y[n] = sum_k b[k] x[n + (L-1)/2 - k]."""
    c = (len(b) - 1) // 2
    return np.convolve(x, b)[c:c + len(x)]


def centre(taps_padded, b):
    """Place the true-length cascade b in the centre of a padded vector like taps_padded."""
    out = np.zeros_like(taps_padded)
    c, h = (len(out) - 1) // 2, (len(b) - 1) // 2
    out[c - h:c + h + 1] = b
    return out


def _x(batch=3, n=2000, seed=0, amp=0.3):
    g = torch.Generator().manual_seed(seed)
    return amp * torch.randn(batch, n, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------- notches

def test_defaults_are_the_reference_defaults():
    c = RawBoostConfig()
    assert (c.n_f, c.n_bands, c.min_f, c.max_f, c.min_bw, c.max_bw, c.min_coeff, c.max_coeff) == \
        (5, 5, 20, 8000, 100, 1000, 10, 100)
    assert (c.min_g, c.max_g, c.min_bias_lin_nonlin, c.max_bias_lin_nonlin) == (0, 0, 5, 20)
    assert (c.p, c.g_sd, c.snr_min, c.snr_max, c.fs) == (10, 2, 10, 40, 16000)
    assert c.max_taps == 101


def test_notch_cascade_matches_reference():
    cfg = RawBoostConfig()
    g = torch.Generator().manual_seed(3)
    fc, bw, nt = rb.draw_notch_params(4, cfg, g, "cpu", n_cascades=2)
    gain = torch.tensor([[0.0, -7.5], [-3.0, -20.0], [0.0, 0.0], [-12.0, -5.0]], dtype=torch.float64)
    fc[0, 0, 0] = 10.0            # edge clipped at 0 Hz
    fc[1, 0, 1], bw[1, 0, 1] = 7990.0, 900.0  # edge clipped at fs/2
    taps = rb.notch_cascade(fc, bw, nt, gain, FS, cfg.max_taps)
    assert taps.shape == (4, 2, 5 * (cfg.max_taps - 1) + 1)
    for i in range(4):
        for j in range(2):
            ref = ref_cascade(fc[i, j].numpy(), bw[i, j].numpy(), nt[i, j].numpy(), gain[i, j].item(), FS)
            np.testing.assert_allclose(taps[i, j].numpy(), centre(taps[i, j].numpy(), ref), atol=1e-12)


def test_bandstop_matches_scipy_firwin():
    signal = pytest.importorskip("scipy.signal")
    for ntaps, f1, f2 in [(11, 300.0, 1200.0), (51, 1e-3, 450.0), (99, 7500.0, 8000 - 1e-3), (37, 2000, 2100)]:
        np.testing.assert_allclose(ref_bandstop(ntaps, f1, f2, FS),
                                   signal.firwin(ntaps, [f1, f2], window="hamming", fs=FS), atol=1e-12)


def test_draws_follow_the_configured_ranges():
    cfg = RawBoostConfig()
    g = torch.Generator().manual_seed(0)
    fc, bw, nt = rb.draw_notch_params(500, cfg, g, "cpu")
    assert fc.min() >= 20 and fc.max() <= 8000 and bw.min() >= 100 and bw.max() <= 1000
    assert (nt % 2 == 1).all() and nt.min() >= 11 and nt.max() <= 99
    assert set(nt.unique().tolist()) == set(range(11, 100, 2))  # every odd length is reachable
    p = rb.draw_lnl_params(400, cfg, g, "cpu")
    assert (p["gain_db"][:, 0] == 0).all()                      # linear term: U[min_g, max_g] = 0 dB
    nl = p["gain_db"][:, 1:]
    assert nl.min() >= -20 and nl.max() <= -5 and nl.max() > -6 and nl.min() < -19  # between -5 and -20


def original_lnl_gains(rs, n_f, min_g, max_g, min_bias, max_bias):
    """The reference LnL_convolutive_noise's gains for one utterance, in float64: its loop
    shifts both bounds once, at i == 1, and genNotchCoeffs draws G = numpy uniform(minG, maxG)."""
    gains = []
    for i in range(n_f):
        if i == 1:
            min_g, max_g = min_g - min_bias, max_g - max_bias
        gains.append(rs.uniform(min_g, max_g))
    return gains


@pytest.mark.parametrize("min_g,max_g,min_bias,max_bias,n_f", [
    (0.0, 10.0, 5.0, 20.0, 5), (-10.0, 10.0, 5.0, 20.0, 5), (0.0, 0.0, 5.0, 20.0, 5), (3.0, 3.0, 2.0, 30.0, 3),
    (-4.0, 6.0, 0.0, 0.0, 4), (5.0, -5.0, 1.0, 2.0, 2), (0.0, 10.0, 5.0, 20.0, 1)])
def test_lnl_gains_follow_the_reference_formula(min_g, max_g, min_bias, max_bias, n_f):
    """With the same uniform draws (numpy's, in the reference's order), lnl_gains gives the
    reference's gains for every gain range, including non-default ones."""
    cfg = RawBoostConfig(n_f=n_f, min_g=min_g, max_g=max_g, min_bias_lin_nonlin=min_bias,
                         max_bias_lin_nonlin=max_bias)
    batch, seed = 64, 7
    rs = np.random.RandomState(seed)
    want = np.array([original_lnl_gains(rs, n_f, min_g, max_g, min_bias, max_bias) for _ in range(batch)])
    u = np.random.RandomState(seed).random_sample((batch, n_f))   # the draws numpy's uniform made above
    got = rb.lnl_gains(torch.from_numpy(u), cfg).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # the ranges the issue measured on the reference: (0, 10) -> [-10, -5], (-10, 10) -> [-15, -10]
    if (min_g, max_g, min_bias, max_bias) == (0.0, 10.0, 5.0, 20.0) and n_f > 1:
        assert want[:, 1:].min() >= -10 and want[:, 1:].max() <= -5
    if (min_g, max_g) == (-10.0, 10.0):
        assert want[:, 1:].min() >= -15 and want[:, 1:].max() <= -10


def test_lnl_draws_cover_the_reference_ranges():
    """draw_lnl_params: the linear term between min_g and max_g, every non-linear term between
    min_g - min_bias and max_g - max_bias, both ends approached."""
    for (min_g, max_g), (lo, hi) in [((0.0, 10.0), (-10.0, -5.0)), ((-10.0, 10.0), (-15.0, -10.0))]:
        cfg = RawBoostConfig(min_g=min_g, max_g=max_g)
        g = rb.draw_lnl_params(2000, cfg, torch.Generator().manual_seed(1), "cpu")["gain_db"]
        lin, nl = g[:, 0], g[:, 1:]
        assert lin.min() >= min_g and lin.max() <= max_g and lin.min() < min_g + 0.1 and lin.max() > max_g - 0.1
        assert nl.min() >= lo and nl.max() <= hi and nl.min() < lo + 0.1 and nl.max() > hi - 0.1


@pytest.mark.parametrize("ntaps,fc,bw", [(99, 1000.0, 800.0), (99, 4000.0, 600.0), (81, 6500.0, 1000.0)])
def test_notch_frequency_response_has_the_configured_shape(ntaps, fc, bw):
    """A single long notch: deep at fc, flat (0 dB before the gain) well outside the band,
    and its peak on the freqz grid is exactly the configured gain."""
    t = lambda v, dt=torch.float64: torch.tensor([[[v]]], dtype=dt)  # noqa: E731
    for gain in (0.0, -6.0):
        taps = rb.notch_cascade(t(fc), t(bw), t(ntaps, torch.long), torch.tensor([[gain]], dtype=torch.float64),
                                FS, ntaps)[0, 0].numpy()
        f = np.arange(8192) * (FS / 2) / 8192
        H = 20 * np.log10(np.abs(np.fft.rfft(taps, 16384))[:8192] + 1e-300)
        assert abs(20 * np.log10(ref_response(taps).max()) - gain) < 1e-9
        assert H[np.argmin(np.abs(f - fc))] < gain - 25                              # the notch
        trans = 3.3 * FS / ntaps                                                       # Hamming transition width
        far = (np.abs(f - fc) > bw / 2 + trans) & (f > trans) & (f < FS / 2 - trans)
        assert np.all(np.abs(H[far] - gain) < 1.0)                                      # flat elsewhere
        inside = np.abs(f - fc) < max(bw / 2 - trans / 2, 0)
        if inside.any():
            assert np.all(H[inside] < gain - 15)                                       # stop band


def test_fir_filter_is_centred_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, generator=g, dtype=torch.float64)
    taps = torch.randn(2, 41, generator=g, dtype=torch.float64)
    y = rb.fir_filter(x, taps)
    for i in range(2):
        np.testing.assert_allclose(y[i].numpy(), ref_filter(x[i].numpy(), taps[i].numpy()), atol=1e-12)


# ----------------------------------------------------------------------------- components

def test_lnl_matches_reference():
    cfg = RawBoostConfig()
    for amp in (0.3, 3.0):  # without and with the final peak normalisation
        x = _x(amp=amp)
        y, p = rb.lnl_convolutive_noise(x, cfg, torch.Generator().manual_seed(5), return_params=True)
        for i in range(x.shape[0]):
            xi = x[i].numpy()
            acc = np.zeros_like(xi)
            for k in range(cfg.n_f):
                b = ref_cascade(p["fc"][i, k].numpy(), p["bw"][i, k].numpy(), p["ntaps"][i, k].numpy(),
                                p["gain_db"][i, k].item(), FS)
                acc += ref_filter(xi ** (k + 1), b)
            acc -= acc.mean()
            if np.abs(acc).max() > 1:
                acc /= np.abs(acc).max()
            np.testing.assert_allclose(y[i].numpy(), acc, atol=1e-10)
    assert y.dtype == x.dtype


def test_isd_matches_reference_and_hits_at_most_p_percent():
    cfg = RawBoostConfig(p=10.0, g_sd=2.0)
    x = _x(batch=8, n=5000, amp=0.05)  # small: the peak stays < 1, no normalisation
    y, p = rb.isd_additive_noise(x, cfg, torch.Generator().manual_seed(2), return_params=True)
    for i in range(8):
        n_hit = int(math.floor(5000 * p["beta"][i].item() / 100))
        mask = p["mask"][i].numpy()
        assert mask.sum() == n_hit <= 5000 * cfg.p / 100
        ref = x[i].numpy().copy()
        ref[mask] = ref[mask] + cfg.g_sd * ref[mask] * p["z"][i].numpy()[mask]
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-15)
        changed = (y[i] != x[i]).sum().item()
        assert changed <= n_hit
        assert p["z"][i].abs().max() <= 1
    # a loud input is peak-normalised after the impulses
    xl = _x(batch=2, n=3000, amp=2.0)
    yl, pl = rb.isd_additive_noise(xl, cfg, torch.Generator().manual_seed(4), return_params=True)
    raw = torch.where(pl["mask"], xl + cfg.g_sd * xl * pl["z"], xl)
    np.testing.assert_allclose(yl.numpy(), (raw / raw.abs().amax(1, keepdim=True)).numpy(), atol=1e-15)


def test_isd_fraction_statistics():
    cfg = RawBoostConfig(p=20.0)
    x = _x(batch=400, n=1000, amp=0.01, seed=9)
    _, p = rb.isd_additive_noise(x, cfg, torch.Generator().manual_seed(6), return_params=True)
    frac = p["mask"].double().mean(1)
    assert frac.max() <= 0.2 and abs(frac.mean().item() - 0.1) < 0.01  # beta ~ U[0, 20] %
    # positions uniform: each sample hit about equally often
    assert p["mask"].double().mean(0).std() < 0.05


def test_ssi_matches_reference_and_snr_in_range():
    cfg = RawBoostConfig(snr_min=10.0, snr_max=40.0)
    x = _x(batch=64, n=4000, seed=3)
    y, p = rb.ssi_additive_noise(x, cfg, torch.Generator().manual_seed(7), return_params=True)
    snr = 10 * torch.log10(x.pow(2).sum(1) / (y - x).pow(2).sum(1))
    torch.testing.assert_close(snr, p["snr_db"], atol=1e-8, rtol=0)
    assert snr.min() >= 10 and snr.max() <= 40 and snr.max() - snr.min() > 20
    for i in range(3):
        b = ref_cascade(p["fc"][i, 0].numpy(), p["bw"][i, 0].numpy(), p["ntaps"][i, 0].numpy(),
                        p["gain_db"][i, 0].item(), FS)
        nz = ref_filter(p["noise"][i].numpy(), b)
        xi = x[i].numpy()
        ref = xi + nz / np.linalg.norm(nz) * np.linalg.norm(xi) / 10 ** (p["snr_db"][i].item() / 20)
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-12)


def test_ssi_noise_is_coloured_by_the_notches():
    """The added noise has the cascade's spectrum: much less energy at the notch centres."""
    cfg = RawBoostConfig(n_bands=1, min_f=3000, max_f=3000, min_bw=1000, max_bw=1000, min_coeff=99, max_coeff=99)
    x = _x(batch=16, n=16000, seed=4)
    y = rb.ssi_additive_noise(x, cfg, torch.Generator().manual_seed(1))
    spec = torch.fft.rfft(y - x).abs().pow(2).mean(0)
    f = torch.fft.rfftfreq(16000, 1 / FS)
    notch = spec[(f - 3000).abs() < 200].mean()
    flat = spec[(f > 5000) & (f < 7000)].mean()
    assert notch < 0.01 * flat


# ------------------------------------------------------------------------ configurations

def test_configurations_compose_the_components():
    cfg = RawBoostConfig()
    x = _x(batch=4, n=3000).float()
    for algo, steps in [(1, ["lnl"]), (2, ["isd"]), (3, ["ssi"]), (4, ["lnl", "isd", "ssi"]), (5, ["lnl", "isd"]),
                        (6, ["lnl", "ssi"]), (7, ["isd", "ssi"])]:
        y = rb.rawboost(x, algo, cfg, torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        ref = x
        for s in steps:
            ref = {"lnl": rb.lnl_convolutive_noise, "isd": rb.isd_additive_noise, "ssi": rb.ssi_additive_noise}[s](ref, cfg, g)
        torch.testing.assert_close(y, ref, atol=0, rtol=0)
    g = torch.Generator().manual_seed(12)
    a = rb.lnl_convolutive_noise(x, cfg, g).double()
    b = rb.isd_additive_noise(x, cfg, g).double()
    par = a + b
    par = torch.where(par.abs().amax(1, keepdim=True) > 1, par / par.abs().amax(1, keepdim=True), par)
    torch.testing.assert_close(rb.rawboost(x, 8, cfg, torch.Generator().manual_seed(12)), par.float())
    assert torch.equal(rb.rawboost(x, 0, cfg), x)


def test_seeded_and_reproducible():
    x = _x(batch=4, n=4000).float()
    a = RawBoost(4, seed=5)(x)
    b = RawBoost(4, seed=5)(x)
    c = RawBoost(4, seed=6)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    aug = RawBoost(4, seed=1)
    first = aug(x)
    aug(x)
    aug.reseed(1)
    assert torch.equal(aug(x), first)
    # each utterance of a batch gets its own parameters
    same = x[:1].expand(3, -1).contiguous()
    out = RawBoost(1, seed=0)(same)
    assert not torch.allclose(out[0], out[1])
    assert out.dtype == torch.float32 and out.shape == same.shape and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu():
    x = _x(batch=4, n=4000).float().cuda()
    y = RawBoost(4, seed=3)(x)
    assert y.is_cuda and torch.isfinite(y).all()
    cfg = RawBoostConfig()
    g = torch.Generator(device="cuda").manual_seed(0)
    y, p = rb.lnl_convolutive_noise(x.double(), cfg, g, return_params=True)
    xc = x.double().cpu()
    pc = {k: v.cpu() for k, v in p.items()}
    torch.testing.assert_close(y.cpu(), rb.lnl_apply(xc, pc, cfg), atol=1e-9, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="algo"):
        rb.rawboost(torch.zeros(2, 100), 9)
    with pytest.raises(ValueError, match="max_f"):
        RawBoostConfig(fs=8000)  # max_f 8000 > fs/2
    with pytest.raises(ValueError, match="min_coeff"):
        RawBoostConfig(min_coeff=1)
    with pytest.raises(ValueError, match="unknown"):
        RawBoostConfig.from_dict({"nbands": 3})
    with pytest.raises(ValueError, match="shape"):
        rb.rawboost(torch.zeros(2, 3, 100), 1)
    with pytest.raises(TypeError):
        rb.rawboost(torch.zeros(2, 100, dtype=torch.long), 1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            rb.rawboost(torch.zeros(2, 100), 1, generator=torch.Generator(device="cuda"))
    y = rb.rawboost(torch.zeros(5000), 4, generator=torch.Generator().manual_seed(0))  # silence stays finite
    assert y.shape == (5000,) and torch.isfinite(y).all()
