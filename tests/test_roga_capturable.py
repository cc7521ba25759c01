"""RoGA(capturable=True): every tensor of a step stays in place (``.grad`` zeroed in place,
accumulators kept between steps), so the step can be captured in CUDA graphs. On CPU: it
takes exactly the eager steps, a steady-state step is one fixed program over the same
tensors (what a captured graph replays), and misuse gets a clear error. The captured replay
itself is tests/test_cuda.py::test_captured_roga_steps_replay_as_eager (needs a GPU)."""
import pytest
import torch
import torch.nn as nn

from roga_cuda import RoGA
from roga_cuda.optim import _utils

from conftest import backend_cases

BACKEND_NAMES = [p.values[0] for p in backend_cases() if p.values[1] == "cpu"]
K = 3


class Heads(nn.Module):
    """A trunk and a head per domain group: domains 0 and 2 use head 0, domain 1 head 1,
    head 2 none (it never gets a gradient)."""

    def __init__(self, seed=4):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def loss(self, d, x, y, heads=True):
        head = self.heads[(1 if d == 1 else 0) if heads else 0]
        return ((head(self.trunk(x)).squeeze(1) - y) ** 2).mean()


def _batches(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(6, 5, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)) for _ in range(K)]


def _step(opt, m, step, dtype, heads, scaler=None, overflow=False):
    opt.zero_grad(set_to_none=not opt.capturable)
    for d, (x, y) in enumerate(_batches(step, dtype)[:opt.num_domains]):
        for _ in range(2):
            loss = m.loss(d, x, y, heads) * (1e30 if overflow else 1.0)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if _ == 0:
                opt.perturb(scaler=scaler)
        opt.accumulate()
    opt.step(scaler=scaler)
    if scaler is not None:
        scaler.update()


CONFIGS = {  # name: (base optimizer, its kwargs, RoGA kwargs)
    "sgd-fold": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), {}),
    "nesterov-fold": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), {}),
    "adamw-fold": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), {}),
    "adam-amsgrad-clip": (torch.optim.Adam, dict(lr=0.01, amsgrad=True), dict(max_grad_norm=0.05)),
    "sgd-clip": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(max_grad_norm=0.05)),
    "sgd-unfused": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(fused=False)),
    "k1": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(num_domains=1)),
    "k1-clip": (torch.optim.SGD, dict(lr=0.1), dict(num_domains=1, max_grad_norm=0.05)),
    # head 1 in its own group: with domain heads only the last domain reaches that list
    "k2-groups-fold": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(num_domains=2, groups=True)),
    "k2-groups-clip": (torch.optim.Adam, dict(lr=0.01), dict(num_domains=2, groups=True, max_grad_norm=0.05)),
}


def _pair(config, dtype, backend="auto"):
    base, kw, extra = CONFIGS[config]
    extra = {"num_domains": K, **extra}
    groups = extra.pop("groups", False)
    out = []
    for capturable in (False, True):
        m = Heads().to(dtype)
        params = m.parameters()
        if groups:
            params = [{"params": [p for n, p in m.named_parameters() if not n.startswith("heads.1")]},
                      {"params": list(m.heads[1].parameters()), "lr": kw["lr"] / 2}]
        out.append((m, RoGA(params, base, rho=0.05, alpha=0.01, strategy="copy", backend=backend,
                            capturable=capturable, **extra, **kw)))
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("heads", [False, True], ids=["shared", "domain-heads"])
def test_capturable_takes_the_eager_steps(config, heads):
    """Bit for bit the steps of capturable=False, with the gradients left in the same .grad
    tensors step after step; after step() they hold the mean gradient, as in eager mode.
    With domain heads the first step is the one where gradients appear domain by domain; a
    domain then also sees the zeroed gradients of the heads it does not use, so its norm sums
    extra zeros in another order (last-bit differences, hence the float64 tolerance)."""
    (m0, eager), (m1, cap) = _pair(config, torch.float64)
    k = cap.num_domains
    if k == 1 and heads:
        pytest.skip("one domain reaches one head")
    grads = None
    for step in range(4):
        _step(eager, m0, step, torch.float64, heads)
        _step(cap, m1, step, torch.float64, heads)
        tol = dict(rtol=0, atol=0)
        if heads:  # (clip: the coefficient reaches the update as float32, so those last bits can flip it)
            tol = dict(rtol=1e-7, atol=1e-9) if "clip" in config else dict(rtol=1e-13, atol=1e-16)
        for (n, a), b in zip(m0.named_parameters(), m1.parameters()):
            torch.testing.assert_close(b, a, **tol, msg=(config, step, n))
            assert (a.grad is None) == (b.grad is None), (config, step, n)
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, **tol, msg=(config, step, n))
        now = [(id(p.grad), p.grad.data_ptr()) for p in m1.parameters() if p.grad is not None]
        if step >= 1:
            assert now == grads, "capturable=True must keep the .grad tensors"
        grads = now
    assert all(p.grad is None for p in m1.heads[2].parameters())


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capturable_backends_and_dtypes(backend, dtype):
    (m0, eager), (m1, cap) = _pair("adamw-fold", dtype, backend)
    for step in range(3):
        _step(eager, m0, step, dtype, False)
        _step(cap, m1, step, dtype, False)
    for a, b in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(a, b)


