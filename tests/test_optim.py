"""Optimizers against independent step-by-step references written here from the papers'
math (plain per-parameter torch, flattened vectors where convenient) — none of this file
reuses roga_cuda.optim code except to drive it."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GradientAggregator, PCGrad, RoGA, SAM, freeze_bn_stats

from conftest import backend_cases
from util import batch, frozen_bn, loss_of, params_equal

BACKENDS = [p for p in backend_cases() if p.values[1] == "cpu"]
BACKEND_NAMES = [p.values[0] for p in BACKENDS]


def cnn(seed=0, dtype=torch.float64, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)]
    return nn.Sequential(*layers).to(dtype)


# ------------------------------------------------------------------------------ SAM

def ref_sam_step(model, base, x, y, rho, adaptive=False, eta=0.0):
    loss_of(model, x, y).backward()
    ps = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        w = [(p.abs() + eta if adaptive else torch.ones_like(p)) for p in ps]
        gnorm = torch.sqrt(sum(((wi * p.grad) ** 2).sum() for wi, p in zip(w, ps)))
        old = [p.clone() for p in ps]
        for wi, p in zip(w, ps):
            e = (wi ** 2 if adaptive else 1.0) * p.grad * rho / (gnorm + 1e-12)
            p.add_(e)
    model.zero_grad()
    with frozen_bn(model):
        loss_of(model, x, y).backward()
    with torch.no_grad():
        for p, o in zip(ps, old):
            p.copy_(o)
    base.step()
    base.zero_grad()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
@pytest.mark.parametrize("strategy", ["copy", "swap"])
def test_sam_matches_reference(backend, adaptive, eta, strategy):
    m_ref, m = cnn(), cnn()
    base_ref = torch.optim.SGD(m_ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=eta, backend=backend,
              strategy=strategy, lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(4):
        x, y = batch(step)
        ref_sam_step(m_ref, base_ref, x, y, 0.05, adaptive, eta)
        loss_of(m, x, y).backward()
        opt.first_step(zero_grad=True)
        with freeze_bn_stats(m):
            loss_of(m, x, y).backward()
        opt.second_step(zero_grad=True)
    params_equal(m_ref, m)  # includes BN running statistics


def test_sam_davda54_readme_example():
    """davda54/sam's README loop, with only the import changed."""
    model, m_ref = cnn(bn=False), cnn(bn=False)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    base_ref = torch.optim.SGD(m_ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        inputs, targets = batch(step)

        def closure():
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            return loss

        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step(closure)
        optimizer.zero_grad()
        ref_sam_step(m_ref, base_ref, inputs, targets, 0.05)
    params_equal(m_ref, model)


def test_sam_restore_is_bit_exact():
    m = cnn(dtype=torch.float32)
    before = copy.deepcopy(m.state_dict())
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.0, rho=0.5, strategy="copy")
    x, y = batch(0, dtype=torch.float32)
    loss_of(m, x, y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(next(m.parameters()), before["0.weight"])
    loss_of(m, x, y).backward()
    opt.second_step(zero_grad=True)  # lr=0: parameters must come back exactly
    for k, v in m.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k


def test_sam_param_groups_and_frozen_params():
    m_ref, m = cnn(bn=False), cnn(bn=False)
    for mm in (m_ref, m):
        mm[0].bias.requires_grad_(False)
    groups = lambda mm: [{"params": [mm[0].weight], "rho": 0.1}, {"params": list(mm[2:].parameters()) + [mm[0].bias]}]
    opt = SAM(groups(m), torch.optim.SGD, rho=0.05, lr=0.1)
    # reference: two groups with different rho, one global norm
    x, y = batch(0)
    base = torch.optim.SGD(m_ref.parameters(), lr=0.1)
    loss_of(m_ref, x, y).backward()
    ps = [p for p in m_ref.parameters() if p.grad is not None]
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in ps))
    old = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p in ps:
            p.add_(p.grad * (0.1 if p is m_ref[0].weight else 0.05) / (gnorm + 1e-12))
    m_ref.zero_grad()
    loss_of(m_ref, x, y).backward()
    with torch.no_grad():
        for p, o in zip(ps, old):
            p.copy_(o)
    base.step()
    loss_of(m, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(m, x, y).backward()
    opt.second_step(zero_grad=True)
    params_equal(m_ref, m)
    assert m[0].bias.grad is None


def test_sam_with_lr_scheduler_and_instance():
    m = cnn(bn=False)
    base = torch.optim.SGD(m.parameters(), lr=1.0)
    opt = SAM(None, base, rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for step in range(3):
            x, y = batch(step)
            loss_of(m, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.125) and opt.param_groups[0]["rho"] == 0.05


# ----------------------------------------------------------------------------- RoGA

def ref_roga_step(model, base, batches, rho, alpha, hvp=False):
    """RoGA from the paper: per domain an ascent rho g/||g|| plus alignment -alpha <h, g>.

    first order: gradient at theta + (rho/||g|| - alpha) g;
    hvp: h - alpha H(theta + eps) g with eps = rho g/||g||."""
    ps = list(model.parameters())
    acc = [torch.zeros_like(p) for p in ps]
    for x, y in batches:
        g = torch.autograd.grad(loss_of(model, x, y), ps)
        gnorm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        s = rho / (gnorm + 1e-12) - (0.0 if hvp else alpha)
        old = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p, gi in zip(ps, g):
                p.add_(s * gi)
        with frozen_bn(model):
            if hvp:
                h = torch.autograd.grad(loss_of(model, x, y), ps, create_graph=True)
                hg = torch.autograd.grad(h, ps, grad_outputs=g)
                h = [hi.detach() - alpha * v for hi, v in zip(h, hg)]
            else:
                h = torch.autograd.grad(loss_of(model, x, y), ps)
        with torch.no_grad():
            for p, o, a, hi in zip(ps, old, acc, h):
                p.copy_(o)
                a.add_(hi)
    for p, a in zip(ps, acc):
        p.grad = a / len(batches)
    base.step()
    base.zero_grad()


def roga_manual(opt, model, batches):
    opt.zero_grad()
    for x, y in batches:
        loss_of(model, x, y).backward()
        opt.perturb()
        with freeze_bn_stats(model):
            loss_of(model, x, y).backward(create_graph=opt.alignment == "hvp")
        opt.accumulate()
    opt.step()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("strategy", ["copy", "swap"])
@pytest.mark.parametrize("num_domains", [None, 3])
def test_roga_matches_reference(backend, strategy, num_domains):
    m_ref, m = cnn(), cnn()
    base_ref = torch.optim.SGD(m_ref.parameters(), lr=0.05, momentum=0.9)
    opt = RoGA(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.02, backend=backend, strategy=strategy,
               num_domains=num_domains, lr=0.05, momentum=0.9)
    for step in range(3):
        batches = [batch(10 * step + d) for d in range(3)]
        ref_roga_step(m_ref, base_ref, batches, 0.1, 0.02)
        roga_manual(opt, m, batches)
    params_equal(m_ref, m)


class DomainHeads(nn.Module):
    """A trunk and one head per domain group: domains 0 and 2 use head 0, domain 1 head 1;
    head 2 is used by none (its parameters never get a gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
        self.double()

    def loss(self, d, x, y):
        return ((self.heads[1 if d == 1 else 0](self.trunk(x)).squeeze(1) - y) ** 2).mean()


def _domain_batches(step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64))
            for _ in range(3)]


def ref_roga_step_partial(model, base, batches, rho, alpha):
    """RoGA's mean over domains when a domain reaches only some parameters: a domain adds
    nothing where it has no gradient (and ascends along the ones it has), and a parameter no
    domain reached gets no gradient at all (torch.optim then leaves it alone)."""
    ps = list(model.parameters())
    acc = [None] * len(ps)
    for d, (x, y) in enumerate(batches):
        g = torch.autograd.grad(model.loss(d, x, y), ps, allow_unused=True)
        gnorm = torch.sqrt(sum((gi ** 2).sum() for gi in g if gi is not None))
        old = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p, gi in zip(ps, g):
                if gi is not None:
                    p.add_((rho / (gnorm + 1e-12) - alpha) * gi)
        h = torch.autograd.grad(model.loss(d, x, y), ps, allow_unused=True)
        with torch.no_grad():
            for i, (p, o, hi) in enumerate(zip(ps, old, h)):
                p.copy_(o)
                if hi is not None:
                    acc[i] = hi.clone() if acc[i] is None else acc[i] + hi
    for p, a in zip(ps, acc):
        p.grad = None if a is None else a / len(batches)
    base.step()
    base.zero_grad(set_to_none=True)


@pytest.mark.parametrize("strategy", ["copy", "swap"])
@pytest.mark.parametrize("config", ["fold", "no_num_domains", "unfused", "clip"])
def test_roga_with_domain_specific_parameters(strategy, config):
    """A head only some domains use: the last domain's one-pass mean (and the fold into the
    update) covered only the parameters that domain reached. Its head was then dropped
    (fold) or left K times too large (the unfolded mean); a head no domain uses was stepped
    with a zero gradient (weight decay, momentum). Each configuration equals the reference."""
    m_ref, m = DomainHeads(), DomainHeads()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    base_ref = torch.optim.SGD(m_ref.parameters(), **kw)
    extra = {"fold": {"num_domains": 3}, "no_num_domains": {}, "unfused": {"num_domains": 3, "fused": False},
             "clip": {"num_domains": 3, "max_grad_norm": 1e9}}[config]
    opt = RoGA(m.parameters(), torch.optim.SGD, rho=0.05, alpha=0.01, strategy=strategy, **extra, **kw)
    unused = [p.detach().clone() for p in m.heads[2].parameters()]
    for step in range(3):
        batches = _domain_batches(step)
        ref_roga_step_partial(m_ref, base_ref, batches, 0.05, 0.01)
        opt.zero_grad()
        for d, (x, y) in enumerate(batches):
            m.loss(d, x, y).backward()
            opt.perturb()
            m.loss(d, x, y).backward()
            opt.accumulate()
        opt.step()
    # (clip: the clipping coefficient, 1 here, reaches the update as a float32 tensor with
    # the 1/K in it, so float64 parameters see float32 rounding there)
    tol = dict(rtol=1e-7, atol=1e-9) if config == "clip" else dict(rtol=1e-12, atol=1e-14)
    params_equal(m_ref, m, **tol)
    assert all(torch.equal(p, u) for p, u in zip(m.heads[2].parameters(), unused))


def test_roga_closure_form_and_hvp():
    for alignment in ("first_order", "hvp"):
        m_ref, m = cnn(), cnn()
        base_ref = torch.optim.SGD(m_ref.parameters(), lr=0.05)
        opt = RoGA(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.05, alignment=alignment, lr=0.05)
        for step in range(2):
            batches = [batch(10 * step + d) for d in range(3)]
            ref_roga_step(m_ref, base_ref, batches, 0.1, 0.05, hvp=alignment == "hvp")

            def closure(d, create_graph=False):
                loss = loss_of(m, *batches[d])
                loss.backward(create_graph=create_graph)
                return loss

            loss = opt.step(closure, num_domains=3, bn_model=m)
            assert loss.dim() == 0 and torch.isfinite(loss)
        params_equal(m_ref, m, rtol=1e-9, atol=1e-11)


def test_roga_first_order_matches_hvp_to_second_order():
    """grad L(theta + eps - alpha g) = h - alpha H g + O(alpha^2): halving alpha divides the gap by ~4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    theta = copy.deepcopy(model.state_dict())

    def update(alignment, alpha):
        model.load_state_dict(theta)
        opt = RoGA(model.parameters(), torch.optim.SGD, rho=0.05, alpha=alpha, alignment=alignment, lr=1.0)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.perturb()
        loss_of(model, x, y).backward(create_graph=alignment == "hvp")
        opt.accumulate()
        opt.step()
        return torch.cat([(theta[k] - v).reshape(-1) for k, v in model.state_dict().items()])

    gaps = []
    for alpha in (0.08, 0.04, 0.02):
        gaps.append((update("first_order", alpha) - update("hvp", alpha)).norm().item())
    r1, r2 = gaps[0] / gaps[1], gaps[1] / gaps[2]
    assert 3.0 < r1 < 5.0 and 3.0 < r2 < 5.0, gaps
    # and the alignment term itself is first order: the two differ from plain SAM by ~alpha
    assert gaps[0] < 0.05 * (update("hvp", 0.08) - update("hvp", 0.0)).norm().item()


def test_roga_bad_use():
    m = cnn(bn=False)
    opt = RoGA(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="without perturb"):
        opt.accumulate()
    with pytest.raises(RuntimeError, match="nothing accumulated"):
        opt.step()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.perturb()
    loss_of(m, x, y).backward()
    opt.perturb()
    loss_of(m, x, y).backward()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.perturb()
    with pytest.raises(RuntimeError, match="without accumulate"):
        opt.step()
    opt.abort()
    with pytest.raises(RuntimeError, match="returned None"):
        opt.step(lambda d: loss_of(m, x, y).backward(), num_domains=2)
    with pytest.raises(ValueError, match="num_domains"):
        opt.step(lambda d: loss_of(m, x, y), num_domains=None)
    with pytest.raises(ValueError, match="alignment"):
        RoGA(m.parameters(), torch.optim.SGD, alignment="second", lr=0.1)


def test_roga_abort_restores_parameters():
    m = cnn(bn=False, dtype=torch.float32)
    before = [p.detach().clone() for p in m.parameters()]
    opt = RoGA(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, strategy="copy")
    x, y = batch(0, dtype=torch.float32)
    loss_of(m, x, y).backward()
    opt.perturb()
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    opt.abort()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


# ---------------------------------------------------------------------------- PCGrad

def linear_tasks(U, dtype=torch.float64):
    """Parameters p_i and K losses L_k = sum_i <p_i, U[k][i]>: the task gradients are exactly U[k]."""
    params = [nn.Parameter(torch.randn(u.shape, dtype=dtype)) for u in U[0]]

    def losses():
        return [sum((p * u).sum() for p, u in zip(params, Uk)) for Uk in U]

    return params, losses


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def ref_pcgrad(gs, orders):
    """Yu et al.: for each i, project g_i' onto the normal plane of each conflicting g_j in order."""
    out = []
    for i, g in enumerate(gs):
        gi = g.clone()
        for j in orders[i]:
            d = gi @ gs[j]
            if d < 0:
                gi = gi - d / (gs[j] @ gs[j]) * gs[j]
        out.append(gi)
    return torch.stack(out).sum(0)


def make_U(seed, k, conflict=None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    U = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(k)]
    if conflict is not None and k == 2:
        a, b = flat(U[0]), flat(U[1])
        if (a @ b < 0) != conflict:
            U[1] = [-u for u in U[1]]
    return U


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_k2(backend, conflict, reduction):
    U = make_U(1, 2, conflict)
    params, losses = linear_tasks(U)
    opt = PCGrad(params, torch.optim.SGD, reduction=reduction, backend=backend, lr=1.0)
    opt.backward(losses())
    exp = ref_pcgrad([flat(u) for u in U], [[1], [0]]) / (2 if reduction == "mean" else 1)
    torch.testing.assert_close(flat([p.grad for p in params]), exp, rtol=1e-6, atol=1e-9)
    a, b = flat(U[0]), flat(U[1])
    cos = (a @ b / (a.norm() * b.norm())).item()
    assert opt.stats["cosine"][0, 1].item() == pytest.approx(cos, rel=1e-6)
    assert bool(opt.stats["any_conflict"]) == conflict and opt.conflict_rate == float(conflict)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b0 in zip(params, before):
        torch.testing.assert_close(p.detach(), b0 - p.grad)


def test_pcgrad_k3_random_order_is_one_of_the_orders():
    orders = list(itertools.product(itertools.permutations([1, 2]), itertools.permutations([0, 2]),
                                    itertools.permutations([0, 1])))
    for seed in range(100):  # three tasks whose projections depend on the order
        U = make_U(seed, 3)
        U[1] = [b - 1.2 * a for a, b in zip(U[0], U[1])]
        U[2] = [c - 1.2 * b for b, c in zip(U[1], U[2])]
        gs = [flat(u) for u in U]
        candidates = [ref_pcgrad(gs, o) for o in orders]
        if max((c - candidates[0]).norm().item() for c in candidates) > 1e-3:
            break
    else:
        raise AssertionError("no order-dependent example found")
    results = []
    for seed in (0, 1):
        params, losses = linear_tasks(U)
        opt = PCGrad(params, torch.optim.SGD, lr=1.0, seed=seed)
        for _ in range(4):
            opt.zero_grad()
            opt.backward(losses())
            got = flat([p.grad for p in params])
            assert any(torch.allclose(got, c, rtol=1e-9, atol=1e-12) for c in candidates)
            results.append(got)
    # same seed, same sequence of orders
    params, losses = linear_tasks(U)
    opt = PCGrad(params, torch.optim.SGD, lr=1.0, seed=0)
    for i in range(4):
        opt.zero_grad()
        opt.backward(losses())
        torch.testing.assert_close(flat([p.grad for p in params]), results[i])


def ref_gradvac(gs, targets, beta):
    """Wang et al. 2021 (K=2 order): raise cos(g_i', g_j) to the EMA target phi_hat."""
    out, new = [], targets.clone()
    for i, g in enumerate(gs):
        gi = g.clone()
        for j in [m for m in range(len(gs)) if m != i]:
            phi = (gi @ gs[j]) / (gi.norm() * gs[j].norm())
            t = targets[i, j]
            if phi < t:
                w = gi.norm() * (t * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - t ** 2)) / (gs[j].norm() * math.sqrt(1 - t ** 2))
                gi = gi + w * gs[j]
            new[i, j] = (1 - beta) * t + beta * phi
        out.append(gi)
    return torch.stack(out).sum(0), new


