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


def _direct_run(kind, backend, device, base, grads, direct, found=None, maximize=False, **common):
    """One update of copies of base (state seeded identically per call); returns (params, state)."""
    ps = [p.clone() for p in base]
    st = [[torch.rand(p.shape, generator=torch.Generator().manual_seed(i)).to(base[0].dtype).to(device)
           for p in base] for i in range(3)]
    steps = [torch.full((), float(i % 3), device=device) for i in range(len(base))]
    if kind == "sgd":
        ops.sgd_(ps, grads, momentum_buffers=st[0], steps=steps, momentum=0.9, dampening=0.1, nesterov=False,
                 weight_decay=0.01, maximize=maximize, direct_weights=direct, found_inf=found, backend=backend,
                 **common)
    else:
        ops.adam_(ps, grads, st[0], st[1], steps, max_exp_avg_sqs=st[2], amsgrad=True, weight_decay=0.02,
                  decoupled=True, maximize=maximize, direct_weights=direct, found_inf=found, backend=backend,
                  **common)
    return ps, st[:2]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k,source,grad_out,tensor_scalars,maximize", [
    (1, False, False, False, False), (2, True, True, False, True), (2, False, False, True, False),
    (3, True, True, True, False)])
def test_direct_row_is_a_plain_step_after_the_update(backend, device, kind, dtype, k, source, grad_out,
                                                     tensor_scalars, maximize, rng):
    """direct_weights d (WSAM's decoupled term, folded into the update's pass): the result is
    the update with grad_weights, then params -= lr * sum_k d[k] grads[k], outside momentum,
    moments, weight decay and maximize. Checked against that two-call composition on the
    reference in float64 (the spec), then every backend against the reference."""
    base = _params(dtype, device, rng, shapes=[(5, 3), (7,), (), (0,), (300,), (2, 1, 4)])
    grads = [_params(dtype, device, rng, shapes=[p.shape for p in base]) for _ in range(k)]
    src = _params(dtype, device, rng, shapes=[p.shape for p in base]) if source else None
    w, d = [0.5, -1.25, 2.0][:k], [1.5, -0.75, 0.25][:k]
    as_arg = (lambda v: torch.tensor(v, device=device)) if tensor_scalars else (lambda v: v)
    lr = 0.05
    go = [torch.full_like(p, float("nan")) for p in base] if grad_out else None
    common = dict(lr=as_arg(lr), source=src, grad_weights=as_arg(w), grad_out=go)
    got, got_state = _direct_run(kind, backend, device, base, grads, as_arg(d), maximize=maximize, **common)
    ref, ref_state = _direct_run(kind, "reference", device, base, grads, as_arg(d), maximize=maximize, **common)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x, y in zip(got + got_state[0] + got_state[1], ref + ref_state[0] + ref_state[1]):
        torch.testing.assert_close(x, y, **tol)
    if grad_out:  # the combination's row only
        for x, i in zip(go, range(len(base))):
            torch.testing.assert_close(x, sum(wi * g[i] for wi, g in zip(w, grads)), **tol)
    if dtype == torch.float64 and backend == "reference":  # the spec against its definition
        two, two_state = _direct_run(kind, "reference", device, base, grads, None, maximize=maximize, **common)
        ops.sgd_(two, grads, lr=as_arg(lr), grad_weights=as_arg(d), backend="reference")
        for x, y in zip(ref + ref_state[0] + ref_state[1], two + two_state[0] + two_state[1]):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)
        assert any(not torch.equal(x, y) for x, y in zip(ref, _direct_run(kind, "reference", device, base, grads,
                                                                             None, maximize=maximize, **common)[0])
                   if x.numel())
    skipped, skipped_state = _direct_run(kind, backend, device, base, grads, as_arg(d),
                                         found=torch.ones(1, device=device), maximize=maximize, **common)
    for x, y in zip(skipped, src if source else base):  # AMP overflow: the direct term is skipped too
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("source", [False, True])
def test_grad_out_may_be_any_gradient_list(backend, device, kind, source, rng):
    """grad_out aliasing grads[1] (Friendly-SAM's average, rewritten in the pass that reads it):
    every gradient list, the direct row included, is read before grad_out is written, so the
    result equals the call with a separate grad_out."""
    base = _params(torch.float32, device, rng, shapes=[(5, 3), (7,), (), (0,), (300,), (2, 1, 4)])
    grads = [_params(torch.float32, device, rng, shapes=[p.shape for p in base]) for _ in range(2)]
    src = [p + 1 for p in base] if source else None
    common = dict(lr=0.05, source=src, grad_weights=[0.3, 0.7], maximize=True)
    sep = [torch.empty_like(p) for p in base]
    want, want_state = _direct_run(kind, backend, device, base, grads, [-0.7, 1.5], grad_out=sep, **common)
    aliased = [grads[0], [g.clone() for g in grads[1]]]
    got, got_state = _direct_run(kind, backend, device, base, aliased, [-0.7, 1.5], grad_out=aliased[1], **common)
    for x, y in zip(got + got_state[0] + got_state[1] + aliased[1], want + want_state[0] + want_state[1] + sep):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_direct_row_mixes_float_and_tensor_weights(backend, device, kind, rng):
    """One row as floats and the other as a (float64) device tensor: the same update as both
    as floats."""
    base = _params(torch.float64, device, rng, shapes=[(5, 3), (9,)])
    grads = [_params(torch.float64, device, rng, shapes=[p.shape for p in base]) for _ in range(2)]
    w, d = [0.5, -1.25], [1.5, -0.75]
    t = lambda v: torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
    want = _direct_run(kind, backend, device, base, grads, d, lr=0.05, grad_weights=w)[0]
    for gw, dw in ((w, t(d)), (t(w), d)):
        got = _direct_run(kind, backend, device, base, grads, dw, lr=0.05, grad_weights=gw)[0]
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend,device", CASES)
def test_direct_row_errors(backend, device):
    p, g = [torch.randn(3, device=device)], [torch.randn(3, device=device)]
    with pytest.raises(ValueError, match=r"sgd_: got 1 direct_weights for 2 lists"):
        ops.sgd_(p, [g, g], lr=0.1, direct_weights=[1.0], backend=backend)
    with pytest.raises(TypeError, match=r"adam_: `direct_weights` must be a sequence"):
        ops.adam_(p, g, [torch.zeros(3, device=device)], [torch.zeros(3, device=device)],
                  [torch.zeros((), device=device)], lr=0.1, direct_weights=1.0, backend=backend)
    with pytest.raises(ValueError, match=r"sgd_: got 4 weights for 2 lists"):  # the API's rows stay apart
        ops.sgd_(p, [g, g], lr=0.1, grad_weights=[1.0, 2.0, 3.0, 4.0], backend=backend)
    with pytest.raises(ValueError, match=r"sgd_: `direct_weights` must hold 2 values \(one per list\), got shape \[4\]"):
        ops.sgd_(p, [g, g], lr=0.1, direct_weights=torch.ones(4, device=device), backend=backend)


