"""The triton backend beyond the generic contract (test_ops.py): table caching and
invalidation, lists longer than one table, 3000-tensor lists, huge tensors, dtype splits,
determinism, layouts, and import safety without triton.

On a machine without a GPU these run on CPU tensors through Triton's interpreter
(conftest sets TRITON_INTERPRET=1); with a GPU they run compiled on CUDA tensors.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from roga_cuda import ops

from util import SHAPES, Lists, assert_bits_equal, assert_elementwise, f64, reduction_rtol

AVAILABLE = ops.backends()["triton"]["available"]
if AVAILABLE:
    from roga_cuda.ops import triton as T

    DEV = "cpu" if T.INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(not AVAILABLE, reason=f"triton backend: {ops.backends()['triton']['reason']}")


def _norms(ts, params=None, eta=0.0):
    x = f64(ts)
    if params is not None:
        x = [(p.abs() + eta) * t for p, t in zip(f64(params), x)]
    per = torch.stack([t.pow(2).sum() for t in x])
    return per.sum().sqrt(), per.sqrt()


def _gram(lists):
    X = [f64(l) for l in lists]
    k = len(X)
    return torch.tensor([[sum((x * y).sum().item() for x, y in zip(X[a], X[b])) for b in range(k)] for a in range(k)],
                        dtype=torch.float64)


def _check_norm(ts, dtypes, **kw):
    total, per = ops.norm(ts, per_tensor=True, backend="triton", **kw)
    exp_total, exp_per = _norms(ts, **{k: v for k, v in kw.items() if k in ("params", "eta")})
    rtol = reduction_rtol(dtypes)
    torch.testing.assert_close(total.double().cpu(), exp_total, rtol=rtol, atol=0)
    torch.testing.assert_close(per.double().cpu(), exp_per, rtol=rtol, atol=0)
    return total, per


def _check_gram(lists, dtypes):
    G = ops.gram(lists, backend="triton").double().cpu()
    exp = _gram(lists)
    d = exp.diagonal().sqrt()
    assert torch.all((G - exp).abs() <= reduction_rtol(dtypes) * torch.outer(d, d) + 1e-30), (G, exp)
    assert torch.equal(G, G.T)


def _all_primitives(L, rng, light=False):
    """Every primitive once on a 4-list Lists, against float64 math (light: skip the ASAM
    norm and use K=2 in gram)."""
    dtypes = L.dtypes
    _check_norm(L[0], dtypes)
    if not light:
        _check_norm(L[0], dtypes, params=L[1], eta=0.01)
    p0 = [p.clone() for p in L[0]]
    for b in L[2]:
        b.fill_(float("nan"))
    s = torch.tensor(-0.37, device=L[0][0].device)
    ops.perturb_(L[0], L[1], L[2], s, backend="triton")
    assert_bits_equal(L[2], p0, "backup")
    P, G = f64(p0), f64(L[1])
    assert_elementwise(L[0], [p - 0.37 * g for p, g in zip(P, G)], [p.abs() + 0.37 * g.abs() for p, g in zip(P, G)],
                       "params")
    for p in L[0]:
        p.fill_(float("nan"))
    ops.restore_(L[0], L[2], backend="triton")
    assert_bits_equal(L[0], p0, "restored")
    A = f64(L[3])
    ops.restore_accumulate_(L[2], L[0], L[3], L[1], 0.5, backend="triton")
    assert_bits_equal(L[2], p0, "restore_accumulate params")
    assert_elementwise(L[3], [a + 0.5 * g for a, g in zip(A, G)], [a.abs() + 0.5 * g.abs() for a, g in zip(A, G)],
                       "acc")
    _check_gram([L[0], L[1]] if light else [L[0], L[1], L[3]], dtypes)
    A = f64(L[3])
    ops.combine_(L[3], [L[3], L[1]], [2.0, -0.75], backend="triton")  # out is the first input
    assert_elementwise(L[3], [2 * a - 0.75 * g for a, g in zip(A, G)],
                       [2 * a.abs() + 0.75 * g.abs() for a, g in zip(A, G)], "combined")
    L.check_guards()


# ----------------------------------------------------------------------- import safety

def _run(code, env_drop=(), env=None):
    e = {k: v for k, v in os.environ.items() if k not in env_drop and k != "ROGA_BACKEND"}
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


BLOCK_TRITON = """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise {exc}("simulated: no triton here")
    sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("exc", ["ImportError", "RuntimeError"], ids=["missing", "broken"])
