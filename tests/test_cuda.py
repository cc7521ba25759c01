"""The CUDA backend beyond the generic contract (tests/test_ops.py runs that for `cuda` too):
launch geometry (many launches, tensors split across launches, chunk boundaries), alignment,
a tensor over 2^31 elements, results written into poisoned allocator memory, CUDA-graph
capture of a RoGA cycle, non-default streams, determinism, launch counts.

Everything here needs a GPU and the compiled CUDA kernels; without them the module skips
with the reason.
"""
import contextlib
import math

import pytest
import torch

from roga_cuda import ops

import test_ops
from util import EPS, SHAPES, Lists, assert_bits_equal, assert_elementwise, f64, reduction_rtol

_info = ops.backends()["cuda"]
pytestmark = pytest.mark.skipif(not _info["available"], reason=f"cuda backend unavailable: {_info['reason']}")

DEV = "cuda"
BE = "cuda"


def _C():
    from roga_cuda.ops import native
    return native._C


@contextlib.contextmanager
def launch_limits(chunk=0, max_tensors=0, max_blocks=0):
    """Run the block with another launch geometry (0 = default), then restore the old one."""
    old = _C()._cuda_launch_limits(chunk, max_tensors, max_blocks)
    try:
        yield
    finally:
        _C()._cuda_launch_limits(*old)


# ------------------------------------------------------------------ launch geometry

# chunk 64 (the smallest allowed) cuts every tensor over 64 elements into many blocks;
# 3 tensors or 5 blocks per launch forces hundreds of launches and splits most tensors
# across launches; (128, 1000, 2) splits every multi-chunk tensor at every second chunk.
GEOMETRIES = [pytest.param(64, 3, 5, id="chunk64-3t-5b"), pytest.param(128, 1000, 2, id="chunk128-2b"),
              pytest.param(4096, 1, 0, id="chunk4096-1t")]


@pytest.mark.parametrize("chunk,max_tensors,max_blocks", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, "mixed"])
def test_contract_under_small_launches(chunk, max_tensors, max_blocks, dtype, rng):
    """The full contract checks of tests/test_ops.py (float64 expectations, poisoned outputs,
    guard gaps, bit-exact restore) with tiny launch geometry on the mixed-shape list."""
    with launch_limits(chunk, max_tensors, max_blocks):
        test_ops.test_norm(BE, DEV, "mixed", dtype, rng)
        test_ops.test_perturb_restore(BE, DEV, "mixed", dtype, True, True, rng)
        test_ops.test_perturb_restore(BE, DEV, "mixed", dtype, False, False, rng)
        test_ops.test_restore_accumulate(BE, DEV, "mixed", dtype, True, rng)
        for k in (1, 2, 8):
            test_ops.test_gram(BE, DEV, "mixed", dtype, k, rng)
        test_ops.test_combine(BE, DEV, "mixed", dtype, 5, -1, "floats", rng)
        test_ops.test_combine(BE, DEV, "mixed", dtype, 3, 0, "tensor1d", rng)


def test_many_tensors_tiny_launches(rng):
    """3000 tensors, 7 per launch (hundreds of launches) in mixed dtypes."""
    with launch_limits(64, 7, 0):
        test_ops.test_norm(BE, DEV, "many", "mixed", rng)
        test_ops.test_perturb_restore(BE, DEV, "many", "mixed", False, True, rng)
        test_ops.test_gram(BE, DEV, "many", "mixed", 3, rng)
        test_ops.test_combine(BE, DEV, "many", "mixed", 2, None, "floats", rng)


def test_chunk_boundaries_every_size(rng):
    """Every size from 0 to 300 elements around chunk multiples (chunk 64), float16 (8 per
    vector) so the vector tail is exercised for every remainder."""
    shapes = [(n,) for n in range(0, 300)]
    with launch_limits(64, 0, 0):
        L = Lists(shapes, torch.float16, 3, rng, DEV, gap=1)  # alignment varies tensor to tensor
        x = f64(L[0])
        total, per = ops.norm(L[0], per_tensor=True, backend=BE)
        exp_per = torch.stack([t.pow(2).sum().sqrt() for t in x])
        torch.testing.assert_close(per.double().cpu(), exp_per, rtol=2e-5, atol=0)
        torch.testing.assert_close(total.double().cpu(), exp_per.pow(2).sum().sqrt(), rtol=2e-5, atol=0)
        p0 = [p.clone() for p in L[0]]
        for b in L[2]:
            b.fill_(float("nan"))
        ops.perturb_(L[0], L[1], L[2], 0.25, backend=BE)
        assert_bits_equal(L[2], p0, "backup")
        G = f64(L[1])
        assert_elementwise(L[0], [p + 0.25 * g for p, g in zip(x, G)], [p.abs() + 0.25 * g.abs() for p, g in zip(x, G)],
                           "params")
        L.check_guards()