def test_gradvac_matches_reference_over_steps():
    params, _ = linear_tasks(make_U(0, 2))
    opt = PCGrad(params, torch.optim.SGD, method="gradvac", beta=0.3, lr=0.0)
    targets = torch.zeros(2, 2, dtype=torch.float64)
    for step in range(5):
        U = make_U(100 + step, 2, conflict=step % 2 == 0)
        losses = [sum((p * u).sum() for p, u in zip(params, Uk)) for Uk in U]
        opt.zero_grad()
        opt.backward(losses)
        exp, targets = ref_gradvac([flat(u) for u in U], targets, 0.3)
        torch.testing.assert_close(flat([p.grad for p in params]), exp, rtol=1e-6, atol=1e-9)


def simplex_grid(k, n):
    if k == 2:
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        return torch.stack([t, 1 - t], 1)
    pts = [(i / n, j / n) for i in range(n + 1) for j in range(n + 1 - i)]
    return torch.tensor([(a, b, 1 - a - b) for a, b in pts], dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_mgda_is_min_norm_point(k):
    """The optimizer's MGDA gradient (reduction "mean") is the min-norm point of the convex
    hull of the task gradients: checked by its optimality conditions (d = sum w_k g_k with w
    on the simplex; <g_k, d> >= |d|^2 for every k, with equality where w_k > 0), and against
    a grid search over the simplex for small K."""
    U = make_U(7 + k, k)
    gs = torch.stack([flat(u) for u in U])
    params, losses = linear_tasks(U)
    opt = PCGrad(params, torch.optim.SGD, method="mgda", reduction="mean", lr=1.0)
    opt.backward(losses())
    d = flat([p.grad for p in params])
    w = torch.linalg.lstsq(gs.T, d.unsqueeze(1)).solution.squeeze(1)  # d's coordinates on the gradients
    assert w.min() >= -1e-9 and abs(w.sum().item() - 1) < 1e-9
    dots = gs @ d
    dd = d @ d
    scale = gs.norm(dim=1).max() ** 2
    assert (dots >= dd - 1e-9 * scale).all()
    assert torch.all((w < 1e-9) | ((dots - dd).abs() <= 1e-9 * scale))
    if k <= 3:
        best = min(((W @ gs).norm().item() for W in simplex_grid(k, 400 if k == 3 else 100001).split(1)))
        assert d.norm().item() <= best + 1e-6


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_matches_formula(k):
    c = 0.5
    U = make_U(11 + k, k)
    gs = torch.stack([flat(u) for u in U])
    g0 = gs.mean(0)
    cc = c * g0.norm().item()
    grid = simplex_grid(k, 300 if k == 3 else 200001)
    gw = grid @ gs
    F_ = gw @ g0 + cc * gw.norm(dim=1)
    wbest = grid[F_.argmin()]
    gwb = wbest @ gs
    exp = (g0 + cc / gwb.norm() * gwb) / (1 + c * c)
    params, losses = linear_tasks(U)
    opt = PCGrad(params, torch.optim.SGD, method="cagrad", c=c, reduction="mean", lr=1.0)
    opt.backward(losses())
    got = flat([p.grad for p in params])
    tol = 2e-3 if k == 3 else 1e-4
    assert (got - exp).norm() <= tol * exp.norm(), ((got - exp).norm(), exp.norm())


def test_sum_method_and_stats_over_steps():
    params, _ = linear_tasks(make_U(0, 2))
    opt = PCGrad(params, torch.optim.SGD, method="sum", lr=0.0)
    flags = []
    for step in range(6):
        U = make_U(50 + step, 2, conflict=step in (1, 4))
        opt.zero_grad()
        opt.backward([sum((p * u).sum() for p, u in zip(params, Uk)) for Uk in U])
        torch.testing.assert_close(flat([p.grad for p in params]), flat(U[0]) + flat(U[1]))
        flags.append(bool(opt.stats["any_conflict"]))
    assert flags == [False, True, False, False, True, False]
    assert opt.conflict_rate == pytest.approx(2 / 6)
    assert opt.stats["steps"] == 6
    # an overflowing step (non-finite G, skipped by AMP) is neither a conflict nor counted
    opt.zero_grad()
    opt.backward([sum((p * float("inf")).sum() for p in params), sum(p.sum() for p in params)])
    assert not bool(opt.stats["finite"]) and opt.conflict_rate == pytest.approx(2 / 6)


def test_pcgrad_shared_graph_and_errors():
    m = cnn(bn=False)
    opt = PCGrad(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    out = m(x)  # one forward, two losses sharing the graph
    opt.backward([F.cross_entropy(out[:4], y[:4]), F.cross_entropy(out[4:], y[4:])])
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.backward([m(x).sum(0)[0:2]])
    with pytest.raises(ValueError, match="does not require grad"):
        opt.backward([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="method"):
        PCGrad(m.parameters(), torch.optim.SGD, method="bogus", lr=0.1)
    emb = nn.Embedding(10, 3, sparse=True)
    opt2 = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"norm: ts\[0\] is a Sparse tensor; only dense"):
        opt2.first_step()


def test_pcgrad_wrong_number_of_losses_with_pending_accumulation():
    params, losses = linear_tasks(make_U(0, 3))
    opt = PCGrad(params, torch.optim.SGD, lr=0.1)
    opt.backward(losses(), align=False)
    with pytest.raises(ValueError, match="pending"):
        opt.backward(losses()[:2])
    with pytest.raises(RuntimeError, match="align"):
        opt.step()


def test_pcgrad_gradient_accumulation_equals_full_batch():
    """Micro-batches with align=False, surgery once on the summed task gradients."""
    m_full, m_acc = cnn(bn=False), cnn(bn=False)
    x, y = batch(3, n=12)
    o1 = PCGrad(m_full.parameters(), torch.optim.SGD, lr=0.1)
    o2 = PCGrad(m_acc.parameters(), torch.optim.SGD, lr=0.1)
    out = m_full(x)
    o1.backward([F.cross_entropy(out[:, :2].float(), (y % 2)), F.cross_entropy(out, y)])
    o1.step()
    for mb in range(3):
        xs, ys = x[4 * mb:4 * mb + 4], y[4 * mb:4 * mb + 4]
        out = m_acc(xs)
        o2.backward([F.cross_entropy(out[:, :2].float(), ys % 2) / 3, F.cross_entropy(out, ys) / 3], align=False)
    o2.align()
    o2.step()
    params_equal(m_full, m_acc, rtol=1e-9, atol=1e-11)


def test_sam_gradient_accumulation_equals_full_batch():
    """Documented pattern: accumulate both passes over micro-batches (losses / M)."""
    m_full, m_acc = cnn(bn=False), cnn(bn=False)
    x, y = batch(4, n=12)
    o1 = SAM(m_full.parameters(), torch.optim.SGD, lr=0.1)
    o2 = SAM(m_acc.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(m_full, x, y).backward()
    o1.first_step(zero_grad=True)
    loss_of(m_full, x, y).backward()
    o1.second_step(zero_grad=True)
    mbs = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    for xs, ys in mbs:
        (loss_of(m_acc, xs, ys) / 3).backward()
    o2.first_step(zero_grad=True)
    for xs, ys in mbs:
        (loss_of(m_acc, xs, ys) / 3).backward()
    o2.second_step(zero_grad=True)
    params_equal(m_full, m_acc, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------- backends agree

def test_all_backends_take_the_same_steps():
    results = {}
    for be in BACKEND_NAMES:
        m = cnn(dtype=torch.float32)
        sam = SAM(m.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=be, strategy="copy")
        for step in range(2):
            x, y = batch(step, dtype=torch.float32)
            loss_of(m, x, y).backward()
            sam.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            sam.second_step(zero_grad=True)
        roga = RoGA(m.parameters(), torch.optim.SGD, lr=0.05, backend=be)
        roga_manual(roga, m, [batch(20 + d, dtype=torch.float32) for d in range(3)])
        pc = PCGrad(m.parameters(), torch.optim.SGD, lr=0.05, backend=be)
        out = m(batch(30, dtype=torch.float32)[0])
        pc.backward([out[:, 0].mean(), -out[:, 0].mean() + out[:, 1].mean()])
        pc.step()
        results[be] = [p.detach().clone() for p in m.parameters()]
    ref = results["reference"]
    for be, ps in results.items():
        for a, b in zip(ref, ps):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda s: f"{be}: {s}")


# -------------------------------------------------------------------- AMP, clipping

def test_clipping_matches_reference():
    m_ref, m = cnn(bn=False), cnn(bn=False)
    base = torch.optim.SGD(m_ref.parameters(), lr=0.1)
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=0.05)
    x, y = batch(0)
    # reference: SAM, then clip the second-pass gradient
    loss_of(m_ref, x, y).backward()
    ps = list(m_ref.parameters())
    gn = torch.sqrt(sum((p.grad ** 2).sum() for p in ps))
    old = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p in ps:
            p.add_(p.grad * 0.05 / (gn + 1e-12))
    m_ref.zero_grad()
    loss_of(m_ref, x, y).backward()
    with torch.no_grad():
        for p, o in zip(ps, old):
            p.copy_(o)
    torch.nn.utils.clip_grad_norm_(ps, 0.05)
    base.step()
    loss_of(m, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(m, x, y).backward()
    opt.second_step()
    params_equal(m_ref, m, rtol=1e-6, atol=1e-9)
    # PCGrad clips in Gram space: the final gradient has norm max_grad_norm
    params, losses = linear_tasks(make_U(5, 2, conflict=True))
    pc = PCGrad(params, torch.optim.SGD, lr=0.1, max_grad_norm=0.3)
    pc.backward(losses())
    assert flat([p.grad for p in params]).norm().item() == pytest.approx(0.3, rel=1e-5)


def _scaler(init_scale):
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


def test_amp_overflow_skips_every_optimizer():
    x, y = batch(0, dtype=torch.float32)
    for kind in ("sam", "roga", "pcgrad"):
        m = cnn(dtype=torch.float32)
        scaler = _scaler(2.0 ** 100)
        big = lambda l: l * 1e30  # noqa: E731  the scaled loss overflows float32: inf gradients
        before = copy.deepcopy(m.state_dict())
        if kind == "sam":
            opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
            scaler.scale(big(loss_of(m, x, y))).backward()
            opt.first_step(zero_grad=True)
            scaler.scale(big(loss_of(m, x, y))).backward()
            scaler.step(opt)
        elif kind == "roga":
            opt = RoGA(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
            for d in range(2):
                scaler.scale(big(loss_of(m, x, y))).backward()
                opt.perturb(scaler=scaler)
                scaler.scale(big(loss_of(m, x, y))).backward()
                opt.accumulate()
            opt.step(scaler=scaler)
        else:
            opt = PCGrad(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
            out = m(x)
            opt.backward([big(F.cross_entropy(out[:4], y[:4])), F.cross_entropy(out[4:], y[4:])], scaler=scaler)
            scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() < 2.0 ** 100, kind  # backed off
        for k, v in m.state_dict().items():
            if "running" not in k and "num_batches" not in k:
                assert torch.equal(v, before[k]), (kind, k)
        # no momentum was set: any state the fused update made is a fresh one (counts 0), and
        # torch's reading of it (state_dict) has no momentum buffer
        assert all(float(st.get("step", 0)) == 0 for st in opt.base_optimizer.state.values()), kind
        assert all(st.get("momentum_buffer") is None for st in opt.base_optimizer.state_dict()["state"].values())


def test_amp_scaled_update_equals_unscaled():
    x, y = batch(1, dtype=torch.float32)
    for kind in ("sam", "roga", "pcgrad"):
        res = []
        for scale in (None, 1024.0):
            m = cnn(dtype=torch.float32)
            scaler = _scaler(scale) if scale else None
            sc = (lambda l: scaler.scale(l)) if scaler else (lambda l: l)
            if kind == "sam":
                opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=0.5)
                sc(loss_of(m, x, y)).backward()
                opt.first_step(zero_grad=True)
                sc(loss_of(m, x, y)).backward()
                scaler.step(opt) if scaler else opt.step()
            elif kind == "roga":
                opt = RoGA(m.parameters(), torch.optim.SGD, lr=0.1, alpha=0.05, max_grad_norm=0.5)
                for d in range(2):
                    xb, yb = batch(10 + d, dtype=torch.float32)
                    sc(loss_of(m, xb, yb)).backward()
                    opt.perturb(scaler=scaler)
                    sc(loss_of(m, xb, yb)).backward()
                    opt.accumulate()
                opt.step(scaler=scaler)
            else:
                opt = PCGrad(m.parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=0.5)
                out = m(x)
                opt.backward([F.cross_entropy(out[:4], y[:4]), F.cross_entropy(out[4:], y[4:])], scaler=scaler)
                scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
            res.append([p.detach().clone() for p in m.parameters()])
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda s: f"{kind}: {s}")


def test_roga_rejects_gradscaler_step():
    m = cnn(dtype=torch.float32, bn=False)
    scaler = _scaler(1024.0)
    opt = RoGA(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0, dtype=torch.float32)
    scaler.scale(loss_of(m, x, y)).backward()
    opt.perturb(scaler=scaler)
    scaler.scale(loss_of(m, x, y)).backward()
    opt.accumulate()
    with pytest.raises(RuntimeError, match=r"call optimizer.step\(scaler=scaler\), then scaler.update\(\)"):
        scaler.step(opt)


# ------------------------------------------------------------------------ state_dict

@pytest.mark.parametrize("kind", ["sam", "roga", "gradvac3"])
def test_state_dict_round_trip_takes_the_same_next_step(kind):
    def make(m):
        if kind == "sam":
            return SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        if kind == "roga":
            return RoGA(m.parameters(), torch.optim.Adam, lr=0.01)
        return PCGrad(m.parameters(), torch.optim.SGD, method="gradvac", lr=0.1, momentum=0.9, seed=3)

    def step(m, opt, s):
        x, y = batch(s)
        if kind == "sam":
            loss_of(m, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            opt.second_step(zero_grad=True)
        elif kind == "roga":
            roga_manual(opt, m, [batch(s * 3 + d) for d in range(2)])
        else:
            out = m(x)
            opt.zero_grad()
            opt.backward([F.cross_entropy(out[:3], y[:3]), F.cross_entropy(out[3:6], y[3:6]), out.pow(2).mean()])
            opt.step()

    m1 = cnn()
    o1 = make(m1)
    for s in range(3):
        step(m1, o1, s)
    sd = copy.deepcopy(o1.state_dict())
    m2 = copy.deepcopy(m1)
    o2 = make(m2)
    o2.load_state_dict(sd)
    step(m1, o1, 9)
    step(m2, o2, 9)
    params_equal(m1, m2, rtol=0, atol=0)
    assert o2.param_groups is o2.base_optimizer.param_groups


BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
         "nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
         "adam": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
         "adamw": (torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.9)))}


def _sum_step(m, opt, s, overflow=False):
    """One plain step through the fused path (GradientAggregator, method "sum", one loss:
    the base update on the loss's gradient); overflow: an AMP overflow that must be skipped."""
    x, y = batch(s)
    opt.zero_grad()
    if overflow:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
        opt.backward([loss_of(m, x, y) * 1e300], scaler=scaler)  # (inf even in float64)
        scaler.step(opt)
    else:
        opt.backward([loss_of(m, x, y)])
        opt.step()


def _torch_step(m, base, s):
    x, y = batch(s)
    base.zero_grad()
    loss_of(m, x, y).backward()
    base.step()


@pytest.mark.parametrize("name", list(BASES))
def test_checkpoints_move_between_torch_and_the_fused_path(name):
    """torch.optim's own optimizer -> state_dict -> the fused path -> state_dict -> torch's
    again, with an AMP-skipped first step on the fused side and a switch to fused=False in the
    middle: the parameters are those of torch alone (the skipped step never happened). A
    skipped first SGD step once left a count of 0 that torch never advanced, so the next
    export reset the momentum, and fused=False took the unset zero buffer as set."""
    cls, kw = BASES[name]
    ref = cnn(dtype=torch.float64, bn=False)
    base_ref = cls(ref.parameters(), **kw)
    for s in range(6):
        _torch_step(ref, base_ref, s)

    m = cnn(dtype=torch.float64, bn=False)
    fused = GradientAggregator(m.parameters(), cls, method="sum", **kw)
    _sum_step(m, fused, 99, overflow=True)  # skipped: the fused side starts "unset"
    plain = cls(m.parameters(), **kw)
    plain.load_state_dict(copy.deepcopy(fused.state_dict()["base"]))
    _torch_step(m, plain, 0)
    _torch_step(m, plain, 1)
    fused = GradientAggregator(m.parameters(), cls, method="sum", **kw)
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))
    _sum_step(m, fused, 2)
    fused.fused = False  # torch steps the same state from here
    _sum_step(m, fused, 3)
    fused.fused = True
    _sum_step(m, fused, 4)
    plain = cls(m.parameters(), **kw)
    plain.load_state_dict(copy.deepcopy(fused.state_dict()["base"]))
    _torch_step(m, plain, 5)
    params_equal(ref, m, rtol=1e-12, atol=1e-14)


