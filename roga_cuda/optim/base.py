"""What every wrapper optimizer (SAM, RoGA, the gradient-surgery aggregator) shares.

A wrapper owns a *base* optimizer (SGD, AdamW, ...) and shares its ``param_groups``, so LR
schedulers, per-group hyper-parameters and ``zero_grad`` behave as with the base optimizer
alone. Per step the Python work does not grow with the number of parameters: the parameter
lists are cached (:class:`Layout`, rebuilt when the groups change), gradients are gathered
and cleared by one C++ call each, and every whole-model operation is one fused call per
parameter group and device. The base update itself is fused too (:mod:`.fused`) when the
base optimizer is SGD, Adam or AdamW (``fused=False``, or any other base optimizer: torch's
``step()``).
"""
import copy
import inspect
import itertools
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import ops
from . import _utils
from .fused import FusedUpdate, UpdatePart, export_state_dict


@dataclass
class Part:
    """A parameter group's parameters on one device, with their gradients this step."""
    group: dict
    params: list
    grads: list


class LayoutPart(NamedTuple):
    """One parameter group's parameters on one device, in group order."""
    group: dict
    params: list


class Layout:
    """The wrapper's parameters, cached: per (group, device) the params in group order, each
    parameter once (torch only warns about one listed twice in a group; a fused op would
    write it twice). ``params`` concatenates them, ``bounds`` delimits each part in it.
    ``sharded``: some parameter is a DTensor (FSDP2 ``fully_shard``). ``memo``: what the
    wrappers derive from this layout (subset lists, accumulators, flat buffers), dropped
    with it when the param groups change."""

    def __init__(self, param_groups):
        self.signature = Layout.signature_of(param_groups)
        self.params, self.parts, self.bounds = [], [], []
        seen = set()
        for group in param_groups:
            by_dev = {}
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    by_dev.setdefault(p.device, []).append(p)
            for ps in by_dev.values():
                start = len(self.params)
                self.params.extend(ps)
                self.parts.append(LayoutPart(group, ps))
                self.bounds.append((start, len(self.params)))
        self.sharded = any(_utils.is_dtensor(p) for p in self.params)
        self.memo = {}

    @staticmethod
    def signature_of(param_groups):
        return tuple((id(g), id(g["params"]), len(g["params"])) for g in param_groups)


class _Transient:
    """The wrappers' per-step state (pending perturbations, accumulators, caches), kept on a
    plain object rather than on the optimizer: Dynamo models torch.optim.Optimizer instances
    as static and silently drops attribute writes to them inside a compiled region (torch
    2.13), while it replays writes to plain objects, so a compiled step leaves the state an
    eager one would."""


