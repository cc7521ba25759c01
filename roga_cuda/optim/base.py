"""Plumbing shared by the wrapper optimizers (SAM, RoGA, PCGrad).

A wrapper owns a *base* optimizer (SGD, AdamW, ...) and shares its ``param_groups``, so
LR schedulers, per-group hyper-parameters and ``zero_grad`` behave as with the base
optimizer alone. Every whole-model operation goes through :mod:`roga_cuda.ops` (one fused
call per parameter group and device, never one per parameter).
"""
import contextlib
import inspect
import math

import torch
import torch.distributed as dist

from .. import ops

_EPS = 1e-12


class WrapperOptimizer(torch.optim.Optimizer):
    """Base class: builds or adopts the base optimizer and shares its param_groups."""

    def __init__(self, params, base_optimizer, defaults, backend="auto", max_grad_norm=None, **base_kwargs):
        name = type(self).__name__
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"{name}: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"{name}: unknown backend {backend!r}; choose one of {('auto',) + ops.BACKENDS}")
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

    def add_param_group(self, param_group):
        if not hasattr(self, "base_optimizer"):  # during __init__
            return super().add_param_group(param_group)
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self.base_optimizer.add_param_group(param_group)

    # -- state -------------------------------------------------------------------------
    def _extra_state(self):
        """Wrapper state that must survive a checkpoint (subclasses extend)."""
        return {}

    def _load_extra_state(self, state):
        pass

    def state_dict(self):
        return {"base": self.base_optimizer.state_dict(), "wrapper": self._extra_state()}

    def load_state_dict(self, state_dict):
        if "base" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict from "
                             f"{type(self).__name__}.state_dict() (with 'base' and 'wrapper' keys)")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict made new group dicts
        self._load_extra_state(state_dict.get("wrapper", {}))

    def __repr__(self):
        return f"{type(self).__name__}(base={self.base_optimizer!r})"

    # -- helpers ---------------------------------------------------------------------------
    def _with_grads(self, groups=None):
        """[(group, params, grads)] for parameters that have a gradient (skips the rest)."""
        out = []
        for group in (self.param_groups if groups is None else groups):
            ps, gs = [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter of shape {tuple(p.shape)}); use dense gradients, "
                                       "e.g. nn.Embedding(..., sparse=False)")
                ps.append(p)
                gs.append(g)
            out.append((group, ps, gs))
        return out

    def _sync(self):
        """All-reduce across processes? ``ddp_sync`` (RoGA, PCGrad) if given, else whether
        torch.distributed runs with more than one process."""
        if getattr(self, "ddp_sync", None) is not None:
            return bool(self.ddp_sync)
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _params(self):
        """Every trainable parameter once, in param-group order."""
        return list({id(p): p for g in self.param_groups for p in g["params"] if p.requires_grad}.values())

    def _buffers(self, kind, params):
        """Persistent scratch tensors like each param (allocated once, reused every step).

        The per-parameter store is keyed by id(p) (Tensor.__hash__ is a Python-level call,
        too slow for a loop over hundreds of parameters every step); an entry keeps p, so
        its id cannot be reused while the entry lives. The assembled list is cached per
        parameter list (callers must not modify it)."""
        lists = self.__dict__.setdefault("_scratch_lists", {})
        key = (kind, tuple(map(id, params)))
        out = lists.get(key)
        if out is not None:
            return out
        store = self.__dict__.setdefault("_scratch", {}).setdefault(kind, {})
        out = []
        for p in params:
            e = store.get(id(p))
            if e is None or e[0] is not p or e[1].shape != p.shape or e[1].dtype != p.dtype:
                e = store[id(p)] = (p, torch.empty_like(p, memory_format=torch.preserve_format))
            out.append(e[1])
        if len(lists) > 64:  # parameter lists that come and go: keep the cache bounded
            lists.clear()
        lists[key] = out
        return out

    def _set_buffers(self, kind, params, tensors):
        store = self._scratch[kind]
        for p, t in zip(params, tensors):
            store[id(p)] = (p, t)
        self._scratch_lists = {k: v for k, v in self._scratch_lists.items() if k[0] != kind}

    def _strategy(self, params):
        """choose_strategy, cached per parameter list (its checks walk every parameter)."""
        key = tuple(map(id, params))
        cache = self.__dict__.setdefault("_strategy_cache", {})
        hit = cache.get(key)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if hit is None:
            hit = cache[key] = choose_strategy(self.strategy, params)
        return "copy" if capturing and self.strategy != "swap" else hit

    def _perturb_params(self, ps, gs, s, strategy, adaptive=False, eta=0.0):
        """Move ``ps`` (one device) to ``p + s * g`` (ASAM: ``p + s (|p|+eta)^2 g``).

        Returns what _restore_params needs: ("copy", params, backup) or ("swap", params, saved
        storage). "swap" writes the perturbed point into a spare buffer and points each
        parameter's .data at it, so restoring is free and trivially bit-exact."""
        if strategy == "copy":
            backup = self._buffers("backup", ps)
            ops.perturb_(ps, gs, backup, s, adaptive=adaptive, eta=eta, backend=self.backend)
            return ("copy", ps, backup)
        spare = self._buffers("spare", ps)
        if adaptive:  # in place, originals to the spare buffer; the perturbed storage becomes the next spare
            ops.perturb_(ps, gs, spare, s, adaptive=True, eta=eta, backend=self.backend)
            self._set_buffers("spare", ps, [p.data for p in ps])
            return ("swap", ps, spare)
        ops.combine_(spare, [ps, gs], [1.0, s], backend=self.backend)  # spare = p + s g
        orig = [p.data for p in ps]
        for p, b in zip(ps, spare):
            p.data = b
        return ("swap", ps, orig)

    def _restore_params(self, moves):
        """Undo _perturb_params for every move."""
        for kind, ps, saved in moves:
            if kind == "copy":
                ops.restore_(ps, saved, backend=self.backend)
            else:
                for p, t in zip(ps, saved):
                    p.data = t

    def _norm(self, pairs, adaptive=None):
        return global_norm(pairs, self.backend, adaptive)

    def _scale_grads_(self, grads_by_dev, coef):
        scale_(grads_by_dev, coef, self.backend)

    def _clip_coef(self, pairs, pre_scale=None):
        """min(1, max_grad_norm / ||pre_scale * g||) as a 0-d device tensor (no host sync)."""
        n = self._norm(pairs)
        if pre_scale is not None:
            n = n * pre_scale
        return (self.max_grad_norm / (n + 1e-6)).clamp(max=1.0)


