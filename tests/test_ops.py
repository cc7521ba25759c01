"""The primitive contract (DESIGN.md), for every available backend, against float64 math.

Inputs are fresh random lists on every run (the seed is printed on failure), carved out of
guarded buffers (out-of-bounds writes fail); outputs are poisoned with NaN before the call
(unwritten elements fail).
"""
import math

import pytest
import torch

from roga_cuda import ops

from conftest import backend_cases
from util import SHAPES, Lists, assert_bits_equal, assert_elementwise, f64, reduction_rtol

CASES = backend_cases()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, "mixed"]
# Every dtype on the mixed-shape and one-tensor lists; the 3000-tensor list in float32 and
# mixed dtypes (it tests the multi-tensor machinery, not the per-dtype math).
DTYPE_SHAPES = [pytest.param(sh, dt, id=f"{sh}-{dt}") for sh in ("mixed", "one") for dt in DTYPES] + [
    pytest.param("many", dt, id=f"many-{dt}") for dt in (torch.float32, "mixed")]


def _light(backend, device, shape_set):
    # The Triton interpreter costs ~1 ms per program: keep its lists short on CPU.
    if backend == "triton" and device == "cpu" and shape_set == "many":
        pytest.skip("3000-tensor lists are covered for triton in test_triton.py (interpreter cost)")


def _scalar(value, as_tensor, device):
    return torch.tensor(value, dtype=torch.float32, device=device) if as_tensor else value


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape_set,dtype", DTYPE_SHAPES)
def test_norm(backend, device, shape_set, dtype, rng):
    _light(backend, device, shape_set)
    L = Lists(SHAPES[shape_set], dtype, 2, rng, device)
    x = f64(L[0])
    total, per = ops.norm(L[0], per_tensor=True, backend=backend)
    exp_per = torch.stack([t.pow(2).sum().sqrt() for t in x])
    exp = exp_per.pow(2).sum().sqrt()
    out_dt = torch.float64 if torch.float64 in L.dtypes else torch.float32
    assert total.dtype == out_dt and per.dtype == out_dt and total.dim() == 0 and per.shape == (len(x),)
    assert total.device.type == device
    rtol = reduction_rtol(L.dtypes)
    torch.testing.assert_close(total.double().cpu(), exp, rtol=rtol, atol=0)
    torch.testing.assert_close(per.double().cpu(), exp_per, rtol=rtol, atol=0)
    assert ops.norm(L[0], backend=backend).dim() == 0
    # ASAM norm: || (|p| + eta) * g ||
    for eta in (0.0, 0.01):
        got = ops.norm(L[0], params=L[1], eta=eta, backend=backend)
        w = [(p.abs() + eta) * g for p, g in zip(f64(L[1]), x)]
        exp = torch.stack([t.pow(2).sum() for t in w]).sum().sqrt()
        torch.testing.assert_close(got.double().cpu(), exp, rtol=rtol, atol=0)
    L.check_guards()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape_set,dtype", DTYPE_SHAPES)
@pytest.mark.parametrize("adaptive,tensor_scale", [(False, False), (False, True), (True, True)],
                         ids=["sam-float", "sam-tensor", "asam-tensor"])
def test_perturb_restore(backend, device, shape_set, dtype, adaptive, tensor_scale, rng):
    _light(backend, device, shape_set)
    L = Lists(SHAPES[shape_set], dtype, 3, rng, device)
    params, grads, backup = L[0], L[1], L[2]
    p0 = [p.clone() for p in params]
    for b in backup:
        b.fill_(float("nan"))  # poison: every element must be written
    s, eta = -0.37, (0.05 if adaptive else 0.0)
    ops.perturb_(params, grads, backup, _scalar(s, tensor_scale, device), adaptive=adaptive, eta=eta, backend=backend)
    assert_bits_equal(backup, p0, "backup")
    P, G = f64(p0), f64(grads)
    if adaptive:
        terms = [s * (p.abs() + eta) ** 2 * g for p, g in zip(P, G)]
    else:
        terms = [s * g for g in G]
    assert_elementwise(params, [p + t for p, t in zip(P, terms)], [p.abs() + t.abs() for p, t in zip(P, terms)],
                       "params", backend)
    for p in params:
        p.fill_(float("nan"))
    ops.restore_(params, backup, backend=backend)
    assert_bits_equal(params, p0, "restored params")
    L.check_guards()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape_set,dtype", DTYPE_SHAPES)
