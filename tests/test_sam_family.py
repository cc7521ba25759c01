"""GSAM, WSAM, Friendly-SAM, LookSAM and the ``interval`` option (SAM, RoGA) against
step-by-step references written here from the papers' formulas: plain per-parameter torch
in float64, whole-model inner products, torch's own base optimizers. Nothing here reuses
roga_cuda.optim code except to drive it. The peer comparison with pytorch-optimizer is in
test_sam_family_peer.py, the DDP runs in test_sam_family_ddp.py."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from roga_cuda import GSAM, SAM, WSAM, FriendlySAM, LookSAM, RoGA, freeze_bn_stats

from conftest import backend_cases
from util import batch, frozen_bn, loss_of, params_equal

BACKEND_NAMES = [p.values[0] for p in backend_cases() if p.values[1] == "cpu"]
VARIANTS = ["gsam", "wsam", "wsam_coupled", "fsam", "fsam_asam", "looksam", "sam_interval"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and a busy machine cannot oversubscribe it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    # no bias before the BatchNorm: its gradient is rounding noise, which Adam would magnify
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                         nn.Flatten(), nn.Linear(36, 3)).to(dtype)


def split(model):
    """Two parameter groups: the first conv + BatchNorm, and the rest."""
    return list(model[:2].parameters()), list(model[3:].parameters())


# ------------------------------------------------------------------------ configurations
# kind -> (base optimizer class and kwargs, wrapper kwargs, per-group overrides of group 1)

CONFIG = {
    "gsam": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
             dict(rho=0.1, rho_min=0.02, alpha=0.3), dict(alpha=0.1, lr=0.05)),
    "wsam": (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-2), dict(rho=0.05, gamma=0.8), dict(gamma=0.6)),
    "wsam_coupled": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(rho=0.05, gamma=0.7, decouple=False),
                     dict(gamma=0.9)),
    "fsam": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), dict(rho=0.08, sigma=1.0, lmbda=0.9),
             dict(sigma=0.5, lmbda=0.6)),
    # ASAM's ascent in the second group only: the friendly direction's other path
    "fsam_asam": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(rho=0.5, sigma=0.8, lmbda=0.7, adaptive=True,
                                                                     eta=0.01), dict(adaptive=False, rho=0.08)),
    "looksam": (torch.optim.Adam, dict(lr=0.01), dict(rho=0.1, k=2, alpha=0.7), dict(alpha=0.3)),
    "sam_interval": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(rho=0.05, interval=3), dict(rho=0.1)),
}
CLASS = {"gsam": GSAM, "wsam": WSAM, "wsam_coupled": WSAM, "fsam": FriendlySAM, "fsam_asam": FriendlySAM,
         "looksam": LookSAM, "sam_interval": SAM}


def make(kind, model, **kw):
    base_cls, base_kw, opt_kw, g1 = CONFIG[kind]
    a, b = split(model)
    return CLASS[kind]([dict(params=a, **g1), dict(params=b)], base_cls, **opt_kw, **base_kw, **kw)


def make_ref(kind, model):
    """The reference's base optimizer (torch's own) and each parameter's hyper-parameters."""
    base_cls, base_kw, opt_kw, g1 = CONFIG[kind]
    a, b = split(model)
    lr1 = g1.get("lr", base_kw["lr"])
    base = base_cls([dict(params=a, lr=lr1), dict(params=b)], **base_kw)
    hp = {}
    for ps, over, group in ((a, g1, base.param_groups[0]), (b, {}, base.param_groups[1])):
        h = dict(opt_kw, **{k: v for k, v in over.items() if k != "lr"}, group=group, lr_max=group["lr"])
        for p in ps:
            hp[p] = h
    return base, hp


# ------------------------------------------------------------------------------ reference

def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(a):
    return dot(a, a).sqrt()