def test_fused_off_after_a_skipped_first_sgd_step():
    """SGD's first step skipped by AMP on the fused path, then fused=False: torch must start
    the momentum from the next gradient (the zero buffer was never set), and state_dict()
    must keep the live buffers."""
    cls, kw = BASES["sgd"]
    ref = cnn(dtype=torch.float64, bn=False)
    base_ref = cls(ref.parameters(), **kw)
    m = cnn(dtype=torch.float64, bn=False)
    opt = GradientAggregator(m.parameters(), cls, method="sum", **kw)
    _sum_step(m, opt, 99, overflow=True)
    opt.fused = False
    for s in range(2):
        _torch_step(ref, base_ref, s)
        _sum_step(m, opt, s)
    params_equal(ref, m, rtol=1e-12, atol=1e-14)
    assert all(st["momentum_buffer"] is not None for st in opt.state_dict()["base"]["state"].values())


def _copy_case(kind, m):
    """An optimizer of each kind whose state a copy must carry (momentum, step counts, the
    SAM variants' per-parameter buffers, GradVac's targets and generator, shared=, kept sets)."""
    import roga_cuda
    sgd = dict(lr=0.05, momentum=0.9)
    if kind in ("sam", "asam", "gsam", "wsam", "fsam", "looksam"):
        cls = {"sam": "SAM", "asam": "SAM", "gsam": "GSAM", "wsam": "WSAM", "fsam": "FriendlySAM",
               "looksam": "LookSAM"}[kind]
        extra = {"asam": dict(adaptive=True, rho=0.5), "looksam": dict(k=2)}.get(kind, {})
        return getattr(roga_cuda, cls)(m.parameters(), torch.optim.SGD, **sgd, **extra)
    if kind == "roga":
        return RoGA(m.parameters(), torch.optim.AdamW, lr=0.01, num_domains=2, interval=2)
    if kind == "gradvac_shared":
        return PCGrad(m.parameters(), torch.optim.SGD, method="gradvac", seed=3, shared=m[:2], **sgd)
    return PCGrad(m.parameters(), torch.optim.Adam, method="pcgrad", lr=0.01, seed=1, persistent_grads=True)