def _count_kernels(fn):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if "roga::cuda" in n], names


def _small_model(rng, dtype=torch.float32, n=400):
    """~400 tensors, ~300k elements: an AASIST-like list of mostly tiny tensors."""
    shapes = [(96, 3, 3, 3) if i % 10 == 0 else ((i * 37) % 1000 + 1,) for i in range(n)]
    return Lists(shapes, dtype, 4, rng, DEV, gap=0)


def test_launch_counts_small_model(rng):
    """A ~400-tensor model is one launch per elementwise op and two (blocks + finalize) per
    reduction; a table of at most 100 tensors splits it into 4 launches."""
    L = _small_model(rng)
    assert sum(t.numel() for t in L[0]) > 250_000
    p, g, b, a = L.lists
    counts = {
        "perturb_": lambda: ops.perturb_(p, g, b, 0.1, backend=BE),
        "restore_": lambda: ops.restore_(p, b, backend=BE),
        "restore_accumulate_": lambda: ops.restore_accumulate_(p, b, a, g, 0.5, backend=BE),
        "combine_": lambda: ops.combine_(a, [a, g], [1.0, 0.5], backend=BE),
        "norm": lambda: ops.norm(g, backend=BE),
        "gram": lambda: ops.gram([g, a], backend=BE),
    }
    expect = {"perturb_": 1, "restore_": 1, "restore_accumulate_": 1, "combine_": 1, "norm": 2, "gram": 2}
    for name, fn in counts.items():
        ours, everything = _count_kernels(fn)
        assert len(ours) == expect[name], f"{name}: {ours} (all device events: {everything})"
    with launch_limits(0, 100, 0):
        ours, _ = _count_kernels(counts["perturb_"])
        assert len(ours) == 4, ours
        ours, _ = _count_kernels(counts["norm"])
        assert len(ours) == 5, ours


def test_launch_counts_mixed_dtypes(rng):
    """One launch sequence per dtype group; restore_ groups by element size (raw copies)."""
    L = _small_model(rng, dtype="mixed", n=40)
    p, g, b, _ = L.lists
    ours, _ = _count_kernels(lambda: ops.perturb_(p, g, b, 0.1, backend=BE))
    assert len(ours) == 4, ours
    ours, _ = _count_kernels(lambda: ops.restore_(p, b, backend=BE))
    assert len(ours) == 3, ours  # 2-, 4- and 8-byte elements
    ours, _ = _count_kernels(lambda: ops.norm(g, backend=BE))
    assert len(ours) == 5, ours


# ------------------------------------------------------------------------ alignment