class Reference:
    """The variants' steps from the papers' formulas, per parameter, whole-model norms."""

    def __init__(self, kind, model, max_norm=None):
        self.kind, self.model, self.max_norm = kind, model, max_norm
        self.base, self.hp = make_ref(kind, model)
        self.ps = [p for g in self.base.param_groups for p in g["params"]]
        h0 = self.hp[self.ps[0]]
        self.k = h0.get("k", h0.get("interval", 1))
        self.t, self.ema, self.gv = 0, None, None

    def grads(self, x, y):
        return list(torch.autograd.grad(loss_of(self.model, x, y), self.ps))

    def h(self, i, key):
        return self.hp[self.ps[i]][key]

    def clip(self, d):
        if self.max_norm is None:
            return 1.0
        return min(1.0, self.max_norm / (norm(d).item() + 1e-6))

    def apply(self, d, extra=None):
        with torch.no_grad():
            for p, di in zip(self.ps, d):
                p.grad = di.clone()
            self.base.step()
            if extra is not None:  # WSAM's decoupled term: w -= lr * a * (g_p - g)
                for i, (p, e) in enumerate(zip(self.ps, extra)):
                    p.sub_(self.hp[p]["group"]["lr"] * e)
        self.t += 1

    def radius(self, i):
        h = self.hp[self.ps[i]]
        if self.kind != "gsam" or h.get("rho_min") is None:
            return h["rho"]
        lr = h["group"]["lr"]  # GSAM: rho follows the learning rate, lr_min = 0
        return h["rho_min"] + (h["rho"] - h["rho_min"]) * lr / h["lr_max"]

    def step(self, x, y):
        kind, n = self.kind, len(self.ps)
        g = self.grads(x, y)
        if self.t % self.k:  # a plain step (interval), or LookSAM's reuse step
            d = g
            if kind == "looksam":
                r = norm(g) / norm(self.gv)
                d = [g[i] + self.h(i, "alpha") * r * self.gv[i] for i in range(n)]
            c = self.clip(d)
            return self.apply([c * t for t in d])
        asc = g
        if kind.startswith("fsam"):  # ascend along g - sigma * EMA(g), the EMA taken before this step's update
            if self.ema is None:
                self.ema = [t.clone() for t in g]
            else:
                asc = [g[i] - self.h(i, "sigma") * self.ema[i] for i in range(n)]
                self.ema = [self.h(i, "lmbda") * self.ema[i] + (1 - self.h(i, "lmbda")) * g[i] for i in range(n)]
        # ASAM where adaptive: e = rho T^2 asc / ||T asc||, T = |p| + eta
        t = [p.detach().abs() + self.hp[p]["eta"] if self.hp[p].get("adaptive") else 1.0 for p in self.ps]
        gn = norm([ti * a for ti, a in zip(t, asc)])
        old = [p.detach().clone() for p in self.ps]
        with torch.no_grad():
            for i, p in enumerate(self.ps):
                p.add_(self.radius(i) * t[i] ** 2 * asc[i] / (gn + 1e-12))
        with frozen_bn(self.model):
            gp = self.grads(x, y)
        with torch.no_grad():
            for p, o in zip(self.ps, old):
                p.copy_(o)
        extra = None
        if kind == "gsam":  # g_perp = g - (<g, g_p>/||g_p||^2) g_p; d = g_p - alpha g_perp
            c = dot(g, gp) / dot(gp, gp)
            d = [gp[i] - self.h(i, "alpha") * (g[i] - c * gp[i]) for i in range(n)]
        elif kind.startswith("wsam"):  # grad of f + a (f_p - f), a = gamma / (1 - gamma)
            a = [self.h(i, "gamma") / (1 - self.h(i, "gamma")) for i in range(n)]
            d = [g[i] + a[i] * (gp[i] - g[i]) for i in range(n)]
            if self.hp[self.ps[0]].get("decouple", True):
                c = self.clip(d)
                return self.apply([c * t for t in g], [c * a[i] * (gp[i] - g[i]) for i in range(n)])
        else:
            d = gp
            if kind == "looksam":  # g_v = g_s - (<g, g_s>/||g||^2) g
                self.gv = [gp[i] - dot(g, gp) / dot(g, g) * g[i] for i in range(n)]
        c = self.clip(d)
        self.apply([c * t for t in d])