def global_norm(pairs, backend="auto", adaptive=None):
    """Global L2 norm of several (params, grads) lists, one fused call per list and device,
    as a 0-d tensor on the first list's device (no host sync).

    adaptive: per list, None or eta (ASAM norm || (|p| + eta) g ||)."""
    parts = []
    for i, (ps, gs) in enumerate(pairs):
        eta = None if adaptive is None else adaptive[i]
        for dps, dgs in by_device(ps, gs):
            parts.append(ops.norm(dgs, params=dps if eta is not None else None, eta=eta or 0.0, backend=backend))
    if len(parts) == 1:
        return parts[0]
    dev = parts[0].device
    return torch.stack([p.to(dev, torch.float64) for p in parts]).norm().to(parts[0].dtype)


def scale_(grad_lists, coef, backend="auto"):
    """grads *= coef (a float or a 0-d tensor) for each list of one device, one fused pass each."""
    for gs in grad_lists:
        if gs:
            c = coef.to(gs[0].device) if isinstance(coef, torch.Tensor) else coef
            ops.combine_(gs, [gs], [c], backend=backend)


def flat_views(params, zero=False):
    """Views of one flat buffer per (dtype, device) shaped like each param: a whole gradient
    set all-reduced in one collective per buffer. Returns (buffers, {id(param): view})."""
    groups = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    bufs, views = [], {}
    for (dt, dev), gp in groups.items():
        alloc = torch.zeros if zero else torch.empty
        buf = alloc(sum(p.numel() for p in gp), dtype=dt, device=dev)
        bufs.append(buf)
        for p, v in zip(gp, buf.split([p.numel() for p in gp])):
            views[id(p)] = v.view_as(p)
    return bufs, views