def test_import_without_triton(exc):
    out = _run(BLOCK_TRITON.format(exc=exc) + """
    import torch, roga_cuda
    from roga_cuda import ops
    info = roga_cuda.backends()["triton"]
    assert not info["available"], info
    assert "triton is not importable" in info["reason"] and "simulated" in info["reason"], info
    x = [torch.ones(4), torch.ones(5)]
    assert abs(ops.norm(x, backend="foreach").item() - 3.0) < 1e-6
    try:
        ops.norm(x, backend="triton")
    except RuntimeError as e:
        assert "unavailable" in str(e) and "simulated" in str(e), e
    else:
        raise AssertionError("backend='triton' ran without triton")
    print("ok")
    """)
    assert "ok" in out


def test_reason_without_gpu_or_interpreter():
    """Without TRITON_INTERPRET and without a GPU the backend says why; with the
    interpreter it runs on CPU tensors."""
    out = _run("""
    import torch, roga_cuda
    info = roga_cuda.backends()["triton"]
    print(info["available"], info["devices"], info["reason"])
    """, env_drop=("TRITON_INTERPRET",))
    if torch.cuda.is_available():
        assert out.startswith("True ['cuda']"), out
    else:
        assert out.startswith("False") and "TRITON_INTERPRET=1" in out and "no GPU" in out, out
    if not AVAILABLE or not T.INTERPRET:
        return
    out = _run("""
    import torch, roga_cuda
    from roga_cuda import ops
    assert roga_cuda.backends()["triton"]["devices"] == ["cpu"]
    print(ops.norm([torch.full((3,), 2.0)], backend="triton").item())
    """, env={"TRITON_INTERPRET": "1"})
    assert abs(float(out.split()[-1]) - math.sqrt(12.0)) < 1e-6, out


# ------------------------------------------------------------------- tables and caching

@needs_triton
def test_cache_hit_and_invalidation(rng):
    """Grads set to None and reallocated between calls: the new tensors are used; the same
    tensors again hit the cache (no new table)."""
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(DEV)
    params = list(model.parameters())
    x = torch.randn(4, 7, generator=rng).to(DEV)
    backup = [torch.empty_like(p) for p in params]
    seen = []
    for step in range(3):
        model.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in params)
        old = seen[-1] if seen else None  # keep the old grads alive: the new ones get new addresses
        (model(x * (step + 1)).pow(2).sum()).backward()
        grads = [p.grad for p in params]
        if old is not None:
            assert [g.data_ptr() for g in grads] != [g.data_ptr() for g in old]
        seen.append(grads)
        built = T.stats["ptr_tables_built"]
        total = ops.norm(grads, backend="triton")
        assert T.stats["ptr_tables_built"] == built + 1  # new pointers: a new table
        exp = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
        assert abs(total.item() - exp) <= 2e-6 * exp
        ops.norm(grads, backend="triton")
        assert T.stats["ptr_tables_built"] == built + 1  # same tensors: cache hit
        p0 = [p.detach().clone() for p in params]
        ops.perturb_([p.detach() for p in params], grads, backup, 0.5, backend="triton")
        for p, q, g in zip(params, p0, grads):
            torch.testing.assert_close(p.detach(), q + 0.5 * g)
        ops.restore_([p.detach() for p in params], backup, backend="triton")
        assert_bits_equal([p.detach() for p in params], p0)
    # freed and reallocated, possibly at the same addresses: still the new values
    for _ in range(3):
        del grads, seen
        seen = []
        grads = [torch.randn(p.shape, generator=rng).to(DEV) for p in params]
        exp = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
        assert abs(ops.norm(grads, backend="triton").item() - exp) <= 2e-6 * exp