def run_ours(opt, model, batches, sched=None):
    for x, y in batches:
        loss_of(model, x, y).backward()
        if opt.first_step(zero_grad=True):
            with freeze_bn_stats(model):
                loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        if sched is not None:
            sched.step()


def run_ref(ref, batches, sched=None):
    for x, y in batches:
        ref.step(x, y)
        if sched is not None:
            sched.step()


def compare(kind, steps=5, max_norm=None, **kw):
    m_ref, m = cnn(), cnn()
    ref = Reference(kind, m_ref, max_norm)
    opt = make(kind, m, max_grad_norm=max_norm, **kw)
    batches = [batch(s) for s in range(steps)]
    sched = sched_ref = None
    if kind == "gsam":  # the radius follows the learning rate
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        sched_ref = torch.optim.lr_scheduler.StepLR(ref.base, step_size=1, gamma=0.7)
    run_ref(ref, batches, sched_ref)
    run_ours(opt, m, batches, sched)
    params_equal(m_ref, m)  # includes the BatchNorm statistics
    return opt


# -------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("kind", VARIANTS)
def test_matches_reference(kind, backend):
    compare(kind, backend=backend, strategy="copy")


@pytest.mark.parametrize("kind", VARIANTS)
def test_swap_strategy_and_unfused_update_match_reference(kind):
    opt = compare(kind, strategy="swap")
    assert opt.strategy == "swap"
    compare(kind, fused=False)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", VARIANTS)
def test_clipping_clips_the_final_gradient(kind, fused):
    """fused=False: torch's own step (WSAM's decoupled term must then read the unclipped
    first-pass gradient, which the clipped .grad once overwrote)."""
    compare(kind, max_norm=0.05, fused=fused)


@pytest.mark.parametrize("kind", ["gsam", "wsam", "fsam", "looksam"])
@pytest.mark.parametrize("strategy", ["copy", "swap"])
def test_restore_is_bit_exact(kind, strategy):
    """lr = 0: every step (perturbed or reused) must give the parameters back exactly."""
    m = cnn(dtype=torch.float32)
    before = [p.detach().clone() for p in m.parameters()]
    opt = CLASS[kind](m.parameters(), torch.optim.SGD, lr=0.0, rho=0.5, strategy=strategy,
                      **({"k": 2} if kind == "looksam" else {}))
    for s in range(3):
        x, y = batch(s, dtype=torch.float32)
        loss_of(m, x, y).backward()
        if opt.first_step(zero_grad=True):
            assert not torch.equal(m[0].weight, before[0])
            loss_of(m, x, y).backward()
        opt.second_step(zero_grad=True)
        for p, b in zip(m.parameters(), before):
            assert torch.equal(p, b)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_gsam_radius_follows_the_learning_rate():
    m = cnn()
    opt = GSAM([{"params": split(m)[0], "rho_min": 0.01, "lr_max": 0.2}, {"params": split(m)[1]}], torch.optim.SGD,
               rho=0.1, rho_min=0.02, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 4)
    for t in range(4):
        lr = 0.1 * (1 - t / 4)
        assert opt.rho_t == pytest.approx([0.01 + 0.09 * lr / 0.2, 0.02 + 0.08 * lr / 0.1])
        sched.step()
    const = GSAM(cnn().parameters(), torch.optim.SGD, rho=0.07, lr=0.3)  # no rho_min: a constant radius
    const.param_groups[0]["lr"] = 0.01
    assert const.rho_t == [0.07] and const.param_groups[0]["lr_max"] == 0.3


