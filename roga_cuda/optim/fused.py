"""The base optimizer's update as fused primitives (:func:`roga_cuda.ops.sgd_` /
:func:`roga_cuda.ops.adam_`): one call per parameter group and device, no host sync.

Used when the base optimizer is exactly ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (not a
subclass: it might override ``step``) without ``differentiable=True``; anything else steps
through torch. The state lives where torch keeps it, in torch's format
(``base.state[p]["exp_avg"]`` ...), so ``state_dict()`` round-trips with the plain torch
optimizer both ways. Differences, all invisible to torch:

* Step counts are float32 tensors on the parameter's device (as torch's capturable/fused
  Adam keeps them), read by the kernels.
* SGD with momentum also keeps a ``"step"`` count, so that the momentum buffer starts as
  the gradient at the first step that really happens: after a step GradScaler skipped
  (found_inf), the buffer is still "unset" (torch's fused SGD gets this wrong).
* State is created before the first update, also when AMP skips it (then it is exactly a
  fresh state: zero moments, zero counts).
"""
from dataclasses import dataclass

import torch

from .. import ops
from ._utils import in_layout_of

_EXACT = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def fused_kind(base):
    """"sgd", "adam", or None with the reason it cannot be fused."""
    kind = _EXACT.get(type(base))
    if kind is None:
        return None, f"{type(base).__name__} has no fused update (SGD, Adam and AdamW do)"
    if any(g.get("differentiable") for g in base.param_groups):
        return None, "differentiable=True needs torch's autograd-tracked update"
    if any(p.is_complex() for g in base.param_groups for p in g["params"]):
        return None, "complex parameters"
    return kind, None


@dataclass
class UpdatePart:
    """One fused call: a parameter group's params on one device, their gradient as
    ``sum_k weights[k] * grads[k]``, and where to read the parameters from."""
    group: dict
    params: list
    grads: list  # K lists
    weights: object = None  # K floats or a 1-d tensor; None: all ones
    source: list = None  # read the parameter values here (SAM/RoGA: the backup)
    grad_out: list = None  # also write the combined gradient here (e.g. .grad)
    direct: object = None  # K weights: then params -= lr * sum_k direct[k] * grads[k] (WSAM)


@dataclass
class _GroupState:
    """A parameter list's state tensors, in list order, as the kernels take them."""
    params: list  # kept alive: the cache is keyed by id() of this list
    bufs: list = None  # SGD momentum
    exp_avgs: list = None
    exp_avg_sqs: list = None
    max_exp_avg_sqs: list = None
    steps: list = None