def _copy_step(kind, m, opt, s):
    x, y = batch(s)
    if kind == "roga":
        roga_manual(opt, m, [batch(s * 3 + d) for d in range(2)])
    elif kind in ("gradvac_shared", "pcgrad_kept"):
        out = m(x)
        opt.zero_grad()
        opt.backward([F.cross_entropy(out[:4], y[:4]), F.cross_entropy(out[4:], y[4:]), out.pow(2).mean()])
        opt.step()
    else:
        loss_of(m, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(m, x, y).backward()
        opt.second_step(zero_grad=True)


COPY_KINDS = ["sam", "asam", "gsam", "wsam", "fsam", "looksam", "roga", "gradvac_shared", "pcgrad_kept"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", COPY_KINDS)
def test_a_copy_takes_the_same_steps(kind, how):
    """copy.deepcopy / pickle of (model, optimizer) between steps, as for torch.optim: the copy
    takes the original's next steps exactly, on its own tensors. (torch's Optimizer pickles
    only defaults, state and param_groups: a copy of a wrapper used to fail with '_t'.)"""
    import pickle
    m = cnn(bn=False)
    opt = _copy_case(kind, m)
    for s in range(3):
        _copy_step(kind, m, opt, s)
    m2, opt2 = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], m2.parameters()))
    for s in range(3, 6):
        _copy_step(kind, m, opt, s)
        _copy_step(kind, m2, opt2, s)
    params_equal(m, m2, rtol=0, atol=0)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(m.parameters(), m2.parameters()))
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["wrapper"].keys() == sd2["wrapper"].keys()
    for (k, a), b in zip(sd["base"]["state"].items(), sd2["base"]["state"].values()):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda e: f"state {k} {key}: {e}")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_makes_its_own_hooks(how):
    """Large CPU tensors: the kept sets are filled by hooks on the parameters. The copy's
    parameters get their own (torch copies no hooks), and both train alike."""
    import pickle
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    opt = PCGrad(m.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9)
    x = torch.randn(8, 256)

    def step(m, opt):
        out = m(x)
        opt.zero_grad()
        opt.backward([out[:, :128].pow(2).mean(), out[:, 128:].mean()])
        opt.step()
    for _ in range(2):
        step(m, opt)
    assert opt._t.take_hooks is not None
    m2, opt2 = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
    for _ in range(2):
        step(m, opt)
        step(m2, opt2)
    assert opt2._t.take_hooks is not None and opt2._t.take_hooks is not opt._t.take_hooks
    params_equal(m, m2, rtol=0, atol=0)