def test_wsam_gamma_one_half_is_sam_and_zero_is_the_base_optimizer():
    """gamma = 1/2 weighs sharpness like SAM (coupled); gamma = 0 drops it."""
    x, y = batch(0)
    for gamma, ref_cls in ((0.5, SAM), (0.0, None)):
        m1, m2 = cnn(), cnn()
        w = WSAM(m1.parameters(), torch.optim.SGD, gamma=gamma, decouple=False, lr=0.1, momentum=0.9)
        run_ours(w, m1, [(x, y)] * 2)
        if ref_cls is None:
            base = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
            for _ in range(2):
                loss_of(m2, x, y).backward()
                base.step()
                base.zero_grad()
        else:
            run_ours(ref_cls(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), m2, [(x, y)] * 2)
        params_equal(m2, m1)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_wsam_decoupled_term_rides_in_the_update_pass(base, monkeypatch):
    """Fused, WSAM's decoupled a (g_p - g) is the update's direct row: one update call per
    step, not a second pass over the parameters (the reference tests check its value)."""
    from roga_cuda import ops
    calls = []
    for name in ("sgd_", "adam_"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: (calls.append(
            (_name, kw.get("direct_weights") is not None)), _real(*a, **kw))[1])
    m = cnn()
    run_ours(WSAM(m.parameters(), base, gamma=0.8, lr=0.01), m, [batch(0)] * 2)
    want = "sgd_" if base is torch.optim.SGD else "adam_"
    assert calls == [(want, True)] * 2


# ------------------------------------------------------------------- interval and reuse

def test_interval_perturbs_every_kth_step_and_closure_form():
    m_a, m_b = cnn(), cnn()
    o_a = SAM(m_a.parameters(), torch.optim.SGD, interval=3, lr=0.1)
    o_b = SAM(m_b.parameters(), torch.optim.SGD, interval=3, lr=0.1)
    perturbed, calls = [], []
    for s in range(7):
        x, y = batch(s)
        loss_of(m_a, x, y).backward()
        perturbed.append(o_a.first_step(zero_grad=True))
        if perturbed[-1]:
            loss_of(m_a, x, y).backward()
        o_a.second_step(zero_grad=True)

        def closure():
            calls.append(s)
            loss = loss_of(m_b, x, y)
            loss.backward()
            return loss
        loss_of(m_b, x, y).backward()
        out = o_b.step(closure)
        assert (out is None) == (not perturbed[-1])
        o_b.zero_grad()
    assert perturbed == [True, False, False, True, False, False, True]
    assert calls == [0, 3, 6]
    params_equal(m_a, m_b, rtol=0, atol=0)


def test_looksam_reuse_steps_take_one_backward():
    m = cnn()
    opt = LookSAM(m.parameters(), torch.optim.SGD, k=3, lr=0.1)
    passes = []
    for s in range(7):
        x, y = batch(s)
        n = 1
        loss_of(m, x, y).backward()
        if opt.first_step(zero_grad=True):
            with freeze_bn_stats(m):
                loss_of(m, x, y).backward()
            n += 1
        opt.second_step(zero_grad=True)
        passes.append(n)
    assert passes == [2, 1, 1, 2, 1, 1, 2] and opt.k == 3


def test_plain_step_keeps_grad_and_rejects_misuse():
    m = cnn()
    opt = SAM(m.parameters(), torch.optim.SGD, interval=2, lr=0.1)
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    loss_of(m, x, y).backward()
    assert opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    loss_of(m, x, y).backward()
    opt.second_step(zero_grad=True)
    loss_of(m, x, y).backward()
    g = m[0].weight.grad.clone()
    assert not opt.first_step(zero_grad=True)
    assert torch.equal(m[0].weight.grad, g)  # the plain step's gradient stays for second_step
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    opt.abort()  # drops the pending plain step: the step count does not advance
    assert not opt.first_step()
    opt.step()  # GradScaler's path: step() without a closure finishes it
    assert opt.state_dict()["wrapper"]["steps"] == 2