class FusedUpdate:
    """The update of one base optimizer (see the module docstring)."""

    def __init__(self, base, backend="auto"):
        self.base = base
        self.backend = backend
        self.kind, self.reason = fused_kind(base)
        self._cache = {}
        self._state_obj = None

    def __bool__(self):
        return self.kind is not None

    def __getstate__(self):  # the state lives in base.state; the cache is rebuilt for a copy's lists
        return {"base": self.base, "backend": self.backend}

    def __setstate__(self, state):
        self.__init__(state["base"], state["backend"])

    def handover(self, to_torch):
        """The base optimizer's state as the other path reads it, when ``fused`` changes
        mid-training. To torch: our SGD count says whether a momentum buffer was ever set (a
        skipped first step leaves a zero buffer at count 0, which torch would take as set);
        torch keeps no count, so it is dropped (a buffer without one reads as set when we
        adopt it again). Either way the cached state lists are dropped: torch may have made
        new buffers."""
        self._cache.clear()
        if to_torch and self.kind == "sgd":
            state = self.base.state
            keys = [p for p, s in state.items() if "momentum_buffer" in s and "step" in s]
            for p, unset in zip(keys, _unset([state[p]["step"] for p in keys])):
                if unset:
                    state[p]["momentum_buffer"] = None
                del state[p]["step"]

    def step(self, parts, found_inf=None):
        """Updates every part. found_inf: a one-element device tensor (nonzero: change nothing)."""
        if self._state_obj is not self.base.state:  # load_state_dict replaced it
            self._cache.clear()
            self._state_obj = self.base.state
        for part in parts:
            st = self._state(part)
            g = part.group
            common = dict(source=part.source, grad_weights=part.weights, direct_weights=part.direct,
                          grad_out=part.grad_out, found_inf=found_inf, backend=self.backend)
            if self.kind == "sgd":
                ops.sgd_(part.params, part.grads, lr=g["lr"], momentum_buffers=st.bufs, steps=st.steps,
                         momentum=g["momentum"], dampening=g["dampening"], nesterov=g["nesterov"],
                         weight_decay=g["weight_decay"], maximize=g.get("maximize", False), **common)
            else:
                ops.adam_(part.params, part.grads, st.exp_avgs, st.exp_avg_sqs, st.steps, lr=g["lr"],
                          betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                          decoupled=g.get("decoupled_weight_decay", type(self.base) is torch.optim.AdamW),
                          amsgrad=g["amsgrad"], max_exp_avg_sqs=st.max_exp_avg_sqs,
                          maximize=g.get("maximize", False), **common)

    # -- state, in torch's format ----------------------------------------------------------
    def _state(self, part):
        g = part.group
        flags = (g["momentum"] != 0) if self.kind == "sgd" else bool(g["amsgrad"])
        key = (id(part.params), flags)
        st = self._cache.get(key)
        if st is not None and st.params is part.params:
            return st
        st = self._adopt(part.params, flags)
        if len(self._cache) > 64:  # parameter lists that come and go: keep it bounded
            self._cache.clear()
        self._cache[key] = st
        return st

    def _adopt(self, params, flags):
        """State lists for params: torch's state where it exists (moved to the parameter's
        device, counts as float32), fresh state where not."""
        state = self.base.state
        st = _GroupState(params)
        if self.kind == "sgd":
            if flags:  # momentum
                st.bufs, st.steps = [], []
                for p in params:
                    s = state[p]
                    if s.get("momentum_buffer") is None:
                        s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        s["step"] = _count(0, p)
                    elif "step" not in s:  # torch's SGD initialised it
                        s["step"] = _count(1, p)
                    else:
                        s["step"] = _as_count(s["step"], p)
                    s["momentum_buffer"] = in_layout_of(s["momentum_buffer"], p)
                    st.bufs.append(s["momentum_buffer"])
                    st.steps.append(s["step"])
            return st
        st.exp_avgs, st.exp_avg_sqs, st.steps = [], [], []
        st.max_exp_avg_sqs = [] if flags else None
        for p in params:
            s = state[p]
            if "step" not in s:
                s["step"] = _count(0, p)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                s["step"] = _as_count(s["step"], p)
            if flags and "max_exp_avg_sq" not in s:
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if flags else ("exp_avg", "exp_avg_sq"):
                s[name] = in_layout_of(s[name], p)
            st.exp_avgs.append(s["exp_avg"])
            st.exp_avg_sqs.append(s["exp_avg_sq"])
            st.steps.append(s["step"])
            if flags:
                st.max_exp_avg_sqs.append(s["max_exp_avg_sq"])
        return st


def _count(value, p):
    return torch.full((), float(value), dtype=torch.float32, device=p.device)


def _as_count(step, p):
    if isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == p.device and step.dim() == 0:
        return step
    return _count(float(step), p)


def export_state_dict(optimizer, sd):
    """A ``register_state_dict_post_hook`` for the base optimizer: torch's reading of our SGD
    state. torch's SGD keeps no count, and spells a momentum buffer that was never set (ours
    at count 0: a skipped first step) None; so the count is left out. A checkpoint then means
    the same to torch and to us, in any order of loading and stepping (a count of 0 that a
    torch step left stale once reset the momentum). The live state is not touched (entries
    are copied); the counts are read in one host transfer."""
    state = sd["state"]
    _counts_to_cpu(optimizer, state)
    sgd = [k for k, s in state.items() if "momentum_buffer" in s and "step" in s]
    for k, zero in zip(sgd, _unset([state[k]["step"] for k in sgd])):
        s = {n: v for n, v in state[k].items() if n != "step"}
        if zero:
            s["momentum_buffer"] = None
        state[k] = s
    return sd


def _unset(counts):
    """Per SGD count, whether it is 0 (the momentum buffer was never set); counts on one
    device are read in one host transfer."""
    if not counts:
        return []
    if all(isinstance(c, torch.Tensor) for c in counts) and len({c.device for c in counts}) == 1:
        return torch.stack([c.detach().reshape(()).float() for c in counts]).eq(0).tolist()
    return [float(c) == 0 for c in counts]


def _counts_to_cpu(optimizer, state):
    """Adam's counts as torch keeps them when it is not capturable: CPU tensors (ours live on
    the parameter's device, and torch would read a device count on the host per parameter
    and step). One transfer per device; a capturable torch optimizer moves them back."""
    if any(g.get("capturable") or g.get("fused") for g in optimizer.param_groups):
        return
    by_dev = {}
    for k, s in state.items():
        c = s.get("step")
        if "exp_avg" in s and isinstance(c, torch.Tensor) and c.device.type != "cpu":
            by_dev.setdefault(c.device, []).append(k)
    for keys in by_dev.values():
        host = torch.stack([state[k]["step"].reshape(()) for k in keys]).cpu()
        for k, c in zip(keys, host.unbind()):
            state[k] = {**state[k], "step": c.clone()}