def test_a_copy_in_the_middle_of_a_step_is_refused():
    m = cnn(bn=False)
    x, y = batch(0)
    sam = SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(m, x, y).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match=r"SAM cannot be copied or pickled between first_step\(\) and second_step"):
        copy.deepcopy(sam)
    roga = RoGA(m.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(m, x, y).backward()
    roga.perturb()
    with pytest.raises(RuntimeError, match=r"RoGA cannot be copied or pickled in the middle of a step"):
        copy.deepcopy(roga)
    pc = PCGrad(m.parameters(), torch.optim.SGD, lr=0.1)
    out = m(x)
    pc.backward([F.cross_entropy(out, y), out.pow(2).mean()], align=False)  # a micro-batch: sums pending
    with pytest.raises(RuntimeError, match=r"PCGrad cannot be copied or pickled between backward\(\) and step"):
        copy.deepcopy(pc)


@pytest.mark.parametrize("cls", ["SAM", "RoGA", "PCGrad", "GradientAggregator"])
def test_parameter_listed_twice_is_refused(cls):
    """torch only warns; the fused passes would write one tensor from two positions (issue 15 bug 1)."""
    import roga_cuda
    opt_cls = getattr(roga_cuda, cls)
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="listed twice"):
        opt_cls([q, p, p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="listed twice"):
        opt_cls([{"params": [q]}, {"params": [p, p]}], torch.optim.SGD, lr=0.1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="listed twice"):
        opt_cls(None, torch.optim.SGD([q, p, p], lr=0.1))
    opt = opt_cls([q], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kind", ["sam", "fsam"])
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.AdamW, dict(lr=0.1, amsgrad=True))], ids=["sgd", "adamw"])
@pytest.mark.parametrize("saved_cl", [False, True], ids=["saved-row-major", "saved-channels-last"])
def test_state_resumes_across_memory_layouts(kind, base, kw, saved_cl):
    """Optimizer state saved with the weights in one memory layout resumes on weights in the
    other (a checkpoint written before model.to(memory_format=torch.channels_last), or after),
    as torch.optim does: the fused kernels get the state in the weights' layout, and the next
    step equals the resume in the saved layout (float64; the layouts differ only in the
    convolution's rounding)."""
    from roga_cuda import FriendlySAM
    cls = SAM if kind == "sam" else FriendlySAM

    def make(cl):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).double()
        return m.to(memory_format=torch.channels_last) if cl else m

    def sam_step(m, opt):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.second_step(zero_grad=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 5, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)
    m = make(saved_cl)
    opt = cls(m.parameters(), base, rho=0.05, **kw)
    for _ in range(2):
        sam_step(m, opt)
    sd, msd = opt.state_dict(), m.state_dict()
    after = {}
    for cl in (saved_cl, not saved_cl):
        m2 = make(cl)
        m2.load_state_dict(msd)
        opt2 = cls(m2.parameters(), base, rho=0.05, **kw)
        opt2.load_state_dict(copy.deepcopy(sd))  # (load_state_dict keeps the tensors it is given)
        sam_step(m2, opt2)
        after[cl] = [p.detach() for p in m2.parameters()]
        assert m2[0].weight.is_contiguous(memory_format=torch.channels_last) == cl
    for a, b in zip(after[saved_cl], after[not saved_cl]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_tensor_lr_steps_through_torch_too(cls):
    """A tensor learning rate (an LR schedule kept on the device), here in a parameter group,
    with fused=False: the base optimizer built here used torch's multi-tensor form, whose Adam
    refuses a tensor lr at step(). Both paths take the same steps."""
    out = []
    for fused in (True, False):
        m = cnn(dtype=torch.float64, bn=False)
        groups = [{"params": m[0].parameters(), "lr": torch.tensor(0.01, dtype=torch.float64)},
                  {"params": list(m.parameters())[2:]}]
        opt = SAM(groups, cls, rho=0.05, lr=0.02, fused=fused)
        for s in range(2):
            x, y = batch(s)
            loss_of(m, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            opt.second_step(zero_grad=True)
        out.append(m)
    params_equal(out[0], out[1], rtol=1e-7, atol=1e-9)
