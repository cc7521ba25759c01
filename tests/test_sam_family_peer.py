"""The SAM variants against pytorch-optimizer's implementations of the same papers, over
several steps (each test skips when pytorch-optimizer is not installed).

Deliberate differences, so not compared here: pytorch-optimizer's LookSAM uses per-tensor
norms and cosines where the paper (and roga_cuda) use whole-model ones — the models below
with one parameter tensor make the two agree; its WSAM clips g_p before mixing, roga_cuda
clips the final gradient (no clipping here). pytorch-optimizer accumulates squared norms in
float32, hence the tolerances."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GSAM, WSAM, FriendlySAM, LookSAM

TOL = dict(rtol=1e-6, atol=1e-8)


def mlp(one_tensor=False):
    torch.manual_seed(0)
    if one_tensor:
        return nn.Linear(5, 3, bias=False).double()
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(s):
    g = torch.Generator().manual_seed(s)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def run_ours(model, opt, steps, sched=None):
    for s in range(steps):
        x, y = data(s)
        F.cross_entropy(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if sched is not None:
            sched.step()


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_friendly_sam_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    a, b = mlp(), mlp()
    kw = dict(lr=0.1, momentum=0.9, rho=0.05, sigma=1.0, lmbda=0.9)
    run_ours(a, FriendlySAM(a.parameters(), torch.optim.SGD, **kw), 6)
    theirs = po.FriendlySAM(b.parameters(), torch.optim.SGD, **kw)
    for s in range(6):
        closure = closure_for(b, theirs, *data(s))
        closure()  # the gradient at w, then the closure at the perturbed point
        theirs.step(closure)
    assert_same(a, b)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(decouple):
    po = pytest.importorskip("pytorch_optimizer")
    a, b = mlp(), mlp()
    kw = dict(lr=0.1, momentum=0.9, rho=0.05, gamma=0.8, decouple=decouple)
    run_ours(a, WSAM(a.parameters(), torch.optim.SGD, **kw), 6)
    theirs = po.WSAM(b, b.parameters(), torch.optim.SGD, **kw)
    for s in range(6):
        theirs.step(closure_for(b, theirs, *data(s)))
    assert_same(a, b)


def test_looksam_matches_pytorch_optimizer_on_one_tensor():
    po = pytest.importorskip("pytorch_optimizer")
    a, b = mlp(one_tensor=True), mlp(one_tensor=True)
    kw = dict(lr=0.1, momentum=0.9, rho=0.5, k=3, alpha=0.7)  # a large g_v: their 1e-8 in ||g_v|| + 1e-8 fades
    run_ours(a, LookSAM(a.parameters(), torch.optim.SGD, **kw), 8)
    theirs = po.LookSAM(b.parameters(), torch.optim.SGD, **kw)
    for s in range(8):  # (it runs the closure on reuse steps too, at the unperturbed point)
        closure = closure_for(b, theirs, *data(s))
        closure()
        theirs.step(closure)
    assert_same(a, b)


def test_gsam_matches_pytorch_optimizer_with_rho_schedule():
    po = pytest.importorskip("pytorch_optimizer")
    a, b = mlp(), mlp()
    base_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ours = GSAM(None, base_a, rho=0.1, rho_min=0.02, alpha=0.3)
    sched_a = torch.optim.lr_scheduler.StepLR(base_a, 1, gamma=0.7)
    run_ours(a, ours, 6, sched_a)
    base_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    sched_b = torch.optim.lr_scheduler.StepLR(base_b, 1, gamma=0.7)
    rho = po.ProportionScheduler(sched_b, max_lr=0.1, min_lr=0.0, max_value=0.1, min_value=0.02)
    theirs = po.GSAM(b.parameters(), base_b, b, rho, alpha=0.3)
    for s in range(6):
        x, y = data(s)

        def closure():
            base_b.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(b(x), y)
            loss.backward()
            return None, loss.detach()
        theirs.step(closure)
        sched_b.step()
        theirs.update_rho_t()
    assert ours.rho_t == [pytest.approx(theirs.rho_t)]
    assert_same(a, b)
