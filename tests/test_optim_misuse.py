"""Optimizer misuse found by the issue-15 reliability probe: a raising SAM closure, RoGA's
hvp check, RoGA.state_dict() between domains, non-finite hyper-parameters, another
optimizer's state_dict and a single 0-d PCGrad loss. Each case must leave the parameters as
they were (or fail before touching them) with an error naming the problem."""
import pytest
import torch

from roga_cuda import PCGrad, RoGA, SAM


def _param(seed, n=7):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))


def _quadratic(p):
    return (p ** 2).sum() + p.sum()


@pytest.mark.parametrize("seed", range(3))
def test_sam_closure_that_raises_restores_and_the_next_step_works(seed):
    """Bug 5: the closure raised at the perturbed point; the weights must be back at theta and
    the next step must equal a fresh optimizer's step from there."""
    p = _param(seed)
    theta = p.detach().clone()
    opt = SAM([p], torch.optim.SGD, lr=0.1, rho=0.5)
    _quadratic(p).backward()

    def failing():
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    assert torch.equal(p.detach(), theta)

    def closure():
        opt.zero_grad()
        loss = _quadratic(p)
        loss.backward()
        return loss

    opt.zero_grad()
    _quadratic(p).backward()
    opt.step(closure)
    # independent expectation: SGD at theta with the gradient at theta + rho g/||g||
    g = 2 * theta + 1
    expected = theta - 0.1 * (2 * (theta + 0.5 * g / g.norm()) + 1)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_sam_abort_restores():
    p = _param(3)
    theta = p.detach().clone()
    opt = SAM([p], torch.optim.SGD, lr=0.1, rho=0.5)
    _quadratic(p).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(p.detach(), theta)
    opt.abort()
    assert torch.equal(p.detach(), theta)


def test_roga_hvp_without_create_graph_keeps_the_perturbation_restorable():
    """Bug 6: accumulate() refuses a perturbed backward without create_graph=True; abort()
    must still bring the parameters back."""
    p = _param(4)
    theta = p.detach().clone()
    opt = RoGA([p], torch.optim.SGD, lr=0.1, rho=0.5, alignment="hvp")
    (p ** 3).sum().backward(create_graph=True)
    opt.perturb()
    p.grad = None
    (p ** 3).sum().backward()  # no create_graph
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.accumulate()
    opt.abort()
    assert torch.equal(p.detach(), theta)


def test_roga_state_dict_between_domains_is_refused():
    """Bug 8: a state_dict taken with domains accumulated would silently drop them."""
    p = _param(5)
    opt = RoGA([p], torch.optim.SGD, lr=0.1, rho=0.5)
    _quadratic(p).backward()
    opt.perturb()
    p.grad = None
    _quadratic(p).backward()
    opt.accumulate()
    with pytest.raises(RuntimeError, match="middle of a step"):
        opt.state_dict()


@pytest.mark.parametrize("cls,key", [(SAM, "rho"), (RoGA, "rho"), (RoGA, "alpha")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_hyper_parameters_are_refused(cls, key, value):
    with pytest.raises(ValueError, match=key):
        cls([_param(0)], torch.optim.SGD, lr=0.1, **{key: value})


@pytest.mark.parametrize("saver,loader", [(SAM, PCGrad), (SAM, RoGA), (PCGrad, SAM), (RoGA, SAM)])
def test_another_optimizers_state_dict_is_refused(saver, loader):
    state = saver([_param(1)], torch.optim.SGD, lr=0.1).state_dict()
    opt = loader([_param(1)], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=f"saved by a {saver.__name__}, not a {loader.__name__}"):
        opt.load_state_dict(state)


def test_pcgrad_single_0d_loss_is_a_clear_error():
    p = _param(2)
    opt = PCGrad([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="0-d"):
        opt.backward(_quadratic(p))
    assert p.grad is None