def test_capturable_with_amp_and_an_overflow():
    """GradScaler: scaled steps equal eager ones; an overflowing step changes nothing and
    leaves the .grad tensors in place."""
    (m0, eager), (m1, cap) = _pair("sgd-fold", torch.float32)
    s0, s1 = (torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2))
    for step in range(4):
        _step(eager, m0, step, torch.float32, False, s0, overflow=step == 2)
        before = [(p.detach().clone(), id(p.grad)) for p in m1.parameters()]
        _step(cap, m1, step, torch.float32, False, s1, overflow=step == 2)
        if step == 2:
            assert all(torch.equal(p, b) for p, (b, _) in zip(m1.parameters(), before))
            assert [id(p.grad) for p in m1.parameters()] == [g for _, g in before]
        for a, b in zip(m0.parameters(), m1.parameters()):
            assert torch.equal(a, b), step
    assert s0.get_scale() == s1.get_scale() < 1024.0


def test_capturable_closure_form():
    (m0, eager), (m1, cap) = _pair("sgd-fold", torch.float64)
    for step in range(3):
        for m, opt in ((m0, eager), (m1, cap)):
            batches = _batches(step, torch.float64)

            def closure(d, m=m, batches=batches):
                loss = m.loss(d, *batches[d], heads=False)
                loss.backward()
                return loss
            opt.step(closure, num_domains=K)
    for a, b in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_domains=3.*got num_domains=2"):
        cap.step(closure, num_domains=2)


