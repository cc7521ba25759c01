"""GradientAggregator: every weighting through the optimizer on a real model (every CI
backend), shared vs task-specific parameters, per-group GradVac, statistics, state_dict,
the folded step(closure). The weightings' own math is tested in tests/test_weightings*.py."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GradientAggregator, PCGrad
from roga_cuda.optim import weightings

from conftest import backend_cases

BACKENDS = [p.values[0] for p in backend_cases() if p.values[1] == "cpu"]
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_its_weighting_on_a_real_model(backend, method):
    """.grad after backward() is sum_k w_k g_k with w the weighting of the model's Gram
    matrix (a fresh weighting with the same seed replays the same draws)."""
    net = Net().double()
    x, ys = data(1)
    J = task_grads(net, x, ys)
    opt = GradientAggregator(net.parameters(), torch.optim.SGD, method=method, lr=0.1, seed=5, backend=backend)
    opt.backward(net.losses(x, ys))
    got = torch.cat([p.grad.flatten() for p in net.parameters()])
    kw = {"seed": 5} if method in ("pcgrad", "gradvac", "random") else {}
    w = weightings.make_weighting(method, **kw)(J @ J.T)
    torch.testing.assert_close(got, w @ J, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opt.stats["weights"], w, rtol=1e-9, atol=1e-12)
    opt.step()


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


@pytest.mark.parametrize("method", ["gradvac", "nash_mtl", "pcgrad"])
def test_state_dict_round_trip_with_weighting_state(method):
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
    with pytest.raises(ValueError, match=f"state is for method '{method}', not 'mgda'"):
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
