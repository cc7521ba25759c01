"""GSAM, WSAM, Friendly-SAM and LookSAM under DistributedDataParallel (gloo, 2 processes on
CPU): with both backward passes synchronised (DDP's default), every rank takes the
single-process step on the global batch. All but LookSAM run with gradient_as_bucket_view=True,
where DDP writes the second pass's gradients into the buckets that held the first pass's
(Friendly-SAM's average is read from and written to in the pass that perturbs)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GSAM, WSAM, FriendlySAM, LookSAM

from util import WORLD, ddp_model, ddp_run

STEPS, RHO, ALPHA, GAMMA, SIGMA, LMBDA = 4, 0.1, 0.3, 0.8, 0.9, 0.6


def data(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _train(rank, kind):
    """One rank's run; its final state."""
    model = ddp_model()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=kind != "looksam")
    if kind == "gsam":
        opt = GSAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, alpha=ALPHA)
    elif kind == "wsam":  # decoupled: its sharpness term is the update's direct row
        opt = WSAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, gamma=GAMMA)
    elif kind == "fsam":
        opt = FriendlySAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, sigma=SIGMA, lmbda=LMBDA)
    else:
        opt = LookSAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, alpha=ALPHA, k=2)
    for s in range(STEPS):
        x, y = data(s)
        x, y = x[rank::WORLD], y[rank::WORLD]
        F.cross_entropy(ddp(x), y).backward()
        if opt.first_step(zero_grad=True):
            F.cross_entropy(ddp(x), y).backward()
        opt.second_step(zero_grad=True)
    return model.state_dict()


def single_process(kind):
    """The papers' formulas on the global batch."""
    model = ddp_model()
    ps = list(model.parameters())
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    dot = lambda a, b: sum((u * v).sum() for u, v in zip(a, b))  # noqa: E731
    gv = ema = None
    for s in range(STEPS):
        x, y = data(s)
        g = asc = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
        if kind == "fsam":  # ascend along g - sigma m, m the average before this step's update
            if ema is not None:
                asc = [t - SIGMA * m for t, m in zip(g, ema)]
            ema = [t.clone() for t in g] if ema is None else [LMBDA * m + (1 - LMBDA) * t for m, t in zip(ema, g)]
        if kind == "looksam" and s % 2:
            d = [t + ALPHA * dot(g, g).sqrt() / dot(gv, gv).sqrt() * v for t, v in zip(g, gv)]
        else:
            old = [p.detach().clone() for p in ps]
            with torch.no_grad():
                for p, t in zip(ps, asc):
                    p.add_(RHO * t / (dot(asc, asc).sqrt() + 1e-12))
            gp = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
            with torch.no_grad():
                for p, o in zip(ps, old):
                    p.copy_(o)
            if kind == "gsam":
                c = dot(g, gp) / dot(gp, gp)
                d = [u - ALPHA * (t - c * u) for t, u in zip(g, gp)]
            elif kind == "wsam":  # the base step on g, then w -= lr a (g_p - g)
                for p, t in zip(ps, g):
                    p.grad = t
                base.step()
                a = GAMMA / (1 - GAMMA)
                with torch.no_grad():
                    for p, t, u in zip(ps, g, gp):
                        p.sub_(0.1 * a * (u - t))
                continue
            elif kind == "fsam":
                d = gp
            else:
                d = gp
                gv = [u - dot(g, gp) / dot(g, g) * t for t, u in zip(g, gp)]
        for p, t in zip(ps, d):
            p.grad = t
        base.step()
    return model.state_dict()


@pytest.mark.parametrize("kind", ["gsam", "wsam", "fsam", "looksam"])
def test_ddp_two_processes_equal_the_global_batch_step(kind):
    state = ddp_run(_train, kind)
    for k, v in single_process(kind).items():
        torch.testing.assert_close(state[k], v, rtol=1e-9, atol=1e-11, msg=lambda s: f"{kind} {k}: {s}")