class _Program(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops of one optimizer call and which long-lived tensors (parameters, .grad,
    optimizer state, RoGA's kept buffers) they touch, by storage. Any other tensor must be
    made within the call: with one graph captured per call, a temporary handed from one call
    to the next lives in the first graph's pool, which a later capture may reuse."""

    def __init__(self, known):
        super().__init__()
        self.known = known
        self.made = set()
        self.ops = []
        self.carried = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = []
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr()
                seen.append(self.known.get(ptr, "tmp"))
                if ptr not in self.known and ptr not in self.made and a.numel():
                    self.carried.append(func.__name__)
        self.ops.append((func.__name__, tuple(seen)))
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.add(t.untyped_storage().data_ptr())
        return out


def _long_lived(opt, m):
    ts = {}
    for n, p in m.named_parameters():
        ts[p.untyped_storage().data_ptr()] = "param " + n
        if p.grad is not None:
            ts[p.grad.untyped_storage().data_ptr()] = "grad " + n
    for p, st in opt.base_optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                ts[v.untyped_storage().data_ptr()] = f"state {k} {p.shape}"
    for i, b in enumerate(b for _, (_, bufs) in opt._perturber._lists.items() for b in bufs):
        ts.setdefault(b.untyped_storage().data_ptr(), f"backup {i}")
    kept = opt._layout().memo.get("roga_kept", {}).values()  # (K = 1 keeps none)
    for i, a in enumerate(a for acc in kept for a in acc):
        ts[a.untyped_storage().data_ptr()] = f"acc {i}"
    return ts


def _spied_step(opt, m, step, known):
    """_step with each optimizer call under its own _Program (the backward passes outside,
    as they stay eager between the replays)."""
    calls = []

    def spy(fn):
        with _Program(known) as prog:
            fn()
        calls.append(prog)
    opt.zero_grad(set_to_none=False)
    for d, (x, y) in enumerate(_batches(step, torch.float32)[:opt.num_domains]):
        m.loss(d, x, y).backward()
        spy(opt.perturb)
        m.loss(d, x, y).backward()
        spy(opt.accumulate)
    spy(opt.step)
    return calls


@pytest.mark.parametrize("capturable", [True, False])
@pytest.mark.parametrize("config", ["sgd-fold", "adamw-fold", "sgd-clip", "k1"])
def test_a_steady_step_is_one_fixed_program(config, capturable):
    """What a CUDA graph replays is the ops of the call it captured, on the same tensors. So
    once warm, every step must run the same ops over the same long-lived tensors, and no
    call may read a temporary an earlier call made. capturable=False fails this (its first
    domain's gradients become the accumulator, and .grad gets new tensors every step)."""
    eager, (m, opt) = _pair(config, torch.float32)
    if not capturable:
        m, opt = eager
    for step in range(2):
        _step(opt, m, step, torch.float32, True)
    known = _long_lived(opt, m)
    programs = []
    fixed = True
    for step in (2, 3, 4):
        calls = _spied_step(opt, m, step, known)
        programs.append([c.ops for c in calls])
        carried = [(i, c.carried) for i, c in enumerate(calls) if c.carried]
        fixed = fixed and not carried and _long_lived(opt, m) == known
        if capturable:
            assert not carried, carried
            assert _long_lived(opt, m) == known
    fixed = fixed and programs[0] == programs[1] == programs[2]
    assert fixed == capturable
    if capturable:
        touched = {t for call in programs[0] for _, ts in call for t in ts}
        assert any(t.startswith("grad") for t in touched) and any(t.startswith("param") for t in touched)


@pytest.mark.parametrize("kw, match", [
    (dict(), "give num_domains"),
    (dict(num_domains=2, alignment="hvp"), "alignment='hvp'"),
    (dict(num_domains=2, strategy="swap"), "strategy='swap'"),
    (dict(num_domains=2, interval=2), "interval"),
])
def test_capturable_refuses_what_it_cannot_capture(kw, match):
    m = Heads()
    with pytest.raises(ValueError, match=match):
        RoGA(m.parameters(), torch.optim.SGD, lr=0.1, capturable=True, **kw)


def test_grad_set_to_none_mid_step_is_named():
    """Within a capturable step the gradients must stay: a last domain that reaches fewer
    parameters than an earlier one (someone set .grad to None) is refused, not stepped with
    a partial gradient."""
    m = Heads()
    opt = RoGA(m.parameters(), torch.optim.SGD, lr=0.1, num_domains=2, capturable=True)
    x, y = _batches(0, torch.float32)[0]
    before = [p.detach().clone() for p in m.parameters()]
    for d in range(2):
        if d == 1:
            _utils.set_grads(list(m.heads[0].parameters()), None)  # what zero_grad() would do
        m.loss(d, x, y).backward()
        opt.perturb()
        m.loss(d, x, y).backward()
        if d == 1:
            with pytest.raises(RuntimeError, match="zero gradients in place"):
                opt.accumulate()
        else:
            opt.accumulate()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))  # restored
    opt.abort()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


