"""The optimizers under DistributedDataParallel: gloo, 2 processes on CPU.

Parameters must be identical on all ranks after several steps, and equal to a single-
process computation wherever the math says so: SAM with a synchronized first pass and
PCGrad equal the single-process run on the concatenated batch; RoGA (passes under
no_sync, one all-reduce per step) equals the mean over ranks of per-rank RoGA gradients.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import PCGrad, RoGA, SAM

from util import WORLD, ddp_model, ddp_run

STEPS = 3


def data(step, domain=0, n=8):
    g = torch.Generator().manual_seed(1000 * step + domain)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _steps(kind, ddp, batch):
    """STEPS steps of ``kind`` on the DDP module; ``batch(step, domain)`` is this rank's data."""
    if kind == "sam":
        opt = SAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1)
        for s in range(STEPS):
            x, y = batch(s, 0)
            F.cross_entropy(ddp(x), y).backward()  # synchronized first pass
            opt.first_step(zero_grad=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
    elif kind.startswith("roga"):
        static = kind == "roga-capturable"  # .grad kept in place, the mean written into it
        opt = RoGA(ddp.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, alpha=0.01, capturable=static,
                   num_domains=3 if static else None)
        grads = None
        for s in range(STEPS):
            opt.zero_grad(set_to_none=not static)
            with opt.no_sync(ddp):
                for d in range(3):
                    x, y = batch(s, d)
                    F.cross_entropy(ddp(x), y).backward()
                    opt.perturb()
                    F.cross_entropy(ddp(x), y).backward()
                    opt.accumulate()
            opt.step()  # one all-reduce of the accumulated gradient
            if static:
                now = [id(p.grad) for p in ddp.parameters()]
                assert grads is None or now == grads
                grads = now
    else:
        opt = PCGrad(ddp.parameters(), torch.optim.SGD, lr=0.1)
        for s in range(STEPS):
            x, y = batch(s, 0)
            out = ddp(x)
            opt.zero_grad()
            opt.backward([F.cross_entropy(out, y), -0.5 * F.cross_entropy(out, (y + 1) % 3)], model=ddp)
            opt.step()


def _train(rank, kind):
    """One rank's run; its final state."""
    model = ddp_model()
    _steps(kind, nn.parallel.DistributedDataParallel(model),
           lambda s, d: tuple(t[rank::WORLD] for t in data(s, d)))
    return model.state_dict()


def single_process(kind):
    model = ddp_model()
    ps = list(model.parameters())
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9 if kind == "sam" else 0.0)
    for s in range(STEPS):
        if kind == "sam":
            x, y = data(s)
            g = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
            gn = torch.sqrt(sum((t ** 2).sum() for t in g))
            old = [p.detach().clone() for p in ps]
            with torch.no_grad():
                for p, t in zip(ps, g):
                    p.add_(0.1 * t / (gn + 1e-12))
            h = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
            with torch.no_grad():
                for p, o, t in zip(ps, old, h):
                    p.copy_(o)
                    p.grad = t
        elif kind.startswith("roga"):  # per-rank perturbations, gradients averaged over ranks and domains
            acc = [torch.zeros_like(p) for p in ps]
            for r in range(WORLD):
                for d in range(3):
                    x, y = data(s, d)
                    x, y = x[r::WORLD], y[r::WORLD]
                    g = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
                    gn = torch.sqrt(sum((t ** 2).sum() for t in g))
                    old = [p.detach().clone() for p in ps]
                    with torch.no_grad():
                        for p, t in zip(ps, g):
                            p.add_((0.1 / (gn + 1e-12) - 0.01) * t)
                    h = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
                    with torch.no_grad():
                        for p, o, a, t in zip(ps, old, acc, h):
                            p.copy_(o)
                            a.add_(t / (3 * WORLD))
            for p, a in zip(ps, acc):
                p.grad = a
        else:  # PCGrad on the full-batch task gradients
            x, y = data(s)
            out = model(x)
            g1 = torch.autograd.grad(F.cross_entropy(out, y), ps, retain_graph=True)
            g2 = torch.autograd.grad(-0.5 * F.cross_entropy(out, (y + 1) % 3), ps)
            a, b = torch.cat([t.reshape(-1) for t in g1]), torch.cat([t.reshape(-1) for t in g2])
            d = a @ b
            if d < 0:
                a, b = a - d / (b @ b) * b, b - d / (a @ a) * a
            flat = a + b
            off = 0
            for p in ps:
                p.grad = flat[off:off + p.numel()].view_as(p).clone()
                off += p.numel()
        base.step()
        base.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("kind", ["sam", "roga", "roga-capturable", "pcgrad"])
def test_ddp_two_processes(kind):
    state = ddp_run(_train, kind)
    ref = single_process(kind)
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v, rtol=1e-9, atol=1e-11, msg=lambda s: f"{kind} {k}: {s}")


def _conv_train(rank, kind, channels_last):
    """RoGA / PCGrad under DDP on a small conv net, its weights in either memory layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).double()
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def batch(s, d):
        g = torch.Generator().manual_seed(1000 * s + d)
        x, y = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        return x[rank::WORLD], y[rank::WORLD]
    # RoGA's accumulators and PCGrad's task gradients are views of one flat buffer: in the weights' layout
    _steps(kind, nn.parallel.DistributedDataParallel(model), batch)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["roga", "pcgrad"])
def test_ddp_channels_last_weights_train_like_row_major(kind):
    """Buffers that stand in for gradients under DDP (RoGA's flat accumulators, PCGrad's
    flat task gradients) take the weights' memory layout: channels-last weights train, and
    as the row-major ones do (float64: the layouts differ only in the convolution's rounding)."""
    cl, rm = ddp_run(_conv_train, kind, True), ddp_run(_conv_train, kind, False)
    for k, v in rm.items():
        torch.testing.assert_close(cl[k], v, rtol=1e-12, atol=1e-14, msg=lambda s: f"{kind} {k}: {s}")