def _offset_list(sizes, dtype, offsets, rng):
    """One list per offset: tensor i of list k starts offsets[k][i] elements into its own
    buffer, so lists at one position can disagree on 16-byte alignment."""
    out = []
    for offs in offsets:
        lst = []
        for n, o in zip(sizes, offs):
            buf = torch.full((n + o + 8,), 7.0, dtype=dtype, device=DEV)
            v = buf[o:o + n]
            v.copy_(torch.randn(n, generator=rng, dtype=torch.float64).to(dtype))
            lst.append(v)
        out.append(lst)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_misaligned_views(dtype, rng):
    """Per position, lists aligned or not, and misaligned by different amounts: the vector
    path is taken only when every pointer of a tensor is 16-byte aligned."""
    sizes = [1, 7, 8, 9, 63, 64, 65, 1000, 4097, 70001] * 2
    nsz = len(sizes)
    offsets = [
        [0] * nsz,                                   # all aligned
        [i % 8 for i in range(nsz)],                 # some aligned, some not
        [(i * 3 + 1) % 8 for i in range(nsz)],       # disagrees with the above
        [1] * nsz,                                   # never aligned
    ]
    ls = _offset_list(sizes, dtype, offsets, rng)
    for a, b_ in [(0, 1), (1, 2), (3, 0), (2, 3)]:
        p, g = ls[a], ls[b_]
        X, Y = f64(p), f64(g)
        rtol = reduction_rtol([dtype])
        n = ops.norm(p, params=g, eta=0.01, backend=BE)
        exp = math.sqrt(sum((((y.abs() + 0.01) * x) ** 2).sum().item() for x, y in zip(X, Y)))
        assert abs(n.item() - exp) <= rtol * exp
        G = ops.gram([p, g], backend=BE).double().cpu()
        g01 = sum((x * y).sum().item() for x, y in zip(X, Y))
        assert abs(G[0, 1].item() - g01) <= rtol * math.sqrt(G[0, 0].item() * G[1, 1].item())
    # perturb: params misaligned differently from grads and backup
    p, g, b = ls[1], ls[2], ls[3]
    p0 = [t.clone() for t in p]
    for t in b:
        t.fill_(float("nan"))
    ops.perturb_(p, g, b, -0.5, adaptive=True, eta=0.1, backend=BE)
    assert_bits_equal(b, p0, "backup")
    P, G = f64(p0), f64(g)
    terms = [-0.5 * (x.abs() + 0.1) ** 2 * y for x, y in zip(P, G)]
    assert_elementwise(p, [x + t for x, t in zip(P, terms)], [x.abs() + t.abs() for x, t in zip(P, terms)], "params")
    for t in p:
        t.fill_(float("nan"))
    ops.restore_(p, b, backend=BE)
    assert_bits_equal(p, p0, "restored")
    # combine into an aligned output from misaligned inputs
    out = ls[0]
    X = [f64(ls[k]) for k in (1, 2, 3)]
    ops.combine_(out, [ls[1], ls[2], ls[3]], [0.5, -2.0, 1.5], backend=BE)
    exp = [0.5 * a + -2.0 * b + 1.5 * c for a, b, c in zip(*X)]
    mag = [0.5 * a.abs() + 2.0 * b.abs() + 1.5 * c.abs() for a, b, c in zip(*X)]
    assert_elementwise(out, exp, mag, "out")


NAN_BITS = {  # signalling NaN, quiet NaN with a payload, negative NaN, -0.0, smallest subnormal
    torch.float32: (torch.int32, 32, [0x7F800001, 0x7FC12345, 0xFFC00001, 0x80000000, 0x1]),
    torch.float16: (torch.int16, 16, [0x7C01, 0x7E55, 0xFE01, 0x8000, 0x1]),
    torch.bfloat16: (torch.int16, 16, [0x7F81, 0x7FC5, 0xFF81, 0x8000, 0x1]),
    torch.float64: (torch.int64, 64, [0x7FF0000000000001, 0x7FF8000000012345, 0xFFF8000000000001,
                                      0x8000000000000000, 0x1]),
}


def test_restore_is_bit_exact_for_nan_payloads():
    """restore_ and restore_accumulate_ copy raw bits: NaN payloads and -0.0 survive."""
    for dtype, (ity, nbits, raw) in NAN_BITS.items():
        bits = torch.tensor([v - (1 << nbits) if v >= 1 << (nbits - 1) else v for v in raw] * 3, dtype=ity)
        b = bits.to(DEV).view(dtype)
        p = torch.zeros_like(b)
        ops.restore_([p], [b], backend=BE)
        assert torch.equal(p.view(ity).cpu(), bits)
        acc, g = torch.zeros_like(b), torch.zeros_like(b)
        p.zero_()
        ops.restore_accumulate_([p], [b], [acc], [g], 1.0, backend=BE)
        assert torch.equal(p.view(ity).cpu(), bits)


# ------------------------------------------------------------------ > 2^31 elements