def test_direct_row_errors_of_the_operator():
    """The operator's one weights row takes K or 2K values (then the direct row), nothing else."""
    if not ops.backends()["cpu"]["available"]:
        pytest.skip("compiled module not built")
    p, g = [torch.randn(3)], [torch.randn(3), torch.randn(3)]
    r = torch.ops.roga_cuda
    with pytest.raises(ValueError, match=r"sgd_: got 3 weights for 2 lists \(give K, or 2K with the direct row\)"):
        r.sgd_(p, [], g, [1.0, 2.0, 3.0], None, [], [], [], 0.1, None, 0.0, 0.0, False, 0.0, False, None)
    with pytest.raises(ValueError, match=r"sgd_: `weights` must hold 2 or 2K values"):
        r.sgd_(p, [], g, [], torch.ones(5), [], [], [], 0.1, None, 0.0, 0.0, False, 0.0, False, None)
    with pytest.raises(ValueError, match=r"combine_: got 4 weights for 2 lists$"):  # combine_ has no direct row
        r.combine_(p, g, [1.0, 2.0, 3.0, 4.0], None)


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
        torch.library.opcheck(r.sgd_.default, (ps, [], mk() + mk(), [0.5, 0.5, 0.9, -0.9], None, [], mk(), steps,
                                               0.1, lr_t, 0.9, 0.0, False, 0.01, False, found))  # direct row
        torch.library.opcheck(r.adam_.default, (ps, [], mk(), [], torch.tensor([1.0, 0.3]), [], mk(), mk(), [],
                                                steps, 0.01, lr_t, 0.9, 0.999, 1e-8, 0.1, True, False, False, found))
