"""The fused base updates (ops.sgd_ / ops.adam_) on every backend, against torch.optim itself
(the update torch computes, up to float rounding) and against the reference for what torch
has no counterpart of: the K-list gradient, `source`, `grad_out` and found_inf."""
import itertools

import pytest
import torch

from roga_cuda import ops

from conftest import backend_cases

CASES = backend_cases()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(5, 3), (7,), (), (0,), (33,), (2, 1, 4)]


def _tol(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-7),
            torch.float16: (5e-3, 1e-3), torch.bfloat16: (3e-2, 1e-2)}[dtype]


def _params(dtype, device, g, shapes=SHAPES):
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]


def _grads_seq(params, g, steps, coupled_decay=False):
    """Random gradients; for 16-bit params of magnitude 0.25..2, where Adam's second moment
    stays out of float16's subnormal range (there torch's float16 arithmetic and ours, which
    rounds once from float32, legitimately part ways: that regime has no right answer).
    ``coupled_decay`` (Adam's weight_decay adds wd * p to the gradient): 16-bit gradients
    take the sign of p, so that g + wd * p cannot cancel into that range either (it did:
    torch's float16 Adam turned such an element into -inf, then NaN)."""
    def one(p):
        x = torch.randn(p.shape, generator=g)
        if p.dtype in (torch.float16, torch.bfloat16):
            sign = torch.where(p.cpu() >= 0, 1.0, -1.0) if coupled_decay else x.sign()
            x = sign * (0.25 + 1.75 * torch.rand(p.shape, generator=g))
        return x.to(p.dtype).to(p.device)
    return [[one(p) for p in params] for _ in range(steps)]


SGD_CONFIGS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
               dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.1, weight_decay=0.05),
               dict(lr=0.02, momentum=0.5, maximize=True, weight_decay=0.1)]
ADAM_CONFIGS = [(torch.optim.Adam, dict(lr=0.01)), (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
                (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
                (torch.optim.Adam, dict(lr=0.003, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)),
                (torch.optim.AdamW, dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05)),
                (torch.optim.Adam, dict(lr=0.01, betas=(0.0, 0.999)))]


def _light(backend, dtype):
    if backend == "triton" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("16-bit dtypes on the Triton interpreter: covered by float32/64 (same kernel, other DT)")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", range(len(SGD_CONFIGS)))
def test_sgd_matches_torch(backend, device, dtype, cfg, rng):
    _light(backend, dtype)
    kw = SGD_CONFIGS[cfg]
    ps = _params(dtype, device, rng)
    ref = [p.clone().requires_grad_() for p in ps]
    opt = torch.optim.SGD(ref, foreach=False, **kw)
    momentum = kw.get("momentum", 0)
    bufs = [torch.zeros_like(p) for p in ps] if momentum else None
    steps = [torch.zeros((), device=device) for _ in ps] if momentum else None
    for grads in _grads_seq(ps, rng, 4):
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        ops.sgd_(ps, grads, momentum_buffers=bufs, steps=steps, backend=backend, **kw)
    rtol, atol = _tol(dtype)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b.detach(), rtol=rtol * 4, atol=atol * 4)
    if momentum:
        for buf, r in zip(bufs, ref):
            torch.testing.assert_close(buf, opt.state[r]["momentum_buffer"], rtol=rtol * 4, atol=atol * 4)
        assert [float(s) for s in steps] == [4.0] * len(ps)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", range(len(ADAM_CONFIGS)))