@pytest.mark.parametrize("tensor_weight", [False, True], ids=["float", "tensor"])
def test_restore_accumulate(backend, device, shape_set, dtype, tensor_weight, rng):
    _light(backend, device, shape_set)
    L = Lists(SHAPES[shape_set], dtype, 4, rng, device)
    params, backup, acc, grads = L[0], L[1], L[2], L[3]
    a0 = f64(acc)
    for p in params:
        p.fill_(float("nan"))
    w = 1.0 / 3.0
    ops.restore_accumulate_(params, backup, acc, grads, _scalar(w, tensor_weight, device), backend=backend)
    assert_bits_equal(params, backup, "params")
    G = f64(grads)
    w32 = float(torch.tensor(w, dtype=torch.float32))
    assert_elementwise(acc, [a + w32 * g for a, g in zip(a0, G)], [a.abs() + (w * g).abs() for a, g in zip(a0, G)],
                       "acc", backend)
    L.check_guards()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape_set,dtype", DTYPE_SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 8, 11])  # the CPU tiles rows by four: last tiles of 1, 2, 3, 4 rows
def test_gram(backend, device, shape_set, dtype, k, rng):
    _light(backend, device, shape_set)
    L = Lists(SHAPES[shape_set], dtype, k, rng, device)
    G = ops.gram(L.lists, backend=backend)
    X = [f64(l) for l in L.lists]
    exp = torch.tensor([[sum((x * y).sum().item() for x, y in zip(X[a], X[b])) for b in range(k)] for a in range(k)],
                       dtype=torch.float64)
    out_dt = torch.float64 if torch.float64 in L.dtypes else torch.float32
    assert G.shape == (k, k) and G.dtype == out_dt and G.device.type == device
    d = exp.diagonal().sqrt()
    tol = reduction_rtol(L.dtypes) * torch.outer(d, d) + 1e-30
    err = (G.double().cpu() - exp).abs()
    assert torch.all(err <= tol), f"gram error {err.max().item():.3g} (max tol {tol.max().item():.3g})\n{G}\n{exp}"
    assert torch.equal(G.cpu(), G.cpu().T), "gram must be exactly symmetric"
    L.check_guards()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape_set,dtype", DTYPE_SHAPES)
@pytest.mark.parametrize("k,alias,wkind", [(1, None, "floats"), (1, 0, "tensor1d"), (2, None, "tensor1d"),
                                           (2, 0, "floats"), (2, -1, "tensors"), (3, 0, "tensor1d"),
                                           (5, None, "tensors"), (5, -1, "floats")])
def test_combine(backend, device, shape_set, dtype, k, alias, wkind, rng):
    _light(backend, device, shape_set)
    L = Lists(SHAPES[shape_set], dtype, k + 1, rng, device)
    lists = L.lists[:k]
    wv = [0.5, -1.25, 2.0, 0.125, -3.0][:k]
    weights = {"floats": wv,
               "tensors": [torch.tensor(w, device=device) for w in wv],
               "tensor1d": torch.tensor(wv, device=device)}[wkind]
    X = [f64(l) for l in lists]
    if alias is None:
        out = L.lists[k]
        for o in out:
            o.fill_(float("nan"))
    else:
        out = lists[alias]
    ops.combine_(out, lists, weights, backend=backend)
    exp = [sum(wv[a] * X[a][i] for a in range(k)) for i in range(len(out))]
    mag = [sum(abs(wv[a]) * X[a][i].abs() for a in range(k)) for i in range(len(out))]
    assert_elementwise(out, exp, mag, "out", backend)
    L.check_guards()