@needs_triton
def test_same_address_other_numel_dtype_or_layout(rng):
    """A tensor at a cached address with another numel, dtype or layout is not served a stale table."""
    buf = torch.randn(64, generator=rng).to(DEV)
    for n in (10, 40, 10, 64):
        t = buf[:n]
        assert abs(ops.norm([t], backend="triton").item() - t.double().norm().item()) <= 1e-6 * t.double().norm().item()
    half = buf.view(torch.float16)[:10]  # same address and numel as buf[:10], other dtype
    half.copy_(torch.randn(10, generator=rng))
    got = ops.norm([half], backend="triton")
    assert got.dtype == torch.float32
    assert abs(got.item() - half.double().norm().item()) <= 1e-5 * half.double().norm().item()
    ops.norm([buf[:20]], backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        ops.norm([buf[::2][:20]], backend="triton")  # same address and numel, not dense


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, "mixed"])
def test_more_tensors_than_one_table(monkeypatch, dtype, rng):
    """MAX_TENSORS lowered: the list is split into several launches; results unchanged."""
    monkeypatch.setattr(T, "MAX_TENSORS", 2)
    L = Lists(SHAPES["mixed"], dtype, 4, rng, DEV)
    nonempty = {}
    for t in L[0]:
        if t.numel():
            nonempty[t.dtype] = nonempty.get(t.dtype, 0) + 1
    launches = sum(-(-c // 2) for c in nonempty.values())
    assert launches > len(nonempty)
    before = T.stats["launches"]
    ops.norm(L[0], backend="triton")
    assert T.stats["launches"] - before == launches + 1  # stage 1 per table + one final stage
    _all_primitives(L, rng)


@needs_triton
def test_table_split_keeps_bits(monkeypatch, rng):
    """The partials keep one global order whatever the split: same bits."""
    L = Lists(SHAPES["mixed"] * 2, torch.float32, 2, rng, DEV)
    n1, p1 = ops.norm(L[0], per_tensor=True, backend="triton")
    g1 = ops.gram(L.lists, backend="triton")
    monkeypatch.setattr(T, "MAX_TENSORS", 4)
    n2, p2 = ops.norm(L[0], per_tensor=True, backend="triton")
    g2 = ops.gram(L.lists, backend="triton")
    assert torch.equal(n1, n2) and torch.equal(p1, p2) and torch.equal(g1, g2)


@needs_triton
def test_3000_tensors(rng):
    """Each primitive once on a 3000-tensor mixed-dtype list (ASAM and K > 2 run on the
    shorter lists above: under the interpreter every tensor costs about a millisecond)."""
    _all_primitives(Lists(SHAPES["many"], "mixed", 4, rng, DEV), rng, light=True)


@needs_triton
def test_huge_tensor(rng):
    """A tensor over 10M elements (several programs and partials) next to small ones:
    per-tensor norms, restore_accumulate_ and combine_ (test_ops covers the rest)."""
    shapes = [(3,), (10_000_019,), (5, 7)]
    L = Lists(shapes, torch.float32, 3, rng, DEV)
    _check_norm(L[0], L.dtypes)
    A, G = f64(L[1]), f64(L[2])
    ops.restore_accumulate_(L[0], L[2], L[1], L[2], 0.25, backend="triton")
    assert_bits_equal(L[0], L[2])
    assert_elementwise(L[1], [a + 0.25 * g for a, g in zip(A, G)], [a.abs() + 0.25 * g.abs() for a, g in zip(A, G)])
    A = f64(L[1])
    ops.combine_(L[0], [L[1], L[2]], torch.tensor([0.5, -2.0], device=DEV), backend="triton")
    assert_elementwise(L[0], [0.5 * a - 2 * g for a, g in zip(A, G)],
                       [0.5 * a.abs() + 2 * g.abs() for a, g in zip(A, G)])
    L.check_guards()


# ------------------------------------------------------------------------ dtypes, math

@needs_triton
def test_mixed_dtypes_split_by_dtype(rng):
    L = Lists(SHAPES["mixed"], "mixed", 2, rng, DEV)
    before = T.stats["launches"]
    total = ops.norm(L[0], backend="triton")
    assert T.stats["launches"] - before == len(set(L.dtypes)) + 1  # one launch per dtype + final
    assert total.dtype == torch.float64  # a float64 tensor in the list
    no64 = [t for t in L[0] if t.dtype != torch.float64]
    assert ops.norm(no64, backend="triton").dtype == torch.float32
    assert ops.gram([no64, no64], backend="triton").dtype == torch.float32


@needs_triton
def test_float64_scalars_are_exact(rng):
    """Python floats reach float64 kernels as doubles (as float32 they would be off by ~1e-9).
    Bounds are relative to the terms' magnitude: a GPU may fuse the multiply-add."""
    def close(got, exp, mag):
        assert torch.all((got - exp).abs() <= 4e-16 * mag), (got - exp).abs().max().item()

    p = torch.randn(1000, dtype=torch.float64, generator=rng).to(DEV)
    g = torch.randn(1000, dtype=torch.float64, generator=rng).to(DEV)
    b = torch.empty_like(p)
    p0 = p.clone()
    ops.perturb_([p], [g], [b], 0.1, backend="triton")
    close(p, p0 + 0.1 * g, p0.abs() + (0.1 * g).abs())
    a = torch.zeros_like(p)
    ops.restore_accumulate_([p], [b], [a], [g], 1 / 3, backend="triton")
    close(a, g / 3, (g / 3).abs())
    ops.combine_([a], [[g], [p]], [0.1, 1 / 3], backend="triton")
    close(a, 0.1 * g + (1 / 3) * p, (0.1 * g).abs() + (p / 3).abs())
    s = torch.tensor(0.1, dtype=torch.float64, device=DEV)  # a 0-d float64 device scalar too
    ops.perturb_([p], [g], [b], s, backend="triton")
    close(p, p0 + 0.1 * g, p0.abs() + (0.1 * g).abs())


@needs_triton
def test_deterministic_and_consistent(rng):
    L = Lists(SHAPES["mixed"] * 2, "mixed", 3, rng, DEV)
    n1, p1 = ops.norm(L[0], per_tensor=True, backend="triton")
    g1 = ops.gram(L.lists, backend="triton")
    T.clear_cache()
    for _ in range(2):
        n2, p2 = ops.norm(L[0], per_tensor=True, backend="triton")
        assert torch.equal(n1, n2) and torch.equal(p1, p2)
        assert torch.equal(ops.norm(L[0], backend="triton"), n1)  # same bits without per-tensor
        assert torch.equal(ops.gram(L.lists, backend="triton"), g1)


@needs_triton
def test_empty_tensors_only():
    ts = [torch.empty(0, device=DEV), torch.empty(2, 0, device=DEV)]
    total, per = ops.norm(ts, per_tensor=True, backend="triton")
    assert total.item() == 0 and torch.equal(per.cpu(), torch.zeros(2))
    assert torch.equal(ops.gram([ts, ts], backend="triton").cpu(), torch.zeros(2, 2))
    empty = [torch.empty(0, device=DEV), torch.empty(2, 0, device=DEV)]
    ops.perturb_(ts, empty, [torch.empty_like(t) for t in ts], 1.0, backend="triton")
    ops.combine_(ts, [ts], [2.0], backend="triton")


@needs_triton
def test_wrong_device_raises_instead_of_crashing():
    """The tables hold raw addresses: the module refuses tensors its kernels cannot read
    (reached only if dispatch let them through, e.g. `auto` with an interpreter-only triton)."""
    with pytest.raises(ValueError, match=f"runs on {DEV} tensors"):
        T.norm([torch.empty(3, device="meta")], False, None, 0.0)


# -------------------------------------------------------------------------- layouts

@needs_triton
def test_channels_last_lists(rng):
    """Dense tensors in another memory order are walked in storage order by every kernel."""
    def cl(*shape):
        return torch.randn(*shape, generator=rng).to(DEV).to(memory_format=torch.channels_last)
    a, b, c = [cl(3, 4, 5, 6), cl(2, 3, 1, 7)], [cl(3, 4, 5, 6), cl(2, 3, 1, 7)], [cl(3, 4, 5, 6), cl(2, 3, 1, 7)]
    _check_gram([a, b, c], [torch.float32] * 2)
    A, B = f64(a), f64(b)
    ops.combine_(c, [a, b], [1.5, -1.0], backend="triton")
    assert_elementwise(c, [1.5 * x - y for x, y in zip(A, B)], [1.5 * x.abs() + y.abs() for x, y in zip(A, B)])
    C = f64(c)
    ops.restore_accumulate_(a, b, c, b, 2.0, backend="triton")
    assert_bits_equal(a, b)
    assert_elementwise(c, [z + 2 * y for z, y in zip(C, B)], [z.abs() + 2 * y.abs() for z, y in zip(C, B)])


@needs_triton
def test_layout_mismatch_is_rejected(rng):
    x = torch.randn(2, 3, 4, 5, generator=rng).to(DEV)
    y = torch.randn(2, 3, 4, 5, generator=rng).to(DEV).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="contiguous"):
        ops.gram([[x], [y]], backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        ops.restore_([x], [y], backend="triton")
    z = torch.randn(5, 4, generator=rng).to(DEV).t()  # a transposed tensor: dense, other order
    w = torch.randn(5, 4, generator=rng).to(DEV).t()
    G = ops.gram([[z], [w]], backend="triton").cpu().double()
    torch.testing.assert_close(G[0, 1], (z.double() * w.double()).sum().cpu(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        ops.gram([[z], [w.contiguous()]], backend="triton")


# ------------------------------------------------------------- compiled mode, no GPU needed

AOT = """
    import glob, os, re, sys, inspect
    import triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        print("SKIP: this triton's ASTSource has another signature"); sys.exit(0)
    import triton.backends.nvidia as nv
    if not (os.environ.get("TRITON_PTXAS_PATH")
            or glob.glob(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas*"))):
        print("SKIP: no ptxas"); sys.exit(0)
    from roga_cuda.ops import triton as T
    assert not T.INTERPRET
    target = GPUTarget("cuda", 90, 32)
    def comp(fn, sig, const):
        sig = dict(sig, **{k: "constexpr" for k in const})
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        k = triton.compile(src, target=target, options={"num_warps": 4})
        return set(re.findall(r"(?:ld|st)\\.global[.\\w]*", k.asm["ptx"]))
    bf, f32, f64, i16 = tl.bfloat16, tl.float32, tl.float64, tl.int16
    base = {"ptrs": "*i64", "meta": "*i64", "T": "i32"}
    out = {}
    out["norm"] = comp(T._norm_kernel, dict(base, part="*fp32", pbase="i32", eta_bits="i64"),
                       dict(DT=bf, ACC=f32, ASAM=True, BLOCK=2048, ALIGNED=True))
    out["perturb"] = comp(T._perturb_kernel, dict(base, s_ptr="*fp32", s_bits="i64", eta_bits="i64"),
                          dict(DT=bf, IT=i16, ACC=f32, ADAPTIVE=True, S_PTR=True, BLOCK=2048, ALIGNED=True))
    out["restore"] = comp(T._restore_kernel, base, dict(IT=tl.int32, BLOCK=2048, ALIGNED=True))
    out["restore_unaligned"] = comp(T._restore_kernel, base, dict(IT=tl.int32, BLOCK=2048, ALIGNED=False))
    out["restore_acc"] = comp(T._restore_acc_kernel, dict(base, w_ptr="*i64", w_bits="i64"),
                              dict(DT=bf, IT=i16, ACC=f32, W_PTR=False, BLOCK=2048, ALIGNED=True))
    out["gram"] = comp(T._gram_kernel, dict(base, part="*fp64", pbase="i32"),
                       dict(K=3, KP=4, DT=f64, ACC=f64, BLOCK=256, ALIGNED=True))
    out["combine"] = comp(T._combine_kernel, dict(base, w_ptr="*fp64"),
                          dict(K=3, DT=bf, ACC=f32, BLOCK=1024, ALIGNED=True))
    out["norm_final"] = comp(T._norm_final, dict(part="*fp32", NB="i32", pt="*i64", N="i32", MAXC="i32", total="*fp32",
                             per="*fp32"), dict(ACC=f32, IS64=False, RB=1024, TB=16, CB=256))
    out["gram_final"] = comp(T._gram_final, dict(part="*fp64", NB="i32", out="*fp64"), dict(K=3, KP=4, ACC=f64, RB=64))
    for k, v in out.items():
        print(k, sorted(v))
"""


@pytest.mark.skipif(not AVAILABLE or not T.INTERPRET, reason="the GPU run compiles the kernels itself")
def test_kernels_compile_for_sm90():
    """Every kernel through the real compiler (to PTX and cubin, for sm_90), which the
    interpreter never exercises; full aligned tiles must become 16-byte vector accesses."""
    pytest.importorskip("triton.backends.nvidia")
    out = _run(AOT, env_drop=("TRITON_INTERPRET",), env={"TRITON_DEFAULT_FP_FUSION": "1"})
    if out.startswith("SKIP"):
        pytest.skip(out.strip())
    res = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert set(res) == {"norm", "perturb", "restore", "restore_unaligned", "restore_acc", "gram", "combine",
                        "norm_final", "gram_final"}, out
    for name in ("norm", "perturb", "restore", "restore_acc", "combine"):
        assert "ld.global.v4" in res[name], (name, res[name])
    assert "ld.global.v2.b64" in res["gram"], res["gram"]
    assert "ld.global.v4" not in res["restore_unaligned"], res["restore_unaligned"]
