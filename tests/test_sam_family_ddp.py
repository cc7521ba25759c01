"""GSAM and LookSAM under DistributedDataParallel (gloo, 2 processes on CPU): with both
backward passes synchronised (DDP's default), every rank takes the single-process step on
the global batch. GSAM runs with gradient_as_bucket_view=True, where DDP writes the second
pass's gradients into the buckets that held the first pass's."""
import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GSAM, LookSAM

WORLD, STEPS, RHO, ALPHA = 2, 4, 0.1, 0.3


def model_():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def data(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, kind, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = model_()
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=kind == "gsam")
        if kind == "gsam":
            opt = GSAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, alpha=ALPHA)
        else:
            opt = LookSAM(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, alpha=ALPHA, k=2)
        for s in range(STEPS):
            x, y = data(s)
            x, y = x[rank::WORLD], y[rank::WORLD]
            F.cross_entropy(ddp(x), y).backward()
            if opt.first_step(zero_grad=True):
                F.cross_entropy(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown (see test_ddp.py)


def single_process(kind):
    """The papers' formulas on the global batch."""
    model = model_()
    ps = list(model.parameters())
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    dot = lambda a, b: sum((u * v).sum() for u, v in zip(a, b))  # noqa: E731
    gv = None
    for s in range(STEPS):
        x, y = data(s)
        g = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
        if kind == "looksam" and s % 2:
            d = [t + ALPHA * dot(g, g).sqrt() / dot(gv, gv).sqrt() * v for t, v in zip(g, gv)]
        else:
            old = [p.detach().clone() for p in ps]
            with torch.no_grad():
                for p, t in zip(ps, g):
                    p.add_(RHO * t / (dot(g, g).sqrt() + 1e-12))
            gp = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
            with torch.no_grad():
                for p, o in zip(ps, old):
                    p.copy_(o)
            if kind == "gsam":
                c = dot(g, gp) / dot(gp, gp)
                d = [u - ALPHA * (t - c * u) for t, u in zip(g, gp)]
            else:
                d = gp
                gv = [u - dot(g, gp) / dot(g, g) * t for t, u in zip(g, gp)]
        for p, t in zip(ps, d):
            p.grad = t
        base.step()
    return model.state_dict()


@pytest.mark.parametrize("kind", ["gsam", "looksam"])
def test_ddp_two_processes_equal_the_global_batch_step(kind):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(kind, _free_port(), tmp), nprocs=WORLD, join=True)
        states = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"ranks differ in {k}"
    for k, v in single_process(kind).items():
        torch.testing.assert_close(states[0][k], v, rtol=1e-9, atol=1e-11, msg=lambda s: f"{kind} {k}: {s}")