@pytest.mark.parametrize("backend,device", CASES)
def test_big_tensor(backend, device, rng):
    """A tensor over 10M elements next to small ones, through every primitive."""
    shapes = [(3,), (10_000_019,), (5, 7)]
    L = Lists(shapes, torch.float32, 3, rng, device)
    x = f64(L[0])
    total = ops.norm(L[0], backend=backend)
    exp = math.sqrt(sum(t.pow(2).sum().item() for t in x))
    assert abs(total.item() - exp) <= 2e-5 * exp
    G = ops.gram([L[0], L[1]], backend=backend)
    # foreach's gram is one float32 GEMM row of 10M: ~4e-4 relative; the compiled backends ~1e-6.
    rtol = 2e-3 if backend == "foreach" and device == "cpu" else 2e-5
    g01 = sum((a * b).sum().item() for a, b in zip(x, f64(L[1])))
    assert abs(G[0, 1].item() - g01) <= rtol * exp * G[1, 1].sqrt().item()
    p0 = [p.clone() for p in L[0]]
    ops.perturb_(L[0], L[1], L[2], 0.5, backend=backend)
    assert_elementwise(L[0], [p + 0.5 * g for p, g in zip(x, f64(L[1]))],
                       [p.abs() + 0.5 * g.abs() for p, g in zip(x, f64(L[1]))], "params")
    ops.restore_(L[0], L[2], backend=backend)
    assert_bits_equal(L[0], p0, "params")
    L.check_guards()


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "triton" or c.values[1] != "cpu"])
def test_norm_of_one_huge_tensor(backend, device):
    """2^28 ones: exactly 16384. torch._foreach_norm alone gives sqrt(2^27) on CPU (issue 15
    bug 4), so the foreach backend must not hand it a single tensor this large."""
    n = 1 << 28
    assert ops.norm([torch.ones(n, device=device)], backend=backend).item() == 16384.0
    # a transposed (non-contiguous) bfloat16 matrix of 2^28 twos next to a small tensor
    big = torch.full((1 << 14, 1 << 14), 2.0, dtype=torch.bfloat16, device=device).t()
    total, per = ops.norm([big, torch.ones(3, dtype=torch.bfloat16, device=device)], per_tensor=True,
                          backend=backend)
    assert per[0].item() == 32768.0 and abs(total.item() - math.sqrt(2.0 ** 30 + 3)) <= 1e-6 * total.item()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_counts_every_element_once(backend, device, dtype):
    """Ones with one 2 at a position near a boundary where a kernel could split a tensor
    (512-element blocks, the n % 4 tail, 32k-element pieces, and the quarters a four-stream
    kernel would split at): the squares sum to
    n + 3 exactly, and an element dropped or read twice moves the norm by ~3/(2n)."""
    for n in (2047, 2048, 2049, 2051, 8195, 32771, 100003):
        q = n // 4
        for i in sorted({0, q - 1, q, 2 * q, 3 * q - 1, 4 * q - 1, min(4 * q, n - 1), n - 1}):
            x = torch.ones(n, dtype=dtype, device=device)
            x[i] = 2.0
            total, per = ops.norm([x, x[:5]], per_tensor=True, backend=backend)
            torch.testing.assert_close(per[0].double().cpu(), torch.tensor(math.sqrt(n + 3), dtype=torch.float64),
                                       rtol=1e-7, atol=0, msg=f"n={n}, the 2 at {i}")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_propagates(backend, device, dtype, rng):
    L = Lists(SHAPES["mixed"], dtype, 3, rng, device)
    assert torch.isfinite(ops.norm(L[0], backend=backend))
    L[1][6].view(-1)[5] = float("inf")
    L[2][9].view(-1)[11] = float("nan")
    assert torch.isinf(ops.norm(L[1], backend=backend))
    assert torch.isnan(ops.norm(L[2], backend=backend))
    assert torch.isnan(ops.norm(L[1] + L[2], backend=backend))
    G = ops.gram(L.lists, backend=backend).cpu()
    assert torch.isfinite(G[0, 0]) and torch.isinf(G[1, 1]) and torch.isnan(G[2, 2])
    assert not torch.isfinite(G[0, 1]) and torch.isnan(G[0, 2]) and torch.isnan(G[1, 2])


