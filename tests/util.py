"""Helpers shared by the tests: random tensor lists carved out of guarded buffers,
float64 expectations and per-dtype error bounds."""
import torch

# Unit of least precision relative to 1.0 (twice the unit roundoff) per storage dtype.
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
EPS32 = 2.0**-23
SENTINEL = 12345.0

MIXED = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

SHAPES = {
    # 0-d, 0-element, odd sizes around the CPU block (512) and chunk (32768) boundaries
    "mixed": [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (64, 3, 3, 3), (513,), (1023,), (33, 65), (32769,), (70001,)],
    "one": [(17,)],
    "many": [((i * 7) % 40 + 1,) if i % 3 else (2, (i * 5) % 9 + 1) for i in range(3000)],
}


def dtypes_for(dtype, n):
    return [MIXED[i % len(MIXED)] for i in range(n)] if dtype == "mixed" else [dtype] * n


class Lists:
    """K random tensor lists whose tensors are views into one flat buffer per dtype, with
    guard gaps of odd length between them (filled with SENTINEL) so that out-of-bounds
    writes are caught and data pointers are not all 16-byte aligned."""

    def __init__(self, shapes, dtype, k, rng, device, gap=3, scale=1.0):
        self.dtypes = dtypes_for(dtype, len(shapes))
        self.lists = []
        self._bufs = []
        for _ in range(k):
            total = sum(_numel(s) + gap for s in shapes) + gap
            bufs = {dt: torch.full((total,), SENTINEL, dtype=dt) for dt in set(self.dtypes)}
            views, off = [], gap
            for s, dt in zip(shapes, self.dtypes):
                n = _numel(s)
                v = bufs[dt][off:off + n].view(s)
                v.copy_((torch.randn(s, generator=rng, dtype=torch.float64) * scale).to(dt))
                views.append(v)
                off += n + gap
            dev_bufs = {dt: b.to(device) for dt, b in bufs.items()}
            # re-create the views on the device buffers, same offsets
            dviews, off = [], gap
            for s, dt in zip(shapes, self.dtypes):
                n = _numel(s)
                dviews.append(dev_bufs[dt][off:off + n].view(s))
                off += n + gap
            self.lists.append(dviews)
            self._bufs.append((dev_bufs, shapes, gap))

    def __getitem__(self, k):
        return self.lists[k]

    def check_guards(self):
        for dev_bufs, shapes, gap in self._bufs:
            for dt, b in dev_bufs.items():
                mask = torch.ones(b.numel(), dtype=torch.bool, device=b.device)
                off = gap
                for s, d in zip(shapes, self.dtypes):
                    n = _numel(s)
                    if d == dt:
                        mask[off:off + n] = False
                    off += n + gap
                guard = b[mask]
                assert torch.all(guard == SENTINEL), f"a kernel wrote outside its tensors ({dt})"


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def f64(ts):
    return [t.detach().to("cpu", torch.float64, copy=True) for t in ts]


def bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


def assert_bits_equal(a, b, what=""):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(bits(x), bits(y)), f"{what}[{i}] is not bit-exact"


def assert_elementwise(out, exact, mag, what="", backend=None):
    """out (storage dtype) vs exact float64 values: one rounding to the storage dtype plus
    float32 math errors proportional to the magnitude of the terms (mag).

    backend="foreach": torch's own kernels round Python-scalar factors to a 16-bit storage
    dtype before multiplying and round between ops, so allow one more 16-bit rounding
    of each term."""
    for i, (o, e, m) in enumerate(zip(out, exact, mag)):
        o64 = o.detach().double().cpu()
        tol = EPS[o.dtype] * e.abs() + 8 * EPS32 * m + (6e-8 if o.dtype == torch.float16 else 0.0)
        if backend == "foreach" and o.dtype in (torch.float16, torch.bfloat16):
            tol = tol + 2 * EPS[o.dtype] * m
        bad = ~((o64 - e).abs() <= tol)
        if bad.any():
            j = bad.reshape(-1).nonzero()[0].item()
            raise AssertionError(f"{what}[{i}] ({o.dtype}) element {j}: got {o64.reshape(-1)[j].item()!r}, "
                                 f"expected {e.reshape(-1)[j].item()!r} (tol {tol.reshape(-1)[j].item():.3g})")


def reduction_rtol(dtypes):
    return 1e-12 if all(d == torch.float64 for d in dtypes) else 2e-5
