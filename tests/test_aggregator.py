"""GradientAggregator: every weighting through the optimizer on a real model (every CI
backend), shared vs task-specific parameters, per-group GradVac, statistics, state_dict,
the folded step(closure). The weightings' own math is tested in tests/test_weightings*.py."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GradientAggregator, PCGrad
from roga_cuda.optim import aggregator, weightings

from conftest import backend_cases

METHODS = ["sum", "pcgrad", "gradvac", "mgda", "cagrad", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "nash_mtl",
           "random", "config"]


class Net(nn.Module):
    """A trunk and one head per task."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))

    def losses(self, x, ys):
        h = self.trunk(x)
        return [F.mse_loss(head(h).squeeze(1), y) for head, y in zip(self.heads, ys)]


def data(seed, k=3, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, [torch.randn(n, generator=g, dtype=torch.float64) * (j + 1) for j in range(k)]


def task_grads(net, x, ys):
    """Per task, the full flattened gradient (plain autograd)."""
    out = []
    for loss in net.losses(x, ys):
        gs = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, retain_graph=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                              for g, p in zip(gs, net.parameters())]))
    return torch.stack(out)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_its_weighting_on_a_real_model(backend, device, method):
    """.grad after backward() is sum_k w_k g_k with w the weighting (on the CPU) of the
    model's Gram matrix (a fresh weighting with the same seed replays the same draws); every
    backend on every device it runs on (CUDA's when there is one)."""
    net = Net().double().to(device)
    x, ys = data(1)
    x, ys = x.to(device), [y.to(device) for y in ys]
    J = task_grads(net, x, ys).cpu()
    opt = GradientAggregator(net.parameters(), torch.optim.SGD, method=method, lr=0.1, seed=5, backend=backend)
    opt.backward(net.losses(x, ys))
    got = torch.cat([p.grad.flatten() for p in net.parameters()]).cpu()
    kw = {"seed": 5} if method in ("pcgrad", "gradvac", "random") else {}
    w = weightings.make_weighting(method, **kw)(J @ J.T)
    torch.testing.assert_close(got, w @ J, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opt.stats["weights"].cpu(), w, rtol=1e-9, atol=1e-12)
    opt.step()


def _amp_steps(method, scale, steps=3, big=1.0, **extra):
    """Parameters after `steps` AMP steps (scale None: no scaler), float32, momentum SGD."""
    net = Net().float()
    opt = GradientAggregator(net.parameters(), torch.optim.SGD, method=method, lr=0.1, momentum=0.9, seed=5,
                             **extra)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    for s in range(steps):
        x, ys = data(40 + s)
        losses = net.losses(x.float(), [y.float() for y in ys])
        opt.zero_grad()
        opt.backward([losses[0] * big] + losses[1:], scaler=scaler)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return net, opt, scaler


@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_amp_takes_the_unscaled_step(method):
    """backward(scaler=...): the weights are those of the true gradients, so the step is the
    unscaled run's for every method: Nash-MTL's weights go as 1 / |g| (its step came out
    1 / scale too small when weighed on the scaled Gram matrix), and max_grad_norm clips the
    unscaled norm."""
    for extra in ({}, {"max_grad_norm": 0.05}):
        ref, opt_ref, _ = _amp_steps(method, None, **extra)
        got, opt, _ = _amp_steps(method, 2.0 ** 10, **extra)
        for p, q in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.stats["weights"], opt_ref.stats["weights"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(opt.stats["gram"].double(), opt_ref.stats["gram"].double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_skips_an_amp_overflow(method):
    """One task's scaled loss overflows float32: G is not finite, the weights are NaN, the
    scaler skips the step and backs off; parameters and momentum stay untouched."""
    net0 = Net().float()
    net, opt, scaler = _amp_steps(method, 2.0 ** 100, steps=1, big=1e30)
    assert scaler.get_scale() < 2.0 ** 100
    for p, q in zip(net.parameters(), net0.parameters()):
        assert torch.equal(p, q)
    assert all(st.get("momentum_buffer") is None for st in opt.base_optimizer.state_dict()["state"].values())
    assert not bool(opt.stats["finite"]) and torch.isnan(opt.stats["weights"]).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_shared_parameters_leave_heads_their_task_gradient(reduction):
    """With shared=trunk only the trunk is aligned; each head keeps its own task's gradient
    (torchjd's mtl_backward), whatever the reduction."""
    net = Net().double()
    x, ys = data(2)
    opt = GradientAggregator(net.parameters(), torch.optim.SGD, method="upgrad", reduction=reduction,
                             shared=net.trunk, lr=0.1)
    losses = net.losses(x, ys)
    head_grads = [torch.autograd.grad(l, list(h.parameters()), retain_graph=True) for l, h in zip(losses, net.heads)]
    trunk = list(net.trunk.parameters())
    Jt = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, trunk, retain_graph=True)])
                      for l in losses])
    opt.backward(losses)
    for h, hg in zip(net.heads, head_grads):
        for p, g in zip(h.parameters(), hg):
            torch.testing.assert_close(p.grad, g)
    w = weightings.UPGradWeighting()(Jt @ Jt.T) / (3 if reduction == "mean" else 1)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in trunk]), w @ Jt, rtol=1e-7, atol=1e-10)