def test_adam_matches_torch(backend, device, dtype, cfg, rng):
    _light(backend, dtype)
    cls, kw = ADAM_CONFIGS[cfg]
    ps = _params(dtype, device, rng)
    ref = [p.clone().requires_grad_() for p in ps]
    opt = cls(ref, foreach=False, **kw)
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    vmax = [torch.zeros_like(p) for p in ps] if kw.get("amsgrad") else None
    steps = [torch.zeros((), device=device) for _ in ps]
    kw2 = dict(kw, decoupled=cls is torch.optim.AdamW)
    coupled = cls is torch.optim.Adam and kw.get("weight_decay", 0) > 0
    for grads in _grads_seq(ps, rng, 4, coupled_decay=coupled):
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        ops.adam_(ps, grads, m, v, steps, max_exp_avg_sqs=vmax, backend=backend, **kw2)
    rtol, atol = _tol(dtype)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b.detach(), rtol=rtol * 8, atol=atol * 8)
    for r, mi, vi in zip(ref, m, v):
        torch.testing.assert_close(mi, opt.state[r]["exp_avg"], rtol=rtol * 4, atol=atol * 4)
        torch.testing.assert_close(vi, opt.state[r]["exp_avg_sq"], rtol=rtol * 4, atol=atol * 4)
    assert [float(s) for s in steps] == [4.0] * len(ps)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("k,source,grad_out,tensor_scalars", [
    (1, False, False, True), (2, True, True, False), (3, True, False, True), (2, False, True, True)])