class WrapperOptimizer(torch.optim.Optimizer):
    """Builds or adopts the base optimizer, shares its param_groups, caches the parameter
    layout, and runs the (fused) base update."""

    def __init__(self, params, base_optimizer, defaults, backend="auto", max_grad_norm=None, fused=True,
                 **base_kwargs):
        name = type(self).__name__
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"{name}: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"{name}: unknown backend {backend!r}; choose one of {('auto',) + ops.BACKENDS}")
        self._t = _Transient()
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"{name}: {sorted(base_kwargs)} would configure a new base optimizer, "
                                "but base_optimizer is already an instance")
            if params is not None:
                given = {id(p) for p in _flat_params(params)}
                have = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                if given != have:
                    raise ValueError(f"{name}: `params` are not the parameters of the base optimizer instance; "
                                     "pass params=None to use the instance's param_groups")
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError(f"{name}: `params` is required when base_optimizer is a class")
            super().__init__(params, defaults)
            self.base_optimizer = _build_base(base_optimizer, self.param_groups, base_kwargs)
        else:
            raise TypeError(f"{name}: base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                            f"or an instance of one, got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.base_optimizer.register_state_dict_post_hook(export_state_dict)
        self._update = FusedUpdate(self.base_optimizer, backend)
        self.fused = fused
        self._t.layout_cache = None

    @property
    def fused(self):
        """Whether the base update runs as a fused primitive (SGD/Adam/AdamW only; settable)."""
        return self._fused and bool(self._update)

    @fused.setter
    def fused(self, value):
        value = bool(value)
        if getattr(self, "_fused", value) != value and self._update:
            self._update.handover(to_torch=not value)
        self._fused = value

    def add_param_group(self, param_group):
        # torch only warns about a parameter listed twice in a group; the fused passes would
        # then write one tensor from two positions (nondeterministic), so refuse it here.
        ps = param_group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        if len({id(p) for p in ps}) != len(ps):
            seen = set()
            i = next(i for i, p in enumerate(ps) if id(p) in seen or seen.add(id(p)))
            raise ValueError(f"{type(self).__name__}: parameter {i} of a param group is listed twice "
                             "(the same tensor more than once); list each parameter once")
        param_group["params"] = ps  # a generator is consumed once (torch does the same in place)
        if not hasattr(self, "base_optimizer"):  # during __init__
            return super().add_param_group(param_group)
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none=True):
        if set_to_none:
            _utils.set_grads(self._layout().params, None)
            return
        parts = self._gather()
        if any(any(map(operator.attrgetter("requires_grad"), part.grads)) for part in parts):
            return self.base_optimizer.zero_grad(set_to_none=False)  # torch's: detaches create_graph gradients
        with torch.no_grad():
            for part in parts:  # one call per group and device, not torch's loop over parameters
                torch._foreach_zero_(part.grads)

    # -- state -------------------------------------------------------------------------
    def _extra_state(self):
        """Wrapper state that must survive a checkpoint (subclasses extend)."""
        return {}

    def _load_extra_state(self, state):
        pass

    def state_dict(self):
        """``{"base": the base optimizer's state_dict (torch's format), "wrapper": ..., "type": ...}``."""
        return {"base": self.base_optimizer.state_dict(), "wrapper": self._extra_state(), "type": type(self).__name__}

    def load_state_dict(self, state_dict):
        """Loads :meth:`state_dict`'s output, or a plain torch optimizer's state_dict (the base
        optimizer's, e.g. from a run without the wrapper)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"{name}.load_state_dict: expected a dict, got {type(state_dict).__name__}")
        if "base" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:  # torch's own format: the base's
                state_dict = {"base": state_dict, "wrapper": {}}
            else:
                raise ValueError(f"{name}.load_state_dict: expected a dict from {name}.state_dict() (with 'base' and "
                                 "'wrapper' keys) or a torch optimizer's state_dict")
        kind = state_dict.get("type")
        if kind is not None and kind != name and not (name in _AGGREGATORS and kind in _AGGREGATORS):
            raise ValueError(f"{name}.load_state_dict: this state_dict was saved by a {kind}, not a {name}")
        self._check_extra_state(state_dict.get("wrapper", {}))
        self.base_optimizer.load_state_dict(state_dict["base"])
        self._base_loaded(state_dict.get("wrapper", {}))

    def _base_loaded(self, wrapper_state):
        """After the base optimizer loaded a state_dict: share its new group dicts, load ours."""
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict made new group dicts
        self._t.layout_cache = None
        self._load_extra_state(wrapper_state)

    def _check_extra_state(self, state):
        """Raise before anything is loaded if the wrapper state is not this optimizer's."""

    def __repr__(self):
        return f"{type(self).__name__}(base={self.base_optimizer!r}, fused={self.fused})"

    # -- copies (copy.deepcopy, pickle) ------------------------------------------------------
    # torch's Optimizer pickles only defaults, state and param_groups; a wrapper needs the rest
    # of its attributes too. Helpers whose caches are keyed by a parameter's id re-key or drop
    # them when copied (the copy's parameters are new objects), and caches of per-step work are
    # dropped here, so they are rebuilt for the copy's parameters on first use. torch's
    # optimizer hooks are not copied, as torch does not copy them either.
    def __getstate__(self):
        why = self._mid_step()
        if why is not None:
            raise RuntimeError(f"{type(self).__name__} cannot be copied or pickled {why}: finish the step first "
                               "(or call abort(), where the optimizer has one)")
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        state["_t"] = self._transient_to_copy()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.base_optimizer.register_state_dict_post_hook(export_state_dict)  # torch's copy drops hooks

    def _mid_step(self):
        """Why the optimizer is in the middle of a step (its state then lives only there), or None."""
        return None

    def _transient_to_copy(self):
        """A shallow copy of the per-step state without the caches a copy must rebuild."""
        t = copy.copy(self._t)
        t.layout_cache = None
        return t

    # -- the parameters of a step ------------------------------------------------------
    def _layout(self):
        lay = self._t.layout_cache
        if lay is None or lay.signature != Layout.signature_of(self.param_groups):
            lay = self._t.layout_cache = Layout(self.param_groups)
        return lay

    def _params(self):
        """Every parameter once, in param-group order."""
        return self._layout().params

    def _gather(self):
        """[Part] of the parameters that have a gradient, in one C++ call when all of them do."""
        lay = self._layout()
        grads, missing = _utils.grads_of(lay.params)
        if missing == 0:
            if len(lay.parts) == 1:
                return [Part(lay.parts[0].group, lay.parts[0].params, grads)]
            return [Part(g, ps, grads[a:b]) for (g, ps), (a, b) in zip(lay.parts, lay.bounds)]
        # Some have none (a head this batch did not use): the same subset gets the same list
        # object step after step, so what is cached per list (the fused update's state lists,
        # the perturbation buffers, SAM's fold of restore and update) keeps working.
        cache = lay.memo.setdefault("subsets", {})
        parts = []
        has = tuple(map(operator.is_not, grads, itertools.repeat(None)))  # (builtins: no Python per parameter)
        for j, ((group, ps), (a, b)) in enumerate(zip(lay.parts, lay.bounds)):
            keep = has[a:b]
            if all(keep):
                parts.append(Part(group, ps, grads[a:b]))
            elif any(keep):
                sub = cache.get((j, keep))
                if sub is None:
                    if len(cache) > 64:  # subsets that keep changing: keep it bounded
                        cache.clear()
                    sub = cache[(j, keep)] = list(itertools.compress(ps, keep))
                parts.append(Part(group, sub, list(itertools.compress(grads[a:b], keep))))
        return parts  # (sparse gradients: the fused ops refuse them, naming the tensor)

    def _sync(self):
        """All-reduce across processes? ``ddp_sync`` (RoGA, PCGrad) if given, else whether
        torch.distributed runs with more than one process. Never for sharded (FSDP2)
        parameters: FSDP reduce-scatters every backward pass itself, so the gradients are
        already global (and their shards are what the fused ops read)."""
        if self._layout().sharded:
            if getattr(self, "ddp_sync", None):
                raise ValueError(f"{type(self).__name__}: ddp_sync=True, but the parameters are DTensors "
                                 "(fully_shard): FSDP already reduce-scatters the gradients; leave ddp_sync=None")
            return False
        if getattr(self, "ddp_sync", None) is not None:
            return bool(self.ddp_sync)
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    # -- the base update ---------------------------------------------------------------
    def _base_step(self, parts, found_inf=None):
        """The base optimizer's update for [UpdatePart]; ``found_inf`` (a device tensor):
        nonzero skips it. Fused: one call per part, no host sync. Otherwise the parts'
        sources, weights and grad_out are applied first, then torch's step()."""
        if self.fused:
            self._update.step(parts, found_inf)
            self._opt_called = self.base_optimizer._opt_called = True  # LR schedulers check this (either may have one)
            return
        for part in parts:
            if part.source is not None:
                ops.restore_(part.params, part.source, backend=self.backend)
            out = part.grad_out if part.grad_out is not None else part.grads[0]
            if part.direct is not None and out is part.grads[0]:  # the direct term reads it after the step
                out = [torch.empty_like(g) for g in out]
            if part.weights is not None or len(part.grads) > 1:
                ws = part.weights if part.weights is not None else [1.0] * len(part.grads)
                ops.combine_(out, part.grads, ws, backend=self.backend)
            elif out is not part.grads[0]:
                torch._foreach_copy_(out, part.grads[0])
            _utils.set_grads(part.params, out)
        if found_inf is not None and float(found_inf) != 0.0:
            return  # AMP overflow: skip (this path synchronises once)
        self.base_optimizer.step()
        self._opt_called = True
        for part in parts:
            if part.direct is not None:
                ops.sgd_(part.params, part.grads, lr=part.group["lr"], grad_weights=part.direct, backend=self.backend)

    def _grad_coef(self, parts, grad_scale=None):
        """The coefficient AMP's unscaling and clipping put on the gradients (a 0-d device
        tensor, None when both are off): 1/grad_scale, times min(1, max/||g/grad_scale||)."""
        coef = None if grad_scale is None else grad_scale.double().reciprocal().float()
        if self.max_grad_norm is not None:
            n = _utils.global_norm([(p.params, p.grads) for p in parts], self.backend)
            if coef is not None:
                n = n * coef.to(n.device)
            clip = _utils.clip_coef(n, self.max_grad_norm)
            coef = clip if coef is None else coef.to(clip.device) * clip
        return coef