def roga_ref(model, base, steps, k_dom, interval, rho, alpha):
    ps = list(model.parameters())
    for s in range(steps):
        acc = [torch.zeros_like(p) for p in ps]
        for d in range(k_dom):
            x, y = batch(100 * s + d)
            g = torch.autograd.grad(loss_of(model, x, y), ps)
            if s % interval == 0:
                old = [p.detach().clone() for p in ps]
                with torch.no_grad():
                    for p, t in zip(ps, g):
                        p.add_((rho / (norm(g) + 1e-12) - alpha) * t)
                with frozen_bn(model):
                    g = torch.autograd.grad(loss_of(model, x, y), ps)
                with torch.no_grad():
                    for p, o in zip(ps, old):
                        p.copy_(o)
            acc = [a + t / k_dom for a, t in zip(acc, g)]
        for p, a in zip(ps, acc):
            p.grad = a
        base.step()


@pytest.mark.parametrize("num_domains", [None, 2])
def test_roga_interval_matches_reference_manual_and_closure(num_domains):
    m_ref, m_man, m_clo = cnn(), cnn(), cnn()
    roga_ref(m_ref, torch.optim.SGD(m_ref.parameters(), lr=0.1, momentum=0.9), 5, 2, 2, 0.1, 0.01)
    kw = dict(lr=0.1, momentum=0.9, rho=0.1, alpha=0.01, interval=2, num_domains=num_domains)
    o_man, o_clo = RoGA(m_man.parameters(), torch.optim.SGD, **kw), RoGA(m_clo.parameters(), torch.optim.SGD, **kw)
    flags, calls = [], []
    for s in range(5):
        o_man.zero_grad()
        for d in range(2):
            x, y = batch(100 * s + d)
            loss_of(m_man, x, y).backward()
            flags.append(o_man.perturb())
            if flags[-1]:
                with freeze_bn_stats(m_man):
                    loss_of(m_man, x, y).backward()
            o_man.accumulate()
        o_man.step()

        def closure(d, s=s):
            calls.append((s, d))
            loss = loss_of(m_clo, *batch(100 * s + d))
            loss.backward()
            return loss
        o_clo.step(closure, num_domains=2, bn_model=m_clo)
    assert flags == [True, True, False, False] * 2 + [True, True]
    assert len(calls) == 3 * 4 + 2 * 2  # two passes per domain on RoGA steps, one otherwise
    params_equal(m_ref, m_man)
    params_equal(m_ref, m_clo)
    assert o_man.state_dict()["wrapper"]["steps"] == 5


# -------------------------------------------------------------------------------- AMP

def _scaler(init_scale):
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


def amp_step(opt, model, x, y, scaler, big=1.0):
    scaler.scale(loss_of(model, x, y) * big).backward()
    kw = {"scaler": scaler} if isinstance(opt, FriendlySAM) else {}
    if opt.first_step(zero_grad=True, **kw):
        with freeze_bn_stats(model):
            scaler.scale(loss_of(model, x, y) * big).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("kind", VARIANTS)
def test_amp_scaled_steps_equal_unscaled(kind):
    res = []
    for scale in (None, 1024.0):
        m = cnn(dtype=torch.float32)
        opt = make(kind, m, max_grad_norm=0.5)
        for s in range(4):
            x, y = batch(s, dtype=torch.float32)
            if scale is None:
                run_ours(opt, m, [(x, y)])
            else:
                scaler = _scaler(scale)  # a fresh one each step: no growth or back-off in between
                amp_step(opt, m, x, y, scaler)
        res.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6, msg=lambda s: f"{kind}: {s}")


def _state(opt):
    sd = opt.state_dict()
    return copy.deepcopy({k: v for k, v in sd["wrapper"].items() if k != "steps"}), copy.deepcopy(sd["base"]["state"])