@pytest.mark.parametrize("backend,device", CASES)
def test_deterministic(backend, device, rng):
    """Same input, same bits: reductions do not depend on timing or thread count."""
    L = Lists(SHAPES["mixed"] * 3, torch.float32, 2, rng, device)
    n1, p1 = ops.norm(L[0], per_tensor=True, backend=backend)
    g1 = ops.gram(L.lists, backend=backend)
    threads = torch.get_num_threads()
    # The compiled backends promise bits independent of the thread count; the torch-based
    # ones are only checked for repeatability.
    counts = {1, threads, 2 * threads} if backend in ("cpu", "cuda", "triton") else {threads}
    try:
        for nt in counts:
            torch.set_num_threads(nt)
            n2, p2 = ops.norm(L[0], per_tensor=True, backend=backend)
            g2 = ops.gram(L.lists, backend=backend)
            assert torch.equal(n1, n2) and torch.equal(p1, p2) and torch.equal(g1, g2), f"{nt} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_lists(backend, device):
    ops.perturb_([], [], [], 1.0, backend=backend)
    ops.restore_([], [], backend=backend)
    ops.restore_accumulate_([], [], [], [], 1.0, backend=backend)
    ops.combine_([], [[], []], [1.0, 2.0], backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.norm([], backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.gram([[], []], backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.gram([], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_channels_last_and_views(backend, device, rng):
    """Dense tensors in any memory layout work (the kernels walk storage); strided views
    either work (reference, foreach) or raise a ValueError that names the problem."""
    x = torch.randn(4, 3, 5, 6, generator=rng).to(device).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 5, 6, generator=rng).to(device).to(memory_format=torch.channels_last)
    b = torch.empty_like(x)
    x0 = x.clone()
    ops.perturb_([x], [g], [b], 2.0, backend=backend)
    torch.testing.assert_close(x, x0 + 2.0 * g)
    torch.testing.assert_close(ops.norm([g], backend=backend).cpu(), g.double().norm().float().cpu())
    base = torch.randn(40, generator=rng).to(device)
    view = base[::2]
    try:
        n = ops.norm([view], backend=backend)
    except ValueError as e:
        assert "contiguous" in str(e)
    else:
        torch.testing.assert_close(n.cpu(), view.double().norm().float().cpu())
    other = torch.randn(20, generator=rng).to(device)
    before = base.clone()
    try:
        ops.combine_([view], [[view], [other]], [0.5, 2.0], backend=backend)
    except ValueError as e:
        assert "contiguous" in str(e)
        assert torch.equal(base, before)  # refused before touching anything
    else:  # the strided elements got 0.5 x + 2 y, the ones between them are untouched
        torch.testing.assert_close(base[::2], 0.5 * before[::2] + 2.0 * other)
        assert torch.equal(base[1::2], before[1::2])


@pytest.mark.parametrize("backend,device", CASES)
def test_version_counter_bumped(backend, device):
    """In-place kernels bump autograd's version counter, like in-place ATen ops."""
    p = torch.randn(10, device=device)
    g, b = torch.randn(10, device=device), torch.empty(10, device=device)
    v = p._version
    ops.perturb_([p], [g], [b], 1.0, backend=backend)
    assert p._version > v


@pytest.mark.parametrize("backend,device", CASES)
def test_does_not_track_autograd(backend, device):
    p = torch.randn(10, device=device, requires_grad=True)
    g, b = torch.randn(10, device=device), torch.empty(10, device=device)
    ops.perturb_([p], [g], [b], 1.0, backend=backend)  # a leaf that requires grad: allowed, under no_grad
    assert p.grad_fn is None and p.requires_grad
    assert not ops.norm([p], backend=backend).requires_grad