def test_tensor_over_2_31_elements():
    """A bfloat16 tensor of 2^31 + 4099 elements (split across two launches at the default
    geometry, with a vector tail) through norm (aligned and misaligned views), gram,
    perturb_ and restore_."""
    n = 2**31 + 4099
    need = 5 * n * 2 + (2 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device=DEV).manual_seed(1234)
    buf = torch.randn(n + 1, generator=gen, device=DEV, dtype=torch.bfloat16)
    buf[-3] = 4096.0  # far past 2^31: a block that missed it would change the norm by ~0.8%
    buf[2**31 + 5] = -3000.0
    x_al, x_mis = buf[:n], buf[1:]

    def sumsq(t):
        s = 0.0
        for i in range(0, t.numel(), 1 << 28):
            s += t[i:i + (1 << 28)].double().pow(2).sum().item()
        return s

    for x in (x_al, x_mis):
        exp = math.sqrt(sumsq(x))
        got = ops.norm([x], backend=BE).item()
        assert abs(got - exp) <= 2e-5 * exp, (got, exp)
    y = buf[1:]  # misaligned against x_al: gram takes the scalar path
    G = ops.gram([[x_al], [y]], backend=BE).double().cpu()
    g01 = 0.0
    for i in range(0, n, 1 << 28):
        g01 += (x_al[i:i + (1 << 28)].double() * y[i:i + (1 << 28)].double()).sum().item()
    assert abs(G[0, 1].item() - g01) <= 2e-5 * math.sqrt(G[0, 0].item() * G[1, 1].item())
    del y, x_mis
    p = x_al
    g = torch.randn(n, generator=gen, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(p)
    p0 = p.clone()
    ops.perturb_([p], [g], [b], 0.5, backend=BE)
    assert torch.equal(b, p0)
    m = 1 << 20
    for lo in (0, 2**31 - m, n - m):
        exp = p0[lo:lo + m].double() + 0.5 * g[lo:lo + m].double()
        mag = p0[lo:lo + m].double().abs() + 0.5 * g[lo:lo + m].double().abs()
        err = (p[lo:lo + m].double() - exp).abs()
        assert torch.all(err <= EPS[torch.bfloat16] * exp.abs() + 8 * 2.0**-23 * mag), f"perturb near {lo}"
    p.fill_(float("nan"))
    ops.restore_([p], [b], backend=BE)
    assert torch.equal(p, p0)


# --------------------------------------------------------------- poisoned allocator

def test_results_written_into_poisoned_memory(rng):
    """norm/gram results and their workspaces come from the caching allocator: poison a
    private pool with NaN so that any element the kernels leave unwritten reads as NaN (or
    as a wild index)."""
    if not (hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")):
        pytest.skip("torch.cuda.MemPool/use_mem_pool are unavailable in this torch")
    L = Lists(SHAPES["mixed"] * 4, torch.float32, 2, rng, DEV)
    X, Y = f64(L[0]), f64(L[1])
    empties = [torch.empty(0, device=DEV), torch.empty(2, 0, device=DEV)]
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        def poison():
            junk = [torch.full((s,), float("nan"), device=DEV) for s in (1, 64, 1000, 50_000, 200_000, 1 << 20, 1 << 22)]
            del junk
        poison()
        probe = torch.empty(3, device=DEV)
        assert torch.isnan(probe).all(), "the pool did not hand back poisoned memory"
        del probe
        poison()
        total, per = ops.norm(L[0], per_tensor=True, backend=BE)
        poison()
        G = ops.gram([L[0], L[1]], backend=BE)
        poison()
        z, zper = ops.norm(empties, per_tensor=True, backend=BE)
        poison()
        Z = ops.gram([empties, empties], backend=BE)
        torch.cuda.synchronize()
    exp_per = torch.stack([t.pow(2).sum().sqrt() for t in X])
    torch.testing.assert_close(per.double().cpu(), exp_per, rtol=2e-5, atol=0)
    torch.testing.assert_close(total.double().cpu(), exp_per.pow(2).sum().sqrt(), rtol=2e-5, atol=0)
    exp = torch.tensor([[sum((a * b).sum().item() for a, b in zip(P, Q)) for Q in (X, Y)] for P in (X, Y)],
                       dtype=torch.float64)
    d = exp.diagonal().sqrt()
    assert torch.all((G.double().cpu() - exp).abs() <= 2e-5 * torch.outer(d, d)), (G, exp)
    assert z.item() == 0.0 and torch.equal(zper.cpu(), torch.zeros(2))
    assert torch.equal(Z.cpu(), torch.zeros(2, 2))


# ------------------------------------------------------------------------ CUDA graph

def _roga_cycle(params, grads, backup, acc, h, rho=0.05, alpha=0.01, k=3):
    n = ops.norm(grads, backend=BE)
    s = rho / (n + 1e-12) - alpha  # a 0-d device tensor: no host sync
    ops.perturb_(params, grads, backup, s, backend=BE)
    for hi, pi, gi in zip(h, params, grads):  # stands in for the second backward
        torch.sin(pi, out=hi)
        hi.add_(gi)
    ops.restore_accumulate_(params, backup, acc, h, 1.0 / k, backend=BE)
    return n


def test_cuda_graph_roga_cycle(rng):
    """A captured RoGA per-domain cycle (norm -> device scalar -> perturb_ ->
    restore_accumulate_) replays to the same bits as eager, and re-reads the scalar
    computed inside the graph when the gradients change."""
    L = Lists(SHAPES["mixed"] + [(300, 301)], "mixed", 5, rng, DEV)
    params, grads, backup, acc, h = L.lists
    snap = lambda: [t.clone() for t in params + grads + acc]  # noqa: E731

    def restore_state(state):
        for dst, src in zip(params + grads + acc, state):
            dst.copy_(src)

    start = snap()
    # eager reference, twice (second with new gradients)
    n_eager = _roga_cycle(params, grads, backup, acc, h).clone()
    eager1 = snap()
    new_g = [torch.randn(g.shape, generator=rng).to(DEV, g.dtype) for g in grads]
    for g, ng in zip(grads, new_g):
        g.copy_(ng)
    n_eager2 = _roga_cycle(params, grads, backup, acc, h).clone()
    eager2 = snap()

    restore_state(start)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture, as torch.cuda.graphs asks
        _roga_cycle([p.clone() for p in params], grads, [b.clone() for b in backup], [a.clone() for a in acc],
                    [x.clone() for x in h])
    torch.cuda.current_stream().wait_stream(s)
    restore_state(start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        n_graph = _roga_cycle(params, grads, backup, acc, h)
    restore_state(start)  # capture does not run the work, but be explicit about the state
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(n_graph, n_eager)
    for i, (x, y) in enumerate(zip(snap(), eager1)):
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), f"replay 1 differs at {i}"
    for g, ng in zip(grads, new_g):
        g.copy_(ng)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(n_graph, n_eager2) and not torch.equal(n_eager, n_eager2)
    for i, (x, y) in enumerate(zip(snap(), eager2)):
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), f"replay 2 differs at {i}"


# ---------------------------------------------------------------------- streams

def test_non_default_stream(rng):
    """Work goes to the current stream: queued behind a long sleep on a side stream, the
    kernels have not run when the default stream looks, and are right after the sync."""
    L = Lists(SHAPES["mixed"], torch.float32, 3, rng, DEV)
    p, g, b = L.lists
    p0 = [t.clone() for t in p]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time at ~2 GHz
        ops.perturb_(p, g, b, 2.0, backend=BE)
        n = ops.norm(p, backend=BE)
        G = ops.gram([p, g], backend=BE)
    early = [t.clone() for t in p]  # default stream: does not wait for `side`
    torch.cuda.current_stream().synchronize()
    assert_bits_equal(early, p0, "params before the side stream ran")
    side.synchronize()
    P, Gr = f64(p0), f64(g)
    exp_p = [x + 2.0 * y for x, y in zip(P, Gr)]
    assert_elementwise(p, exp_p, [x.abs() + 2.0 * y.abs() for x, y in zip(P, Gr)], "params")
    exp_n = math.sqrt(sum(t.pow(2).sum().item() for t in f64(p)))
    assert abs(n.item() - exp_n) <= 2e-5 * exp_n
    g01 = sum((x * y).sum().item() for x, y in zip(f64(p), Gr))
    assert abs(G[0, 1].item() - g01) <= 2e-5 * math.sqrt(G[0, 0].item() * G[1, 1].item())


# ------------------------------------------------------------------ determinism, limits

def test_deterministic_large(rng):
    """Same input, same bits, over lists of millions of elements in mixed dtypes."""
    shapes = [(int(torch.randint(1, 1 << 20, (1,), generator=rng)),) for _ in range(24)]
    L = Lists(shapes, "mixed", 3, rng, DEV)
    first = None
    for _ in range(4):
        n, per = ops.norm(L[0], per_tensor=True, backend=BE)
        a = ops.norm(L[0], params=L[1], eta=0.1, backend=BE)
        G = ops.gram(L.lists, backend=BE)
        got = [t.cpu() for t in (n, per, a, G)]
        if first is None:
            first = got
        else:
            for x, y in zip(first, got):
                assert torch.equal(x, y)


def test_combine_eight_lists_device_weights(rng):
    """K = kMaxLists with float64 device weights, out aliasing the last input, mixed dtypes."""
    L = Lists(SHAPES["mixed"], "mixed", 8, rng, DEV)
    wv = [0.5, -1.0, 0.25, 2.0, -0.125, 1.5, -3.0, 0.75]
    X = [f64(l) for l in L.lists]
    ops.combine_(L[7], L.lists, torch.tensor(wv, dtype=torch.float64, device=DEV), backend=BE)
    exp = [sum(wv[a] * X[a][i] for a in range(8)) for i in range(len(X[0]))]
    mag = [sum(abs(wv[a]) * X[a][i].abs() for a in range(8)) for i in range(len(X[0]))]
    assert_elementwise(L[7], exp, mag, "out")
    L.check_guards()


def test_more_lists_than_the_kernels_take():
    x = [torch.randn(5, device=DEV)]
    with pytest.raises(ValueError, match="at most 8"):
        ops.gram([x] * 9, backend=BE)
    with pytest.raises(ValueError, match="at most 8"):
        ops.combine_(x, [x] * 9, [1.0] * 9, backend=BE)


def test_launch_limits_knob_checks_its_input():
    with pytest.raises(ValueError, match="multiple of 64"):
        _C()._cuda_launch_limits(100, 0, 0)
    old = _C()._cuda_launch_limits(128, 2, 3)
    try:
        assert _C()._cuda_launch_limits(*old) == [128, 2, 3]
    finally:
        _C()._cuda_launch_limits(*old)


# --------------------------------------------------------------- optimizer steps, no host sync

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(DEV)


def _losses(m, step, k=1):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(24, 16, generator=g).to(DEV)
    out = m(x)
    return [((out[:, j % 3] - 0.1 * j) ** 2).mean() for j in range(k)]


@contextlib.contextmanager
def _no_sync(on):
    """torch.cuda.set_sync_debug_mode("error") around the block when `on`: any host
    synchronisation inside raises."""
    if not on:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("kind", ["sam-copy", "sam-swap", "sam-clip", "roga", "roga-clip", "roga-capturable",
                                  "roga-capturable-clip", "pcgrad", "gradvac", "pcgrad-amp"])
def test_optimizer_calls_do_not_synchronise(kind):
    """The optimizer's own calls in a step (first_step / second_step; perturb / accumulate /
    step; backward(losses) less autograd's passes is not separable, so PCGrad's align() and
    step()) make no host synchronisation on CUDA from the second step on (the first builds
    the caches). Issue 12's capturable claim, checked the way torch.cuda.graphs needs it."""
    from roga_cuda import GradientAggregator, RoGA, SAM
    m = _mlp()
    kw = dict(lr=0.05, momentum=0.9)
    if kind.startswith("sam"):
        opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, strategy="swap" if kind == "sam-swap" else "copy",
                  max_grad_norm=1.0 if kind == "sam-clip" else None, **kw)
    elif kind.startswith("roga"):
        opt = RoGA(m.parameters(), torch.optim.SGD, rho=0.05, alpha=0.01, strategy="copy", num_domains=2,
                   max_grad_norm=1.0 if kind.endswith("clip") else None, capturable="capturable" in kind, **kw)
    else:
        opt = GradientAggregator(m.parameters(), torch.optim.SGD, method=kind.split("-")[0], seed=0, **kw)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8) if kind.endswith("amp") else None
    for step in range(3):
        strict = step > 0
        if kind.startswith("sam"):
            _losses(m, step)[0].backward()
            with _no_sync(strict):
                opt.first_step(zero_grad=True)
            _losses(m, step)[0].backward()
            with _no_sync(strict):
                opt.second_step(zero_grad=True)
        elif kind.startswith("roga"):
            opt.zero_grad(set_to_none="capturable" not in kind)
            for d in range(2):
                _losses(m, 10 * step + d)[0].backward()
                with _no_sync(strict):
                    opt.perturb()
                _losses(m, 10 * step + d)[0].backward()
                with _no_sync(strict):
                    opt.accumulate()
            with _no_sync(strict):
                opt.step()
        else:
            opt.zero_grad()
            opt.backward(_losses(m, step, k=3), align=False, scaler=scaler)
            with _no_sync(strict):
                opt.align()
                if scaler is not None:
                    scaler.step(opt)
                else:
                    opt.step()
            if scaler is not None:
                scaler.update()
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_adam_checkpoint_counts_are_torch_s_cpu_counts():
    """The fused Adam keeps its counts on the device; state_dict() gives them as torch's
    non-capturable Adam keeps them (CPU tensors), so a plain torch Adam loads the checkpoint
    and continues as the fused path does."""
    from roga_cuda import SAM
    out = []
    for handover in (False, True):
        m = _mlp()
        opt = SAM(m.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
        for step in range(3):
            if handover and step == 2:
                sd = opt.state_dict()["base"]
                assert all(s["step"].device.type == "cpu" for s in sd["state"].values())
                plain = SAM(m.parameters(), torch.optim.Adam, rho=0.05, lr=0.01, fused=False)
                plain.load_state_dict(sd)
                opt = plain
            _losses(m, step)[0].backward()
            opt.first_step(zero_grad=True)
            _losses(m, step)[0].backward()
            opt.second_step(zero_grad=True)
        out.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _sam_graph_run(capture, steps=4):
    """SAM steps on a fixed batch: eagerly, or with first_step and second_step each captured
    once in a CUDA graph and replayed (the pattern of docs/optimizers.md, "CUDA graphs"):
    gradients stay allocated (zero_grad(set_to_none=False)), the backward passes run eagerly
    between the replays, the "copy" strategy."""
    from roga_cuda import SAM
    m = _mlp()
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(5)).to(DEV)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, strategy="copy")

    def backward():
        opt.zero_grad(set_to_none=False)
        (m(x) ** 2).mean().backward()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: caches, state, gradient tensors
        for _ in range(2):
            backward()
            opt.first_step()
            backward()
            opt.second_step()
    torch.cuda.current_stream().wait_stream(s)
    if not capture:
        for _ in range(steps):
            backward()
            opt.first_step()
            backward()
            opt.second_step()
    else:
        first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(first):
            opt.first_step()
        with torch.cuda.graph(second):
            opt.second_step()
        for _ in range(steps):
            backward()
            first.replay()
            backward()
            second.replay()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in m.parameters()]


