"""The primitives as PyTorch operators: torch.ops.roga_cuda.*, opcheck, torch.compile,
FakeTensor/export, functional tensors and tensor subclasses (in subprocesses: a crash
must fail a test, not the run)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from roga_cuda import ops

from conftest import backend_cases

pytestmark = pytest.mark.skipif(not ops.backends()["cpu"]["available"], reason="compiled module not built")

OPS = ("norm", "asam_norm", "perturb_", "asam_perturb_", "restore_", "restore_accumulate_", "gram", "combine_")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, "mixed"]


def _lists(dtype, k, g, n=4):
    shapes = [(3, 4), (7,), (), (0,), (2, 1, 3)][:n]
    dts = [torch.float32, torch.float16, torch.bfloat16, torch.float64] if dtype == "mixed" else [dtype] * len(shapes)
    return [[torch.randn(s, generator=g).to(dts[i % len(dts)]) for i, s in enumerate(shapes)] for _ in range(k)]


def test_every_primitive_is_an_operator():
    for name in OPS:
        op = getattr(torch.ops.roga_cuda, name)
        assert isinstance(op.default, torch._ops.OpOverload), name
        assert torch.Tag.pt2_compliant_tag in op.default.tags
    mutated = {name: [a.name for a in getattr(torch.ops.roga_cuda, name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write] for name in OPS}
    assert mutated == {"norm": [], "asam_norm": [], "gram": [], "perturb_": ["params", "backup"],
                       "asam_perturb_": ["params", "backup"], "restore_": ["params"],
                       "restore_accumulate_": ["params", "acc"], "combine_": ["out"]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scalars", [False, True])
def test_opcheck(dtype, tensor_scalars):
    """Schema (mutations declared), fake tensors, AOT dispatch (static and dynamic shapes)."""
    g = torch.Generator().manual_seed(0)
    x, y, b, a = _lists(dtype, 4, g)
    s = torch.tensor(0.3) if tensor_scalars else None
    w = torch.tensor([0.5, -2.0]) if tensor_scalars else None
    r = torch.ops.roga_cuda
    cases = [
        (r.norm.default, (x, True)),
        (r.norm.default, (x, False)),
        (r.asam_norm.default, (x, y, 0.01, True)),
        (r.perturb_.default, (x, y, b, 0.25, s)),
        (r.asam_perturb_.default, (x, y, b, 0.25, s, 0.01)),
        (r.restore_.default, (x, b)),
        (r.restore_accumulate_.default, (x, b, a, y, 0.5, s)),
        (r.gram.default, (x + y + a, 3)),
        (r.combine_.default, (b, x + y, [] if tensor_scalars else [0.5, -2.0], w)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _api_calls(backend):
    """A function calling every public op, with device-tensor scalars (no host sync)."""
    def f(p, g, b, acc):
        n = ops.norm(g, backend=backend)
        na, per = ops.norm(g, per_tensor=True, params=p, eta=0.01, backend=backend)
        ops.perturb_(p, g, b, 0.05 / (n + 1e-12), backend=backend)
        ops.perturb_(p, g, b, 0.5, adaptive=True, eta=0.01, backend=backend)
        G = ops.gram([g, p], backend=backend)
        ops.restore_accumulate_(p, b, acc, g, n, backend=backend)
        ops.combine_(acc, [acc, g], torch.stack([G[0, 1], na]), backend=backend)
        ops.combine_(acc, [acc, g], [0.5, 2.0], backend=backend)
        ops.restore_(p, b, backend=backend)
        return n, na, per, G
    return f


def _fresh(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p, gr, acc = _lists(dtype, 3, g)
    return p, gr, [torch.zeros_like(t) for t in p], acc


def _assert_same(a, b, exact=True):
    for x, y in zip(a, b):
        if isinstance(x, (list, tuple)):
            _assert_same(x, y, exact)
        elif exact:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(x, y, equal_nan=True)


@pytest.mark.parametrize("backend", [c.values[0] for c in backend_cases() if c.values[1] == "cpu"] + ["auto"])
def test_compile_fullgraph_matches_eager(backend):
    """Dynamo captures the public API in one graph (fullgraph: a graph break fails) and the
    functionalised graph computes what eager does: bit for bit with the compiled kernels;
    to rounding with the Python backends (eager reads a CPU 0-d scalar tensor as a float,
    which foreach applies with one rounding instead of two)."""
    f = _api_calls(backend)
    eager_args, comp_args = _fresh(torch.float32), _fresh(torch.float32)
    out_e = f(*eager_args)
    torch._dynamo.reset()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*comp_args)
    exact = backend in ("auto", "cpu", "triton")
    _assert_same(out_e, out_c, exact)
    _assert_same(eager_args, comp_args, exact)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    """The default backend (Inductor): the ops stay calls in the generated code (re-inplaced
    after functionalisation), mixed dtypes included."""
    f = _api_calls("auto")
    eager_args, comp_args = _fresh("mixed", 1), _fresh("mixed", 1)
    out_e = f(*eager_args)
    torch._dynamo.reset()
    out_c = torch.compile(f, fullgraph=True)(*comp_args)
    _assert_same(out_e, out_c)
    _assert_same(eager_args, comp_args)


def _run(code):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)}, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_fake_tensors_and_export():
    """FakeTensors (what compile and export trace with) get shapes, never a data pointer."""
    out = _run("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from roga_cuda import ops
        with FakeTensorMode():
            p = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64)]
            g = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64)]
            b = [torch.empty_like(t) for t in p]
            n, per = ops.norm(g, per_tensor=True)
            assert n.shape == () and n.dtype == torch.float64 and per.shape == (2,)
            ops.perturb_(p, g, b, n)
            ops.restore_accumulate_(p, b, [torch.zeros_like(t) for t in p], g, 0.5)
            G = ops.gram([g, p, b])
            assert G.shape == (3, 3) and G.dtype == torch.float64
            ops.combine_(g, [g, p], G[0, :2])
            try:
                ops.perturb_(p, g[:1], b, 0.1)
            except ValueError as e:
                assert "`grads` has 1 tensors but `params` has 2" in str(e), e
            else:
                raise AssertionError("no error")

        class Norms(torch.nn.Module):
            def forward(self, a, b):
                return ops.norm([a, b]), ops.gram([[a, b], [b, a]])
        ep = torch.export.export(Norms(), (torch.randn(4), torch.randn(4)))
        names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert "roga_cuda.norm.default" in names and "roga_cuda.gram.default" in names, names
        a, b = torch.randn(4), torch.randn(4)
        n, G = ep.module()(a, b)
        torch.testing.assert_close(n, torch.cat([a, b]).norm())
        torch.testing.assert_close(G, torch.tensor([[a @ a + b @ b, 2 * a @ b], [2 * a @ b, a @ a + b @ b]]))
        print("ok")
    """)
    assert "ok" in out