def test_gradvac_groups_align_each_group_on_its_own():
    net = Net().double()
    groups = weightings.gradvac_groups(net, "layer")
    opt = GradientAggregator(net.parameters(), torch.optim.SGD, method="gradvac", groups=groups, lr=0.1, seed=1)
    x, ys = data(3)
    losses = net.losses(x, ys)
    Js = []
    for g in groups:
        Js.append(torch.stack([torch.cat([(t if t is not None else torch.zeros_like(p)).flatten() for t, p in
                                          zip(torch.autograd.grad(l, g, retain_graph=True, allow_unused=True), g)])
                               for l in losses]))
    opt.backward(losses)
    W = weightings.GradVacWeighting(seed=1)(torch.stack([J @ J.T for J in Js]))
    for g, J, w in zip(groups, Js, W):
        torch.testing.assert_close(torch.cat([p.grad.flatten() for p in g]), w @ J, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="groups= needs a per-group weighting"):
        GradientAggregator(net.parameters(), torch.optim.SGD, method="mgda", groups=groups, lr=0.1)


class Counting(weightings.Weighting):
    """A user weighting with state: task k's weight grows with the number of calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def weights(self, G):
        self.calls += 1
        return 1.0 + self.calls * torch.arange(G.shape[0], dtype=torch.float64, device=G.device) / 10

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@pytest.mark.parametrize("method", ["gradvac", "nash_mtl", "pcgrad", "random", Counting])
def test_state_dict_round_trip_with_weighting_state(method):
    """The weighting's state (EMA targets, kept weights, generators, a user's counter) travels
    in the optimizer's state_dict: a restored optimizer takes the same next steps."""
    def run(steps, net, opt):
        for s in steps:
            x, ys = data(10 + s)
            opt.zero_grad()
            opt.backward(net.losses(x, ys))
            opt.step()

    net = Net().double()
    opt = GradientAggregator(net.parameters(), torch.optim.Adam, method=method, lr=0.01, seed=2)
    run(range(3), net, opt)
    sd = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2 = GradientAggregator(net2.parameters(), torch.optim.Adam, method=method, lr=0.01, seed=99)
    opt2.load_state_dict(sd)
    run([7, 8], net, opt)
    run([7, 8], net2, opt2)
    for a, b in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = GradientAggregator(net2.parameters(), torch.optim.Adam, method="mgda", lr=0.01)
    with pytest.raises(ValueError, match=f"state is for method '{opt.method}', not 'mgda'"):
        other.load_state_dict(sd)


def test_folded_closure_step_equals_backward_then_step():
    """step(closure -> K losses): the combination runs inside the fused update (one pass)
    and .grad still holds the aggregated gradient afterwards."""
    res = []
    for folded in (False, True):
        net = Net().double()
        opt = PCGrad(net.parameters(), torch.optim.AdamW, lr=0.01, max_grad_norm=0.5)
        for s in range(3):
            x, ys = data(20 + s)
            opt.zero_grad()
            if folded:
                opt.step(lambda: net.losses(x, ys))
            else:
                opt.backward(net.losses(x, ys))
                opt.step()
        res.append((copy.deepcopy(list(net.parameters())), [p.grad.clone() for p in net.parameters()]))
    for a, b in zip(res[0][0] + res[0][1], res[1][0] + res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_custom_weighting_and_errors():
    class Half(weightings.Weighting):
        def weights(self, G):
            return torch.full((G.shape[0],), 0.5, dtype=torch.float64, device=G.device)

    net = Net().double()
    opt = GradientAggregator(net.parameters(), torch.optim.SGD, method=Half(), lr=0.1)
    x, ys = data(4)
    J = task_grads(net, x, ys)
    opt.backward(net.losses(x, ys))
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in net.parameters()]), 0.5 * J.sum(0))
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        GradientAggregator(net.parameters(), torch.optim.SGD, method="bogus", lr=0.1)
    with pytest.raises(TypeError, match="does not take these options"):
        GradientAggregator(net.parameters(), torch.optim.SGD, method="mgda", method_options={"beta": 3}, lr=0.1)
    with pytest.raises(ValueError, match="got one 0-d loss"):
        opt.backward(torch.tensor(1.0, requires_grad=True))
    # the legacy shortcuts go to the methods that take them, as before
    assert GradientAggregator(net.parameters(), torch.optim.SGD, method="gradvac", beta=0.3, lr=0.1).weighting.beta \
        == 0.3
    GradientAggregator(net.parameters(), torch.optim.SGD, method="pcgrad", beta=0.3, c=0.2, lr=0.1)