def _build_base(cls, groups, kwargs):
    """The base optimizer, in torch's multi-tensor form unless the caller chose an
    implementation: torch defaults to a per-parameter loop on CPU, which dominates the step
    for models with many small tensors. Not fused by default: torch's fused SGD with
    momentum leaves its momentum buffers uninitialised when GradScaler skips its first step
    (seen with torch 2.13), and the next step then uses garbage."""
    if not {"foreach", "fused", "differentiable", "capturable"} & set(kwargs):
        if "foreach" in inspect.signature(cls).parameters:
            try:
                return cls(groups, **kwargs, foreach=True)
            except (RuntimeError, ValueError, TypeError):
                pass  # unsupported here (device, torch version): torch's default
    return cls(groups, **kwargs)


def _flat_params(params):
    for item in params:
        if isinstance(item, dict):
            yield from item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]]
        else:
            yield item


def by_device(*lists):
    """Split parallel lists by the device of the first list's tensors (one fused call each)."""
    first = lists[0]
    if not first:
        return []
    d0 = first[0].get_device()  # an int: much cheaper to compare than torch.device objects
    if all(t.get_device() == d0 for t in first) and (d0 >= 0 or first[0].device.type == "cpu"):
        return [lists]
    groups = {}
    for i, t in enumerate(first):
        groups.setdefault(t.device, []).append(i)
    return [tuple([l[i] for i in idx] for l in lists) for idx in groups.values()]


def inv_scale_of(scaler):
    """1 / scale of a torch.amp.GradScaler as a 0-d device tensor (no host sync), or None."""
    if scaler is None or not scaler.is_enabled():
        return None
    s = getattr(scaler, "_scale", None)  # the device tensor behind get_scale()
    if s is None:
        s = torch.tensor(scaler.get_scale())
    return s.double().reciprocal().float()


@contextlib.contextmanager
def freeze_bn_stats(model):
    """Freeze BatchNorm running statistics inside the block (the perturbed pass of SAM/RoGA).

    BatchNorm layers in training mode still normalise with the batch statistics, but their
    running mean/var and num_batches_tracked are left untouched, so the perturbed forward
    pass does not count twice (or at the wrong weights) in the statistics used at test time.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, backend="auto"):
    """Fused ``torch.nn.utils.clip_grad_norm_``: one norm pass and one scaling pass.

    Returns the total norm (0-d tensor) before clipping, like torch's version; no host sync.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = global_norm([(grads, grads)], backend)
    scale_([gs for (gs,) in by_device(grads)], (float(max_norm) / (total + 1e-6)).clamp(max=1.0), backend)
    return total


def mean_param_numel(params):
    params = list(params)
    return sum(p.numel() for p in params) / max(1, len(params))


def swap_is_safe(params):
    """Can parameter storage be swapped (``p.data = other``) instead of copied?

    Not when a parameter is a view of (or shares storage with) another tensor, e.g. flat
    parameter buffers, and not while a CUDA graph is being captured."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    seen = set()
    for p in params:
        if p._base is not None:
            return False
        key = p.untyped_storage().data_ptr()
        if key in seen:
            return False
        seen.add(key)
    return True


# Mean parameter size above which swapping pays for its per-parameter Python cost (~0.15 us
# per `p.data =`, twice per perturbation) with the bytes it saves (12 per element): ~1.5k
# elements at the ~60 GB/s of a CPU, ~75k at the ~3 TB/s of an H100. See benchmarks/RESULTS.md.
SWAP_MIN_MEAN_NUMEL = {"cpu": 4096, "cuda": 131072}


def choose_strategy(strategy, params):
    if strategy not in ("auto", "copy", "swap"):
        raise ValueError(f"strategy must be 'auto', 'copy' or 'swap', got {strategy!r}")
    if strategy == "copy":
        return "copy"
    params = list(params)
    if not params:
        return "copy"
    safe = swap_is_safe(params)
    if strategy == "swap":
        if not safe:
            raise ValueError("strategy='swap' is unsafe here: a parameter shares storage with another tensor "
                             "(or a CUDA graph is being captured); use strategy='copy'")
        return "swap"
    threshold = SWAP_MIN_MEAN_NUMEL.get(params[0].device.type, math.inf)
    return "swap" if safe and mean_param_numel(params) >= threshold else "copy"