def test_captured_sam_steps_replay_as_eager():
    """Issue 12: a SAM step captured in CUDA graphs and replayed equals eager (the same kernels
    on the same addresses: bit for bit)."""
    for a, b in zip(_sam_graph_run(False), _sam_graph_run(True)):
        assert torch.equal(a, b)


def _roga_graph_run(capture, steps=4, **kw):
    """RoGA(capturable=True) steps over 2 domains on fixed batches: eagerly, or with each
    optimizer call of one step (perturb, accumulate per domain, then step) captured once in
    its own CUDA graph and the graphs replayed in that order, the backward passes eager
    between them (docs/optimizers.md, "CUDA graphs")."""
    from roga_cuda import RoGA
    m = _mlp()
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(24, 16, generator=g).to(DEV) for _ in range(2)]
    opt = RoGA(m.parameters(), torch.optim.SGD, rho=0.05, alpha=0.01, lr=0.05, momentum=0.9, num_domains=2,
               capturable=True, **kw)

    def backward(d):
        (m(xs[d]) ** 2).mean().backward()

    def cycle(run):  # run(name, fn) per optimizer call, in step order
        opt.zero_grad(set_to_none=False)
        for d in range(2):
            backward(d)
            run(f"perturb{d}", opt.perturb)
            backward(d)
            run(f"accumulate{d}", opt.accumulate)
        run("step", opt.step)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: caches, state, gradient tensors, accumulators
        for _ in range(2):
            cycle(lambda name, fn: fn())
    torch.cuda.current_stream().wait_stream(s)
    if not capture:
        for _ in range(steps):
            cycle(lambda name, fn: fn())
    else:
        graphs = {}

        def record(name, fn):
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                fn()
        opt.zero_grad(set_to_none=False)
        for d in range(2):  # one capture pass through a step (nothing runs; the host state advances)
            record(f"perturb{d}", opt.perturb)
            record(f"accumulate{d}", opt.accumulate)
        record("step", opt.step)
        for _ in range(steps):
            cycle(lambda name, fn: graphs[name].replay())
    torch.cuda.synchronize()
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # the folded last accumulate() runs nothing
@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 0.5}], ids=["fold", "clip"])
def test_captured_roga_steps_replay_as_eager(kw):
    """Issue 12: a RoGA step (capturable=True) captured in CUDA graphs, one per optimizer
    call, and replayed equals eager bit for bit."""
    for a, b in zip(_roga_graph_run(False, **kw), _roga_graph_run(True, **kw)):
        assert torch.equal(a, b)