# ---------------------------------------------------------------- kept task gradients (persistent_grads)

class Tasks(nn.Module):
    """A trunk, one head per task (each reached by one task only), a parameter every task
    reaches with -0.0 gradient entries (a buffer reset to +0.0 would turn them into +0.0) and
    one no loss reaches."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(k))
        self.z = nn.Parameter(torch.randn(4))
        self.unused = nn.Parameter(torch.randn(3))

    def losses(self, x, ys, skip_z=()):
        h = self.trunk(x)
        out = [F.mse_loss(head(h).squeeze(1), y) for head, y in zip(self.heads, ys)]
        zt = (self.z * torch.tensor([-0.0, 0.0, -0.0, 1.0])).sum()
        return [l if i in skip_z else l + zt for i, l in enumerate(out)]


def _bits(t):
    return None if t is None else t.detach().clone().reshape(-1).view(torch.int32)


def _run(persistent, scenario, steps=3):
    """Bits of every .grad, parameter and the weights after each step of one scenario."""
    k = 2 if scenario == "k_changes" else 3
    net = Tasks(3)
    kw = dict(lr=0.01, weight_decay=0.1)  # the unused parameter would decay if it were stepped
    method, extra = "pcgrad", {}
    if scenario == "shared":
        method, extra = "upgrad", {"shared": net.trunk, "reduction": "mean"}
    elif scenario == "groups":
        method, extra = "gradvac", {"groups": weightings.gradvac_groups(net, "layer"), "seed": 3}
    elif scenario == "clip":
        extra = {"max_grad_norm": 0.05}
    elif scenario == "k_changes":
        method = "mgda"
    opt = GradientAggregator(net.parameters(), torch.optim.AdamW, method=method, persistent_grads=persistent,
                             **extra, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scenario == "amp" else None
    trace = []
    for s in range(steps):
        kk = k + (s % 2) if scenario == "k_changes" else k
        x, ys = data(30 + s, k=3)
        x, ys = x.float(), [y.float() for y in ys]
        opt.zero_grad()
        if scenario == "closure":
            opt.step(lambda: net.losses(x, ys))
        elif scenario in ("accumulate", "accumulate_partial"):
            for j, half in enumerate((slice(0, 8), slice(8, 16))):
                # partial: task 2 reaches z in the second micro-batch only (its kept set
                # holds the last step's gradient until then: replaced, not added to),
                # task 1 in the first only (what it got there stays in the sum)
                skip = ((2,) if j == 0 else (1,)) if scenario == "accumulate_partial" else ()
                opt.backward([l / 2 for l in net.losses(x[half], [y[half] for y in ys], skip)], align=False)
            opt.align()
            opt.step()
        else:
            opt.backward(net.losses(x, ys)[:kk], scaler=scaler)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        trace.append(([_bits(p.grad) for p in net.parameters()], [_bits(p) for p in net.parameters()],
                      opt.stats["weights"].clone()))
    return trace


@pytest.fixture(params=["fill", "hooks"])
def kept_fill(request, monkeypatch):
    """How the kept sets are filled: "fill" (reset to -0.0, autograd adds in place: these
    small tensors) or "hooks" (autograd's fresh gradients taken by post-accumulate hooks:
    tensors averaging >= _MMAP_BYTES, here any tensor)."""
    if request.param == "hooks":
        monkeypatch.setattr(aggregator, "_MMAP_BYTES", 1)
    return request.param


@pytest.mark.parametrize("scenario", ["plain", "shared", "groups", "clip", "accumulate", "accumulate_partial",
                                      "closure", "amp", "k_changes"])
def test_kept_task_gradients_give_bit_identical_steps(scenario, kept_fill):
    """persistent_grads (kept buffers, filled either way) against autograd's own fresh
    gradients: every .grad (None where it was None), parameter and weight bit for bit —
    -0.0 gradient entries, tasks that miss a parameter (in one micro-batch and not the
    other: "accumulate"), a parameter no loss reaches."""
    fresh, kept = _run(False, scenario), _run(True, scenario)
    if kept_fill == "hooks":
        assert _run(None, scenario)[-1][0][0].equal(kept[-1][0][0])  # the CPU default keeps them
    names = [n for n, _ in Tasks(3).named_parameters()]
    for (g0, p0, w0), (g1, p1, w1) in zip(fresh, kept):
        assert [g is None for g in g0] == [g is None for g in g1]
        assert g0[names.index("unused")] is None  # no loss reaches it: no gradient, not stepped
        for a, b in zip(g0 + p0, g1 + p1):
            assert a is None or torch.equal(a, b)
        assert torch.equal(w0, w1)
    if scenario == "plain":  # the case above is there: z's gradient has -0.0 entries
        iz = names.index("z")
        assert fresh[0][0][iz][0].item() == torch.tensor(-0.0).view(torch.int32).item()


def test_a_gradient_the_user_keeps_is_not_overwritten():
    """p.grad after a step is the first kept set: reused at the next backward unless the
    user still holds it or a view of it (then it stays theirs, as with fresh gradients)."""
    net = Net()
    opt = PCGrad(net.parameters(), torch.optim.SGD, lr=0.1, persistent_grads=True)

    def step(s):
        x, ys = data(40 + s)
        opt.zero_grad()
        opt.backward(net.losses(x.float(), [y.float() for y in ys]))
        opt.step()
        return [p.grad.untyped_storage().data_ptr() for p in net.parameters()]

    step(0)
    held = [p.grad for p in net.parameters()]
    snap = [g.clone() for g in held]
    ptr = step(1)
    assert all(torch.equal(a, b) for a, b in zip(held, snap))
    assert ptr != [g.untyped_storage().data_ptr() for g in held]
    view = next(net.parameters()).grad[0]
    vsnap = view.clone()
    del held
    ptr = step(2)
    assert torch.equal(view, vsnap)
    del view
    assert step(3) == ptr == step(4)  # nobody holds them: the same buffers every step


def test_kept_gradients_by_default_only_for_large_cpu_tensors():
    """persistent_grads=None keeps the sets where freed gradients page-fault (CPU tensors
    averaging >= 128 KiB); small tensors stay in the heap and would only pay autograd an
    in-place add per parameter per pass."""
    from roga_cuda.optim.aggregator import _worth_keeping
    big = [torch.zeros(80000), torch.zeros(3)]           # mean ~156 KiB
    small = [torch.zeros(1000) for _ in range(4)]         # 4 KiB each
    assert _worth_keeping(big) and not _worth_keeping(small) and not _worth_keeping([])
    assert not _worth_keeping([torch.zeros(40000, device="meta")])
    for params, kept in ((big, True), (small, False)):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = PCGrad(ps, torch.optim.SGD, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            opt.backward([sum((p * (k + 1)).sum() for p in ps) for k in range(2)])
            opt.step()
        assert ("kept" in opt._layout().memo) == kept


def test_backward_takes_the_task_gradients_and_puts_the_compile_config_back():
    """Small parameters (no kept sets): each pass's gradients are taken from .grad (cleared
    for the next pass, so nothing is summed across tasks); the passes that retain the graph
    run with AOTAutograd's donated buffers off, and the setting is put back afterwards."""
    fconfig = pytest.importorskip("torch._functorch.config")
    before = fconfig.donated_buffer
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    seen = []
    w.register_hook(lambda g: seen.append((fconfig.donated_buffer, w.grad)))
    opt = PCGrad([w], torch.optim.SGD, lr=0.0)
    x = w * 1.0
    opt.backward([x[0] * 3.0, x[1] * 5.0], align=False)
    assert [s[0] for s in seen] == [False, before] and fconfig.donated_buffer == before
    assert all(s[1] is None for s in seen) and w.grad is None  # .grad empty before every pass, and after
    (g0, g1), = zip(*opt._t.stash)
    assert torch.equal(g0, torch.tensor([3.0, 0.0])) and torch.equal(g1, torch.tensor([0.0, 5.0]))