@pytest.mark.parametrize("kind", VARIANTS)
def test_amp_overflow_leaves_parameters_and_state_untouched(kind):
    """An overflow on a perturbed step and on a plain/reuse step: both skipped, the
    variant's state (F-SAM's average, LookSAM's g_v) and the base state unchanged."""
    m = cnn(dtype=torch.float32)
    opt = make(kind, m)
    x, y = batch(0, dtype=torch.float32)
    amp_step(opt, m, x, y, _scaler(1024.0))  # a good first step: state exists
    k = {"looksam": 2, "sam_interval": 3}.get(kind, 1)
    for s in range(1, 2 * k + 1):
        params = copy.deepcopy(m.state_dict())
        state = _state(opt)
        perturbs = s % k == 0
        scaler = _scaler(2.0 ** 100)
        amp_step(opt, m, x, y, scaler, big=1e30)  # inf gradients
        assert scaler.get_scale() < 2.0 ** 100, "the scaler did not see the overflow"
        for name, v in m.state_dict().items():
            if "running" not in name and "num_batches" not in name:
                assert torch.equal(v, params[name]), (kind, s, perturbs, name)
        wrapper, base = _state(opt)
        assert set(wrapper) == set(state[0])
        for key in wrapper:
            for i in wrapper[key]:
                assert torch.equal(wrapper[key][i], state[0][key][i]), (kind, key, i)
        for i in base:
            for key, v in base[i].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, state[1][i][key]), (kind, s, key)
    amp_step(opt, m, x, y, _scaler(1024.0))  # training goes on with finite values
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("kind", VARIANTS)
def test_state_dict_round_trip_takes_the_same_next_steps(kind):
    m1 = cnn()
    o1 = make(kind, m1)
    run_ours(o1, m1, [batch(s) for s in range(3)])  # mid-cycle for LookSAM and interval
    sd = copy.deepcopy(o1.state_dict())
    m2 = copy.deepcopy(m1)
    o2 = make(kind, m2)
    o2.load_state_dict(sd)
    more = [batch(10 + s) for s in range(3)]
    run_ours(o1, m1, more)
    run_ours(o2, m2, more)
    params_equal(m1, m2, rtol=0, atol=0)
    assert o2.param_groups is o2.base_optimizer.param_groups
    assert sd["type"] == type(o1).__name__ and sd["wrapper"]["steps"] == 3


def test_state_dict_errors():
    m = cnn()
    o = make("fsam", m)
    run_ours(o, m, [batch(0)])
    sd = o.state_dict()
    with pytest.raises(ValueError, match="saved by a FriendlySAM, not a LookSAM"):
        make("looksam", cnn()).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["wrapper"]["ema"][0] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'ema'\[0\] is \[5\]"):
        make("fsam", cnn()).load_state_dict(bad)
    bad["wrapper"]["ema"] = {99: torch.zeros(1)}
    with pytest.raises(ValueError, match="position 99"):
        make("fsam", cnn()).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["wrapper"]["steps"] = -1
    with pytest.raises(ValueError, match="'steps' must be an integer >= 0"):
        make("fsam", cnn()).load_state_dict(bad)
    plain = SAM(cnn().parameters(), torch.optim.SGD, lr=0.1)
    plain.load_state_dict({"base": plain.base_optimizer.state_dict(), "wrapper": {}})  # an older checkpoint


# ------------------------------------------------------------------------- gradients

def test_first_pass_gradient_survives_a_backward_into_the_same_buffer():
    """DDP's gradient_as_bucket_view: .grad are views of one buffer, and the second pass is
    written into that buffer again. GSAM must still read the first pass's gradient."""
    m_ref, m = cnn(), cnn()
    ref = Reference("gsam", m_ref)
    opt = make("gsam", m)
    ps = [p for g in opt.param_groups for p in g["params"]]
    flat = torch.zeros(sum(p.numel() for p in ps), dtype=torch.float64)
    views = list(flat.split([p.numel() for p in ps]))
    for s in range(3):
        x, y = batch(s)
        ref.step(x, y)
        for pass_ in (0, 1):
            with freeze_bn_stats(m) if pass_ else torch.enable_grad():
                grads = torch.autograd.grad(loss_of(m, x, y), ps)
            for p, v, g in zip(ps, views, grads):
                v.copy_(g.reshape(-1))
                p.grad = v.view_as(p)
            if pass_ == 0:
                assert opt.first_step(zero_grad=True)
                assert m[0].weight.grad is None
        opt.second_step(zero_grad=True)
    params_equal(m_ref, m, rtol=1e-9, atol=1e-11)


