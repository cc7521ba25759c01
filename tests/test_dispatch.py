"""Backend selection: auto, ROGA_BACKEND, backends(), and the fallback when the compiled
module is missing or was built against another torch."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import roga_cuda
from roga_cuda import ops


def test_backends_report():
    info = roga_cuda.backends()
    assert set(info) == set(ops.BACKENDS)
    for name, i in info.items():
        assert isinstance(i["available"], bool)
        assert i["available"] or (isinstance(i["reason"], str) and i["reason"]), name
    assert info["reference"]["available"] and info["foreach"]["available"]


def test_auto_picks_compiled_cpu(monkeypatch):
    monkeypatch.delenv("ROGA_BACKEND", raising=False)
    expect = "cpu" if ops.backends()["cpu"]["available"] else "foreach"
    assert ops.resolve_backend("auto", "cpu").name == expect


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("ROGA_BACKEND", "reference")
    assert ops.resolve_backend("auto", "cpu").name == "reference"
    assert ops.resolve_backend("foreach", "cpu").name == "foreach"  # explicit choice wins
    monkeypatch.setenv("ROGA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ROGA_BACKEND 'bogus'"):
        ops.norm([torch.ones(3)])


def _run(code, env=None):
    e = dict(os.environ)
    e.pop("ROGA_BACKEND", None)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stderr
    return r


BLOCK_C = """
    import importlib.abc, importlib.machinery, sys
    class Broken(importlib.abc.Loader):  # found, but fails to load (e.g. an undefined symbol)
        def create_module(self, spec):
            raise ImportError("simulated: undefined symbol")
        def exec_module(self, module):
            pass
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "roga_cuda._C":
                return importlib.machinery.ModuleSpec(name, Broken())
    sys.meta_path.insert(0, Block())
"""

MISSING_C = """
    import importlib.abc, sys
    class Missing(importlib.abc.MetaPathFinder):  # as if the .so had never been built
        def find_spec(self, name, path, target=None):
            if name == "roga_cuda._C":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Missing())