def test_hooks_take_the_fresh_gradients_only_inside_backward(monkeypatch):
    """Kept sets on large tensors are taken by hooks: each pass's fresh gradient itself goes
    into its task's set, nothing copied (a hook registered before ours and one registered
    after see the same tensor); the last step's tensors are dropped as their successors
    arrive, never written (one the user holds keeps its values); a plain backward outside
    the aggregator is untouched; the hooks go with the optimizer."""
    import gc
    import weakref

    monkeypatch.setattr(aggregator, "_MMAP_BYTES", 1)
    net = Net()
    params = list(net.parameters())
    seen = {"before": {}, "after": {}}

    def recorder(where):
        return lambda p: seen[where].setdefault(id(p), []).append((id(p.grad), p.grad.clone()))

    hooks = [p.register_post_accumulate_grad_hook(recorder("before")) for p in params]
    opt = PCGrad(params, torch.optim.SGD, lr=0.1)
    last = []  # weak references to the last step's taken tensors
    held = snap = None
    for s in range(3):
        x, ys = data(60 + s)
        opt.zero_grad()
        for d in seen.values():
            d.clear()
        opt.backward(net.losses(x.float(), [y.float() for y in ys]), align=False)
        taken = [g for l in opt._t.stash for g in l if g is not None]
        kept_ids = {id(g) for st in opt._layout().memo["kept"] for g in st.grads if g is not None}
        assert {id(g) for g in taken} <= kept_ids
        assert any(g is None for l in opt._t.stash for g in l)  # a task that misses a head
        assert all(r() is None for r in last)  # the last step's, dropped (none is held)
        last = [weakref.ref(g) for g in taken]
        if s == 0:  # our hooks exist now: these run after them
            hooks += [p.register_post_accumulate_grad_hook(recorder("after")) for p in params]
        else:
            for p in params:
                before, after = seen["before"][id(p)], seen["after"][id(p)]
                assert len(before) == len(after) in (1, 3)  # one per pass that reaches p (a head: its task)
                for (fid, fval), (kid, kval) in zip(before, after):
                    assert fid == kid and fid in kept_ids and torch.equal(fval, kval)  # taken, not copied
        del taken
        opt.align()
        opt.step()
        if s == 1:  # the user keeps the aggregated gradient: it stays theirs
            held = [p.grad for p in params]
            snap = [g.clone() for g in held]
            last = [r for r in last if r() is None or all(r() is not g for g in held)]
    assert all(torch.equal(a, b) for a, b in zip(held, snap))
    # outside the aggregator's backward a loss reaches .grad as with no hooks of ours
    opt.zero_grad()
    x, ys = data(70)
    net.losses(x.float(), [y.float() for y in ys])[0].backward()
    kept_ids = {id(g) for st in opt._layout().memo["kept"] for g in st.grads if g is not None}
    assert all(p.grad is None or id(p.grad) not in kept_ids for p in params)
    assert any(p.grad is not None for p in params)
    ref = weakref.ref(opt._t.take_hooks)
    del opt
    gc.collect()
    assert ref() is None  # the optimizer's hooks are removed with it; the user's stay
    for h in hooks:
        h.remove()
    assert all(not p._post_accumulate_grad_hooks for p in params)


@pytest.mark.parametrize("persistent", [True, False])
def test_each_task_accumulates_into_the_same_buffers_every_step(persistent):
    """Kept (reset and added into, as for these small tensors): in every step pass k hands
    autograd the same tensors as .grad (the same objects, seen by weak references from a
    post-accumulate hook); fresh: new ones each step (what page-faults when glibc has
    returned the old ones to the OS; the benchmark's --faults-only counts it on ResNet-34)."""
    import weakref

    net = Net()
    opt = PCGrad(net.parameters(), torch.optim.SGD, lr=0.1, persistent_grads=persistent)
    seen = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: seen.append(weakref.ref(p.grad)))
             for p in net.parameters()]
    steps = []
    for s in range(3):
        x, ys = data(50 + s)
        seen.clear()
        opt.zero_grad()
        opt.backward(net.losses(x.float(), [y.float() for y in ys]))
        opt.step()
        steps.append(list(seen))  # weak: holding them would make them the user's
    for h in hooks:
        h.remove()
    # fresh: the task gradients of earlier steps were freed; kept: alive, and the same tensors
    assert all(r() is not None for r in steps[0] + steps[1]) == persistent
    assert all(a() is b() is c() for a, b, c in zip(*steps)) == persistent