def test_functional_tensors():
    """torch.func.functionalize's functional tensors: the reductions work; the in-place ops
    get a clear TypeError naming the op and argument (never a raw pointer)."""
    out = _run("""
        import torch
        from roga_cuda import ops
        g = [torch.randn(6), torch.randn(3)]
        n = torch.func.functionalize(lambda a, b: ops.norm([a, b]))(*g)
        torch.testing.assert_close(n, torch.cat(g).norm())
        def f(p, g, b):
            ops.perturb_([p], [g], [b], 0.5)
            return p + 0
        try:
            torch.func.functionalize(f)(torch.randn(6), torch.randn(6), torch.empty(6))
        except TypeError as e:
            assert "perturb_: params[0] is a functional tensor" in str(e), e
        else:
            raise AssertionError("no error")
        print("ok")
    """)
    assert "ok" in out


def test_dispatch_modes_see_the_ops():
    """Under a TorchDispatchMode the eager fast path steps aside: the mode sees the operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    p, g, b = [torch.randn(3)], [torch.randn(3)], [torch.empty(3)]
    with Log() as log:
        ops.perturb_(p, g, b, 0.1, backend="cpu")
        ops.norm(g, backend="cpu")
    assert "roga_cuda.perturb_.default" in log.seen and "roga_cuda.norm.default" in log.seen, log.seen


def test_dtensor_single_process():
    """DTensor lists (as fully_shard makes them) run on their local shards; reductions are
    replicated DTensors; mixed DTensor/plain lists get a clear TypeError. (Two processes:
    tests/test_fsdp.py.)"""
    out = _run("""
        import os, torch, torch.distributed as dist
        from roga_cuda import ops
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (1,))
        full = [torch.randn(6, 4), torch.randn(5)]
        grads = [torch.randn(6, 4), torch.randn(5)]
        p = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full]
        g = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in grads]
        b = [distribute_tensor(torch.empty_like(t), mesh, [Shard(0)]) for t in full]
        n = ops.norm(g)
        assert isinstance(n, DTensor) and n.placements == (Replicate(),)
        torch.testing.assert_close(n.full_tensor(), torch.cat([t.flatten() for t in grads]).norm())
        ops.perturb_(p, g, b, 0.5)
        for x, y, z in zip(p, full, grads):
            torch.testing.assert_close(x.full_tensor(), y + 0.5 * z)
        ops.perturb_(p, g, b, n * 0)  # a replicated DTensor scale
        ops.restore_(p, b)
        G = ops.gram([g, p])
        torch.testing.assert_close(G.full_tensor()[0, 0], n.full_tensor() ** 2)
        ops.combine_(g, [g, p], [2.0, 0.0])
        torch.testing.assert_close(g[1].full_tensor(), 2 * grads[1])
        try:
            ops.restore_(p, [b[0], torch.zeros(5)])
        except TypeError as e:
            assert "backup[1] is a plain tensor but other tensors of the call are DTensors" in str(e), e
        else:
            raise AssertionError("mixed list accepted")
        r = [distribute_tensor(torch.randn(6, 4), mesh, [Replicate()]), b[1]]
        try:
            ops.restore_(r, b)
        except ValueError as e:
            assert "backup[0] is placed" in str(e), e
        else:
            raise AssertionError("mismatched placements accepted")
        dist.destroy_process_group()
        print("ok")
    """)
    assert "ok" in out


def test_fast_entries_borrow_lists_without_leaking_or_freeing():
    """The fast entries view Python lists in place (no reference-count traffic per tensor):
    the tensors' counts are what they were after many calls, the lists and tuples give the
    same results, dropping the last reference still frees each tensor, and a non-tensor
    element is named."""
    import gc
    import weakref
    from roga_cuda.ops import native
    C = native._C
    g = torch.Generator().manual_seed(5)
    p = [torch.randn(3, generator=g) for _ in range(50)]
    gr = [torch.randn(3, generator=g) for _ in range(50)]
    b = [torch.empty(3) for _ in range(50)]
    counts = [sys.getrefcount(t) for t in p + gr + b]
    want = [x + 0.5 * y for x, y in zip(p, gr)]
    for _ in range(200):
        assert C.norm(gr, None, 0.0, False) is not None
        assert C.perturb_(p, gr, b, 0.0, None, False, 0.0)
        assert C.restore_(tuple(p), tuple(b))
        assert C.gram([p, tuple(gr)]) is not None
    assert [sys.getrefcount(t) for t in p + gr + b] == counts
    out = [torch.empty(3) for _ in range(50)]
    assert C.combine_(tuple(out), (p, gr), [1.0, 0.5], None)
    torch.testing.assert_close(out, want)
    total = C.norm(tuple(gr), None, 0.0, False)[0]
    torch.testing.assert_close(total, torch.cat(gr).norm())
    refs = [weakref.ref(t) for t in out]
    del out
    gc.collect()
    assert all(r() is None for r in refs)
    with pytest.raises(TypeError, match=r"restore_: backup\[2\] is a int, not a Tensor"):
        ops.restore_(p[:3], [b[0], b[1], 7], backend="cpu")
    with pytest.raises(TypeError, match=r"restore_: backup\[2\] is a int, not a Tensor"):
        native.restore_(p[:3], [b[0], b[1], 7])  # the fast entry itself refuses the list
    assert all(torch.equal(x, y) for x, y in zip(p, b))  # restore_ above left p as b