"""


def test_missing_extension_falls_back_with_one_warning():
    r = _run(BLOCK_C + """
    import warnings, torch, roga_cuda
    info = roga_cuda.backends()
    assert not info["cpu"]["available"] and "simulated: undefined symbol" in info["cpu"]["reason"], info
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x = [torch.ones(4), torch.ones(5)]
        for _ in range(3):
            assert abs(roga_cuda.ops.norm(x).item() - 3.0) < 1e-6
    msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
    assert len(msgs) == 1 and "falls back to 'foreach'" in msgs[0] and "simulated" in msgs[0], msgs
    print("ok")
    """)
    assert "ok" in r.stdout


def test_unbuilt_extension_is_reported_as_not_built():
    r = _run(MISSING_C + """
    import roga_cuda
    info = roga_cuda.backends()["cpu"]
    assert not info["available"] and "is not built" in info["reason"], info
    print("ok")
    """)
    assert "ok" in r.stdout


def test_torch_version_mismatch_is_reported():
    if not ops.backends()["cpu"]["available"]:
        pytest.skip("compiled module not built")
    r = _run("""
    import torch
    torch.__version__ = "1.0.0"
    import roga_cuda
    info = roga_cuda.backends()["cpu"]
    assert not info["available"] and "built against torch" in info["reason"], info
    print("ok")
    """)
    assert "ok" in r.stdout


def test_cpu_isa_variants_agree():
    """The AVX2 and baseline builds of the CPU loops give the same results (to rounding)."""
    if not ops.backends()["cpu"]["available"]:
        pytest.skip("compiled module not built")
    from roga_cuda import _C
    if not _C._set_cpu_isa("avx2"):
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g).to(dt) for n in (1, 7, 513, 4099) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    ys = [torch.randn_like(x, dtype=torch.float32).to(x.dtype) for x in xs]
    out = {}
    try:
        for isa in ("avx2", "baseline"):
            assert _C._set_cpu_isa(isa) and _C._cpu_isa() == isa
            p = [x.clone() for x in xs]
            ops.perturb_(p, ys, [torch.empty_like(x) for x in xs], 0.3, adaptive=True, eta=0.01, backend="cpu")
            c = [x.clone() for x in xs]
            ops.combine_(c, [c, ys], [0.5, -2.0], backend="cpu")
            out[isa] = (ops.norm(xs, backend="cpu"), ops.gram([xs, ys], backend="cpu"), p, c)
    finally:
        _C._set_cpu_isa("avx2")
    a, b = out["avx2"], out["baseline"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    scale = torch.outer(a[1].diagonal(), a[1].diagonal()).sqrt()  # off-diagonal dots cancel: compare to their scale
    assert torch.all((a[1] - b[1]).abs() <= 2e-6 * scale), (a[1], b[1])
    for x, y in zip(a[2] + a[3], b[2] + b[3]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # element-wise math rounds identically


def _cpu_module():
    if not ops.backends()["cpu"]["available"]:
        pytest.skip("compiled module not built")
    from roga_cuda import _C
    return _C


def test_cpu_elementwise_results_do_not_depend_on_the_block():
    """The elementwise CPU loops run float32/float64 in blocks of a settable length (short
    blocks keep an update's streams in flight together); every element is computed alone, so
    any length gives the same bits. Sizes straddle the block lengths."""
    _C = _cpu_module()
    g = torch.Generator().manual_seed(1)
    shapes = [(1,), (7,), (127,), (129,), (33, 65), (5003,)]

    def run(dtype):
        def mk():
            return [torch.randn(s, generator=g).to(dtype) for s in shapes]
        xs = [mk() for _ in range(6)]
        w, wd = [0.5, -1.25, 2.0, 0.125, -3.0, 0.75], [0.1, -0.2, 0.3, 0.0, 1.0, -1.0]
        c = mk()
        ops.combine_(c, xs, w, backend="cpu")
        p, src, buf, gout = mk(), mk(), mk(), mk()
        steps = [torch.ones(()) for _ in shapes]
        ops.sgd_(p, xs, lr=0.1, momentum_buffers=buf, steps=steps, momentum=0.9, nesterov=True, weight_decay=0.01,
                 source=src, grad_weights=w, direct_weights=wd, grad_out=gout, backend="cpu")
        p1, buf1 = mk(), mk()  # one list, nothing else asked: the loop that reads the gradient itself
        ops.sgd_(p1, xs[:1], lr=0.1, momentum_buffers=buf1, steps=[torch.ones(()) for _ in shapes], momentum=0.9,
                 weight_decay=0.01, backend="cpu")
        q, m, v = mk(), mk(), [t.abs() for t in mk()]
        ops.adam_(q, xs[:3], m, v, [torch.full((), 2.0) for _ in shapes], lr=0.01, weight_decay=0.1, decoupled=True,
                  grad_weights=w[:3], backend="cpu")
        r, b = mk(), mk()
        ops.perturb_(r, xs[0], b, 0.3, adaptive=True, eta=0.01, backend="cpu")
        return c + p + buf + gout + p1 + buf1 + q + m + v + r + b

    for dtype in (torch.float32, torch.float64):
        results = []
        for block in (512, 128, 7, 1):
            prev = _C._cpu_block(block)
            try:
                g.manual_seed(1)
                results.append(run(dtype))
            finally:
                _C._cpu_block(prev)
        for other in results[1:]:
            for x, y in zip(results[0], other):
                assert torch.equal(x, y), dtype
    with pytest.raises(ValueError, match="_cpu_block: a block of 1 to 512 elements, got 0"):
        _C._cpu_block(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_combine_rounds_stream_by_stream(dtype):
    """combine_ reads up to four streams per loop, but each element is still a product, then
    one rounded add per further list in list order: the bits of torch's own ops in that order,
    for every K (the grouping's full, short and single-stream remainders)."""
    _cpu_module()
    g = torch.Generator().manual_seed(2)
    for k in range(1, 11):
        xs = [[torch.randn(s, generator=g, dtype=dtype) for s in ((1,), (131,), (2049,))] for _ in range(k)]
        w = (torch.rand(k, generator=g, dtype=torch.float64) * 4 - 2).tolist()
        out = [torch.empty_like(x) for x in xs[0]]
        ops.combine_(out, xs, w, backend="cpu")
        for i, o in enumerate(out):
            exp = xs[0][i] * torch.tensor(w[0], dtype=dtype)
            for a in range(1, k):
                exp = exp + xs[a][i] * torch.tensor(w[a], dtype=dtype)
            assert torch.equal(o, exp), (k, i)