def test_folded_forms_match_reference(backend, device, kind, k, source, grad_out, tensor_scalars, rng):
    """sum_k w_k grads[k], reading params from `source`, writing the gradient to `grad_out`,
    lr and weights as device tensors: equal to the reference backend (the spec)."""
    dtype = torch.float32
    base = _params(dtype, device, rng, shapes=[(5, 3), (7,), (), (40,)])
    grads = [_params(dtype, device, rng, shapes=[p.shape for p in base]) for _ in range(k)]
    src = _params(dtype, device, rng, shapes=[p.shape for p in base]) if source else None
    w = [0.5, -1.25, 2.0][:k]
    weights = torch.tensor(w, device=device) if tensor_scalars else w
    lr = torch.tensor(0.05, device=device) if tensor_scalars else 0.05
    out = {}
    for be in (backend, "reference"):
        ps = [p.clone() for p in base]
        st = [[torch.rand(p.shape, generator=torch.Generator().manual_seed(i)).to(device) for p in base]
              for i in range(3)]
        steps = [torch.full((), float(i % 3), device=device) for i in range(len(base))]
        go = [torch.full_like(p, float("nan")) for p in base] if grad_out else None
        common = dict(lr=lr, source=src, grad_weights=weights, grad_out=go, backend=be)
        if kind == "sgd":
            ops.sgd_(ps, grads, momentum_buffers=st[0], steps=steps, momentum=0.9, dampening=0.1,
                     weight_decay=0.01, **common)
        else:
            ops.adam_(ps, grads, st[0], st[1], steps, max_exp_avg_sqs=st[2], amsgrad=True, weight_decay=0.02,
                      **common)
        out[be] = (ps, st, steps, go)
    a, b = out[backend], out["reference"]
    for x, y in zip(a[0] + a[1][0] + a[1][1] + a[2], b[0] + b[1][0] + b[1][1] + b[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if grad_out:
        exp = [sum(wi * g[i] for wi, g in zip(w, grads)) for i in range(len(base))]
        for x, e in zip(a[3], exp):
            torch.testing.assert_close(x, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_found_inf_skips_but_restores(backend, device, kind, rng):
    """found_inf nonzero (GradScaler overflow): parameters, state and steps untouched, except
    that a source is still copied into the parameters (a folded restore)."""
    base = _params(torch.float32, device, rng, shapes=[(6,), (2, 3)])
    grads = [torch.full_like(p, float("inf")) for p in base]
    for source in (None, [p + 1 for p in base]):
        ps = [p.clone() for p in base]
        st = [torch.randn(p.shape, generator=rng).to(device) for p in base]
        st2 = [s.clone() for s in st]
        steps = [torch.zeros((), device=device) for _ in base]
        found = torch.ones(1, device=device)
        if kind == "sgd":
            ops.sgd_(ps, grads, lr=0.1, momentum_buffers=st, steps=steps, momentum=0.9, source=source,
                     found_inf=found, backend=backend)
        else:
            ops.adam_(ps, grads, st, st2, steps, lr=0.1, source=source, found_inf=found, backend=backend)
        expect = base if source is None else source
        for p, e in zip(ps, expect):
            assert torch.equal(p, e)
        assert [float(s) for s in steps] == [0.0, 0.0]
        ops.sgd_(ps, [torch.ones_like(p) for p in ps], lr=0.5, found_inf=torch.zeros(1, device=device),
                 backend=backend)
        for p, e in zip(ps, expect):
            torch.testing.assert_close(p, e - 0.5)


@pytest.mark.parametrize("backend,device", CASES)
def test_sgd_first_step_after_skipped_step(backend, device, rng):
    """torch's fused SGD loses its momentum initialisation when the first step is skipped;
    here the buffer still starts as the gradient at the first step that happens."""
    p = [torch.randn(5, generator=rng).to(device)]
    buf, steps = [torch.zeros(5, device=device)], [torch.zeros((), device=device)]
    g = [torch.randn(5, generator=rng).to(device)]
    ops.sgd_(p, g, lr=0.1, momentum_buffers=buf, steps=steps, momentum=0.9, dampening=0.5,
             found_inf=torch.ones(1, device=device), backend=backend)
    ops.sgd_(p, g, lr=0.1, momentum_buffers=buf, steps=steps, momentum=0.9, dampening=0.5,
             found_inf=torch.zeros(1, device=device), backend=backend)
    torch.testing.assert_close(buf[0], g[0])  # not (1 - dampening) * g


@pytest.mark.parametrize("backend,device", CASES)
def test_update_errors(backend, device):
    p, g = [torch.randn(3, device=device)], [torch.randn(3, device=device)]
    with pytest.raises(ValueError, match=r"sgd_: `momentum_buffers` has 0 tensors but `params` has 1"):
        ops.sgd_(p, g, lr=0.1, momentum=0.9, steps=[torch.zeros((), device=device)], backend=backend)
    with pytest.raises(ValueError, match=r"adam_: steps\[0\] must be a one-element float32 tensor"):
        ops.adam_(p, g, [torch.zeros(3, device=device)], [torch.zeros(3, device=device)],
                  [torch.zeros((), dtype=torch.float64, device=device)], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"sgd_: `grads\[1\]` has 2 tensors but `params` has 1"):
        ops.sgd_(p, [g, g + g], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"sgd_: got 1 weights for 2 lists"):
        ops.sgd_(p, [g, g], lr=0.1, grad_weights=[1.0], backend=backend)
    base = torch.randn(4, device=device)
    with pytest.raises(ValueError, match=r"sgd_: params\[0\] shares memory with source\[0\]"):
        ops.sgd_([base[:3]], g, lr=0.1, source=[base[1:]], backend=backend)
    with pytest.raises(ValueError, match="found_inf"):
        ops.sgd_(p, g, lr=0.1, found_inf=torch.zeros(2, device=device), backend=backend)
    with pytest.raises(ValueError, match="Nesterov"):
        ops.sgd_(p, g, lr=0.1, nesterov=True, backend=backend)


def test_update_ops_opcheck():
    if not ops.backends()["cpu"]["available"]:
        pytest.skip("compiled module not built")
    g = torch.Generator().manual_seed(0)
    ps = _params(torch.float32, "cpu", g, shapes=[(4, 3), (5,), ()])
    mk = lambda: [torch.randn(p.shape, generator=g) for p in ps]  # noqa: E731
    steps = [torch.zeros(()) for _ in ps]
    r = torch.ops.roga_cuda
    for lr_t, found in itertools.product([None, torch.tensor(0.1)], [None, torch.zeros(1)]):
        torch.library.opcheck(r.sgd_.default, (ps, mk(), mk() + mk(), [0.5, 0.5], None, mk(), mk(), steps, 0.1,
                                               lr_t, 0.9, 0.0, False, 0.01, False, found))
        torch.library.opcheck(r.adam_.default, (ps, [], mk(), [1.0], None, [], mk(), mk(), mk(), steps, 0.01,
                                                lr_t, 0.9, 0.999, 1e-8, 0.1, True, True, False, found))
