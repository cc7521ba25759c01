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