def test_frozen_parameters_and_a_parameter_without_second_pass_gradient():
    """A frozen parameter is skipped; a parameter that loses its gradient on the second
    pass is restored exactly and not updated."""
    m = cnn()
    m[3].bias.requires_grad_(False)
    opt = GSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    w = m[5].weight.detach().clone()
    loss_of(m, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(m, x, y).backward()
    m[5].weight.grad = None  # no gradient at the perturbed point
    opt.second_step(zero_grad=True)
    assert torch.equal(m[5].weight, w) and m[3].bias.grad is None


# -------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("cls,kw,err,match", [
    (GSAM, dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
    (GSAM, dict(alpha=float("nan")), ValueError, "alpha"),
    (GSAM, dict(rho_min=-1.0), ValueError, "rho_min"),
    (GSAM, dict(lr_max=0.01, lr_min=0.1), ValueError, "lr_max .* must be >= lr_min"),
    (WSAM, dict(gamma=1.0), ValueError, r"gamma must be a number in \[0, 1\)"),
    (WSAM, dict(gamma=-0.2), ValueError, "gamma"),
    (WSAM, dict(decouple="yes"), TypeError, "decouple must be True or False"),
    (FriendlySAM, dict(lmbda=1.5), ValueError, r"lmbda must be in \[0, 1\]"),
    (FriendlySAM, dict(sigma=float("inf")), ValueError, "sigma"),
    (LookSAM, dict(k=0), ValueError, "k must be an integer >= 1"),
    (LookSAM, dict(k=2.5), ValueError, "k must be an integer"),
    (LookSAM, dict(alpha=-1), ValueError, "alpha"),
    (SAM, dict(interval=0), ValueError, "interval must be an integer >= 1"),
    (SAM, dict(interval=True), ValueError, "interval"),
    (GSAM, dict(rho=-0.1), ValueError, "GSAM: rho must be"),
])
def test_bad_hyper_parameters(cls, kw, err, match):
    with pytest.raises(err, match=match):
        cls(cnn().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_bad_per_group_hyper_parameters():
    a, b = split(cnn())
    with pytest.raises(ValueError, match="gamma"):
        WSAM([{"params": a, "gamma": 2.0}, {"params": b}], torch.optim.SGD, lr=0.1)
    opt = LookSAM(a, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": b, "alpha": -3.0})
    opt.add_param_group({"params": b})
    assert opt.param_groups[1]["alpha"] == 0.7


def test_no_gradient_errors_name_the_variant():
    opt = LookSAM(cnn().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="LookSAM.first_step\\(\\): no parameter has a gradient"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="LookSAM.step\\(\\) needs a closure"):
        opt.step()


def test_looksam_keeps_the_last_finite_gv():
    """A non-finite gradient on a SAM step (no AMP here) must not reach g_v."""
    m = cnn()
    opt = LookSAM(m.parameters(), torch.optim.SGD, k=1, lr=0.1)
    run_ours(opt, m, [batch(0)])
    gv = copy.deepcopy(opt.state_dict()["wrapper"]["gv"])
    x, y = batch(1)
    loss_of(m, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(m, x, y).backward()
    m[5].weight.grad[0, 0] = float("nan")
    opt.second_step(zero_grad=True)
    after = opt.state_dict()["wrapper"]["gv"]
    assert set(after) == set(gv) and all(torch.equal(after[i], gv[i]) for i in gv)


def test_unscale_before_step_is_refused_where_the_first_pass_is_read():
    """GradScaler.unscale_ unscales .grad (the second pass) only: GSAM, WSAM and LookSAM
    would mix it with a still-scaled first pass, so they refuse, with the parameters restored."""
    for kind in ("gsam", "wsam", "looksam", "fsam"):
        m = cnn(dtype=torch.float32)
        before = [p.detach().clone() for p in m.parameters()]
        opt = CLASS[kind](m.parameters(), torch.optim.SGD, lr=0.0)
        scaler = _scaler(1024.0)
        x, y = batch(0, dtype=torch.float32)
        scaler.scale(loss_of(m, x, y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_of(m, x, y)).backward()
        scaler.unscale_(opt)
        if kind == "fsam":  # reads only the second pass: fine
            scaler.step(opt)
        else:
            with pytest.raises(RuntimeError, match="unscale_"):
                scaler.step(opt)
        for p, b in zip(m.parameters(), before):
            assert torch.equal(p, b), kind


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_roga_interval_state_dict_and_hvp_plain_steps():
    m1 = cnn()
    kw = dict(lr=0.1, rho=0.1, alpha=0.01, interval=3, alignment="hvp")
    o1 = RoGA(m1.parameters(), torch.optim.SGD, **kw)

    def closure_for(model):
        def closure(d, create_graph=False):
            loss = loss_of(model, *batch(d))
            loss.backward(create_graph=create_graph)
            return loss
        return closure
    o1.step(closure_for(m1), num_domains=2, bn_model=m1)  # a RoGA step (hvp)
    sd = copy.deepcopy(o1.state_dict())
    m2 = copy.deepcopy(m1)
    o2 = RoGA(m2.parameters(), torch.optim.SGD, **kw)
    o2.load_state_dict(sd)
    # the next step is plain: the mean domain gradient, as plain SGD takes it
    m3 = copy.deepcopy(m1)
    base = torch.optim.SGD(m3.parameters(), lr=0.1)
    for d in range(2):
        (loss_of(m3, *batch(d)) / 2).backward()
    base.step()
    o2.step(closure_for(m2), num_domains=2, bn_model=m2)
    params_equal(m3, m2)
    o2.zero_grad()
    loss_of(m2, *batch(0)).backward()
    assert not o2.perturb()  # step 2 of 3: plain again


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_friendly_radius_when_the_average_nearly_cancels_the_gradient(backend, dtype):
    """||d|| comes from the Gram matrix of (g, m), a difference of sums: as d = g - m shrinks
    from 1e-1 of g to 0 the radius must stay rho within the documented bound (16 roundings
    times (||g|| + ||m||)^2 / ||d||^2) while that bound is small, and never blow up (to
    rho / 1e-12) once it is not. The direction is formed element-wise: exact at every scale."""
    rho, gen = 0.5, torch.Generator().manual_seed(3)
    g0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(300, 7), (50,), ()]]
    r = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in g0]
    ps = [nn.Parameter(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype)) for t in g0]
    u = torch.finfo(dtype).eps / 2
    for delta in [1e-1, 1e-2, 1e-4, 1e-6, 1e-9, 0.0]:
        opt = FriendlySAM(ps, torch.optim.SGD, lr=0.0, rho=rho, sigma=1.0, lmbda=0.5, backend=backend,
                          strategy="copy")
        for p, t in zip(ps, g0):  # step 1 starts the average at g0
            p.grad = t.to(dtype)
        opt.first_step(zero_grad=True)
        opt.second_step()
        g1 = [(t + delta * v).to(dtype) for t, v in zip(g0, r)]
        for p, t in zip(ps, g1):  # step 2: d = g1 - m = delta * r (up to rounding)
            p.grad = t.clone()
        before = [p.detach().clone() for p in ps]
        opt.first_step(zero_grad=True)
        e = [(p.detach() - b).double() for p, b in zip(ps, before)]
        opt.abort()
        radius = norm(e).item()
        assert math.isfinite(radius) and radius <= 1.01 * rho, (delta, radius)
        d = [a.double() - t.to(dtype).double() for a, t in zip(g1, g0)]
        if norm(d) == 0:
            continue
        bound = 16 * u * ((norm(g1) + norm(g0)) / norm(d)).item() ** 2
        if bound < 1e-2:
            assert abs(radius / rho - 1) <= bound, (delta, radius, bound)
            assert (dot(e, d) / (norm(e) * norm(d))).item() > 1 - 1e-6, delta