_AGGREGATORS = ("PCGrad", "GradientAggregator")


def _build_base(cls, groups, kwargs):
    """The base optimizer, in torch's multi-tensor form unless the caller chose an
    implementation: torch defaults to a per-parameter loop on CPU, which dominates the step
    for models with many small tensors when the update is not fused (fused=False, or a base
    optimizer other than SGD/Adam/AdamW). With a tensor learning rate the per-parameter
    loop: torch's multi-tensor Adam refuses one at step() unless capturable (and torch's own
    default on CUDA is the multi-tensor form)."""
    lrs = [kwargs.get("lr")] + [g.get("lr") for g in groups if isinstance(g, dict)]
    tensor_lr = any(isinstance(lr, torch.Tensor) for lr in lrs)
    if not {"foreach", "fused", "differentiable", "capturable"} & set(kwargs):
        if "foreach" in inspect.signature(cls).parameters:
            try:
                return cls(groups, **kwargs, foreach=not tensor_lr)
            except (RuntimeError, ValueError, TypeError):
                pass  # unsupported here (device, torch version): torch's default
    return cls(groups, **kwargs)


def _flat_params(params):
    for item in params:
        if isinstance(item, dict):
            yield from item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]]
        else:
            yield item


__all__ = ["WrapperOptimizer", "Part", "Layout", "UpdatePart"]