def test_zero_grad_in_place_keeps_the_tensors():
    """zero_grad(set_to_none=False), which capture relies on: the same tensors, zeroed (one
    foreach call per group, not torch's loop); gradients that carry a graph
    (backward(create_graph=True)) are detached as torch does; parameters without one stay
    without."""
    m = Heads()
    opt = RoGA(m.parameters(), torch.optim.SGD, lr=0.1, num_domains=2, capturable=True)
    x, y = _batches(0, torch.float32)[0]
    m.loss(0, x, y).backward()
    before = {n: p.grad for n, p in m.named_parameters()}
    opt.zero_grad(set_to_none=False)
    for n, p in m.named_parameters():
        assert p.grad is before[n]
        assert p.grad is None or not p.grad.any()
    assert m.heads[1].weight.grad is None
    m.loss(0, x, y).backward(create_graph=True)
    assert m.trunk[0].weight.grad.requires_grad
    opt.zero_grad(set_to_none=False)
    assert not m.trunk[0].weight.grad.requires_grad and not m.trunk[0].weight.grad.any()


def test_a_step_short_of_num_domains_then_full_steps():
    """step() after fewer accumulate() calls than num_domains divides by the count (as eager
    mode does); the mean must then go into .grad, not make .grad the kept accumulator (the
    next step would add a domain into itself and zero it). (One shared head: a head a short
    step leaves out would be stepped with a zero gradient in capturable mode only.)"""
    (m0, eager), (m1, cap) = _pair("sgd-fold", torch.float64)
    for step, k in enumerate([3, 1, 3, 2, 3]):
        for m, opt in ((m0, eager), (m1, cap)):
            opt.zero_grad(set_to_none=not opt.capturable)
            for d, (x, y) in enumerate(_batches(step, torch.float64)[:k]):
                m.loss(d, x, y, heads=False).backward()
                opt.perturb()
                m.loss(d, x, y, heads=False).backward()
                opt.accumulate()
            opt.step()
        for a, b in zip(m0.parameters(), m1.parameters()):
            assert torch.equal(a, b), (step, k)
            if a.grad is not None:
                assert torch.equal(a.grad, b.grad), (step, k)
    kept = {id(t) for acc in cap._layout().memo["roga_kept"].values() for t in acc}
    assert not kept & {id(p.grad) for p in m1.parameters()}


@pytest.mark.parametrize("capturable", [False, True])
def test_a_failure_inside_accumulate_leaves_the_parameters_restored(monkeypatch, capturable):
    from roga_cuda.optim import roga as roga_module
    (m, opt), cap = _pair("sgd-fold", torch.float64)
    if capturable:
        m, opt = cap
    _step(opt, m, 0, torch.float64, True)
    before = [p.detach().clone() for p in m.parameters()]
    real = roga_module.ops.restore_accumulate_

    def broken(*args, **kwargs):
        raise RuntimeError("injected")
    opt.zero_grad()
    for d, (x, y) in enumerate(_batches(1, torch.float64)):
        m.loss(d, x, y).backward()
        opt.perturb()
        m.loss(d, x, y).backward()
        if d == 1:
            monkeypatch.setattr(roga_module.ops, "restore_accumulate_", broken)
            with pytest.raises(RuntimeError, match="injected"):
                opt.accumulate()
            break
        opt.accumulate()
    monkeypatch.setattr(roga_module.ops, "restore_accumulate_", real)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    opt.abort()
    _step(opt, m, 2, torch.float64, True)  # and it goes on
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_closure_failing_before_any_backward_raises_its_own_error():
    _, (m, opt) = _pair("sgd-fold", torch.float64)

    def closure(d):
        raise KeyError("from the closure")
    with pytest.raises(KeyError, match="from the closure"):
        opt.step(closure, num_domains=K)


def test_capturable_defaults():
    """zero_grad() zeroes in place by default; a base optimizer class that has its own
    `capturable` (torch's Adam, for fused=False) is built with it."""
    m = Heads()
    opt = RoGA(m.parameters(), torch.optim.Adam, lr=0.1, num_domains=2, capturable=True)
    assert opt.base_optimizer.defaults["capturable"] is True
    sgd = RoGA(m.parameters(), torch.optim.SGD, lr=0.1, num_domains=2, capturable=True)
    assert "capturable" not in sgd.base_optimizer.defaults
    x, y = _batches(0, torch.float32)[0]
    m.loss(0, x, y).backward()
    grads = [id(p.grad) for p in m.parameters()]
    sgd.zero_grad()
    assert [id(p.grad) for p in m.parameters()] == grads
    sgd.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())
