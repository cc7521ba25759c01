"""One host call per phase: the Python work of an optimizer step does not grow with the
number of parameters (no Python loop over them; cached lists, one fused call per phase).
Counted exactly: the Python lines executed (sys.settrace) inside the optimizer's calls of a
warm step are the same for a model of 8 parameters and one of 64."""
import functools
import sys

import pytest
import torch

from roga_cuda import GSAM, SAM, WSAM, FriendlySAM, GradientAggregator, LookSAM, RoGA


class Lines:
    """Counts the Python lines executed inside the calls made through ``run``."""

    def __init__(self):
        self.count = 0
        self.on = False

    def _tracer(self, frame, event, arg):
        if event == "line":
            self.count += 1
        return self._tracer

    def run(self, fn, *args, **kwargs):
        if not self.on:
            return fn(*args, **kwargs)
        sys.settrace(self._tracer)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(None)


def _params(n):
    g = torch.Generator().manual_seed(n)
    return [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(n)]


def _grads(params, seed, skip_first=False):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if skip_first:  # a parameter this batch does not reach (an unused head)
        params[0].grad = None


def _sam_step(params, opt, seed, t, skip_first=False):
    _grads(params, seed, skip_first)
    t.run(opt.first_step, zero_grad=True)
    _grads(params, seed + 1, skip_first)
    t.run(opt.second_step, zero_grad=True)


def _sam_steps2(params, opt, seed, t):
    """Two steps: with interval/k = 2 one perturbed step and one plain (reuse) step."""
    for s in (seed, seed + 2):
        _grads(params, s)
        if t.run(opt.first_step, zero_grad=True):
            _grads(params, s + 1)
        t.run(opt.second_step, zero_grad=True)


def _roga_step(params, opt, seed, t):
    t.run(opt.zero_grad)
    for d in range(3):
        _grads(params, seed + 2 * d)
        t.run(opt.perturb)
        _grads(params, seed + 2 * d + 1)
        t.run(opt.accumulate)
    t.run(opt.step)


def _roga_static_step(params, opt, seed, t):
    """RoGA(capturable=True): the backward passes add into the kept .grad tensors."""
    t.run(opt.zero_grad, set_to_none=False)
    for d in range(3):
        for k in range(2):
            g = torch.Generator().manual_seed(seed + 2 * d + k)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(torch.randn(p.shape, generator=g))
            t.run(opt.perturb if k == 0 else opt.accumulate)
    t.run(opt.step)


def _aggregate_step(params, opt, seed, t):
    losses = [sum((p * (k + 1 + seed)).sum() for p in params) for k in range(2)]
    t.run(opt.zero_grad)
    t.run(opt.backward, losses)
    t.run(opt.step)


CASES = {
    "sam": (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, strategy="copy"), _sam_step),
    "sam-adamw-clip": (lambda ps: SAM(ps, torch.optim.AdamW, lr=0.1, max_grad_norm=1.0), _sam_step),
    "gsam-clip": (lambda ps: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, rho_min=0.01, max_grad_norm=1.0),
                  _sam_step),
    "wsam": (lambda ps: WSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, strategy="copy"), _sam_step),
    "fsam": (lambda ps: FriendlySAM(ps, torch.optim.AdamW, lr=0.1), _sam_step),
    "looksam": (lambda ps: LookSAM(ps, torch.optim.SGD, lr=0.1, k=2, max_grad_norm=1.0), _sam_steps2),
    "sam-interval": (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, interval=2), _sam_steps2),
    "roga-fold": (lambda ps: RoGA(ps, torch.optim.SGD, lr=0.1, momentum=0.9, strategy="copy", num_domains=3),
                  _roga_step),
    "roga-swap": (lambda ps: RoGA(ps, torch.optim.SGD, lr=0.1, strategy="swap"), _roga_step),
    "roga-capturable": (lambda ps: RoGA(ps, torch.optim.SGD, lr=0.1, momentum=0.9, num_domains=3, capturable=True),
                        _roga_static_step),
    "roga-capturable-adam-clip": (lambda ps: RoGA(ps, torch.optim.Adam, lr=0.1, num_domains=3, capturable=True,
                                                  max_grad_norm=1.0), _roga_static_step),
    # one parameter without a gradient: the same subset list every step keeps the caches
    # (and SAM's fold of restore + update); it once cost Python per parameter every step.
    # (RoGA then still allocates that list's accumulators, one tensor per parameter a step.)
    "sam-missing": (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, strategy="copy"),
                    functools.partial(_sam_step, skip_first=True)),
    "sam-adam-missing": (lambda ps: SAM(ps, torch.optim.Adam, lr=0.1, strategy="copy"),
                         functools.partial(_sam_step, skip_first=True)),
    "pcgrad": (lambda ps: GradientAggregator(ps, torch.optim.SGD, method="pcgrad", lr=0.1, momentum=0.9),
               _aggregate_step),
    "upgrad": (lambda ps: GradientAggregator(ps, torch.optim.Adam, method="upgrad", lr=0.1), _aggregate_step),
}


def _warm_step_counts(kind, counter):
    """What ``counter`` (a Lines) counts in a warm step, with 8 and with 64 parameters."""
    make, step = CASES[kind]
    counts = []
    for n in (8, 64):
        params = _params(n)
        opt = make(params)
        t = counter()
        for s in range(2):  # warm: caches, state
            step(params, opt, s, t)
        t.on = True
        step(params, opt, 10, t)
        counts.append(t.count)
    return counts


@pytest.mark.parametrize("kind", list(CASES))
def test_step_python_work_is_independent_of_parameter_count(kind):
    counts = _warm_step_counts(kind, Lines)
    assert counts[0] == counts[1], f"{kind}: {counts[0]} Python lines with 8 parameters, {counts[1]} with 64"


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Counts the calls that reach torch's Python API (tensor methods and operators
    included: each costs microseconds, e.g. ``list.count(None)`` on a list of tensors calls
    ``Tensor.__eq__`` once per element). Attribute reads (``t._version``: a C getter, tens
    of nanoseconds) are not counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Calls(Lines):
    def run(self, fn, *args, **kwargs):
        if not self.on:
            return fn(*args, **kwargs)
        with _TorchCalls() as c:
            try:
                return fn(*args, **kwargs)
            finally:
                self.count += c.count


@pytest.mark.parametrize("kind", list(CASES))
def test_step_torch_calls_are_independent_of_parameter_count(kind):
    counts = _warm_step_counts(kind, _Calls)
    assert counts[0] == counts[1], f"{kind}: {counts[0]} torch calls with 8 parameters, {counts[1]} with 64"
