"""Free helpers of the wrapper optimizers: gradients in bulk, norms and scaling, device
grouping, flat views for DDP, AMP, BatchNorm freezing and clipping."""
import contextlib
import math
import sys

from typing import NamedTuple

import torch

from .. import ops
from ..ops import native

_C = native._C


# ---------------------------------------------------------------- gradients in bulk
# One C++ loop per call when the compiled module is loaded (eager), else (torch.compile
# tracing, no extension) the same in Python.

def grads_of(params):
    """([p.grad for p in params], how many are None)."""
    if _C is not None and not torch.compiler.is_compiling():
        return _C.grads_of(params)
    gs = [p.grad for p in params]
    return gs, sum(g is None for g in gs)


def take_grads(params):
    """:func:`grads_of`, and ``p.grad = None`` for every p, in one loop."""
    if _C is not None and not torch.compiler.is_compiling():
        return _C.grads_of(params, True)
    out = grads_of(params)
    set_grads(params, None)
    return out


def set_grads(params, grads=None):
    """``p.grad = g`` for each pair (the caller's own buffers, shaped like p), or
    ``p.grad = None`` for every p when ``grads`` is None."""
    if _C is not None and not torch.compiler.is_compiling():
        _C.set_grads(params, grads)
        return
    for i, p in enumerate(params):
        p.grad = None if grads is None else grads[i]


def swap_data(params, data):
    """``p.data = t`` for each pair; returns the old ``p.data`` tensors."""
    if _C is not None:
        return _C.swap_data(params, data)
    old = [p.data for p in params]
    for p, t in zip(params, data):
        p.data = t
    return old


# ---------------------------------------------------------------- sharded (DTensor) tensors

def is_dtensor(t):
    """Is ``t`` a DTensor (an FSDP2 ``fully_shard`` parameter or gradient)? Never imports
    torch.distributed.tensor (seconds): if it is not loaded, nothing is a DTensor."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_value(x):
    """A reduction's result (a norm, a Gram matrix) as a plain tensor: on DTensors the ops
    return a replicated DTensor, whose local tensor is the whole value on every rank."""
    return x.to_local() if is_dtensor(x) else x


# ---------------------------------------------------------------- norms and scaling

def global_norm(pairs, backend="auto", adaptive=None, split=False):
    """Global L2 norm of several (params, grads) lists, one fused call per list, as a 0-d
    tensor on the first list's device (no host sync). Each list is on one device (the
    optimizers' parts are), unless ``split``: then lists are split by device first.

    adaptive: per list, None or eta (ASAM norm || (|p| + eta) g ||)."""
    parts = []
    for i, (ps, gs) in enumerate(pairs):
        eta = None if adaptive is None else adaptive[i]
        for dps, dgs in (by_device(ps, gs) if split else [(ps, gs)]):
            parts.append(local_value(ops.norm(dgs, params=dps if eta is not None else None, eta=eta or 0.0,
                                              backend=backend)))
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


def clip_coef(norm, max_norm):
    """min(1, max_norm / (norm + 1e-6)) as a device tensor (torch's clip_grad_norm_ formula)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


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
    total = global_norm([(grads, grads)], backend, split=True)
    scale_([gs for (gs,) in by_device(grads)], clip_coef(total, float(max_norm)), backend)
    return total


# ---------------------------------------------------------------- devices, DDP, AMP, BN

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


class FlatViews(NamedTuple):
    """One flat buffer per (dtype, device), and a view of it shaped like each parameter."""
    buffers: list
    views: dict  # id(param) -> view


def flat_views(params, zero=False):
    """Views of one flat buffer per (dtype, device) shaped like each param: a whole gradient
    set all-reduced in one collective per buffer."""
    groups = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    bufs, views = [], {}
    for (dt, dev), gp in groups.items():
        alloc = torch.zeros if zero else torch.empty
        buf = alloc(sum(p.numel() for p in gp), dtype=dt, device=dev)
        bufs.append(buf)
        for p, v in zip(gp, buf.split([p.numel() for p in gp])):
            views[id(p)] = v.as_strided(p.shape, grad_strides(p))
    return FlatViews(bufs, views)


def grad_strides(p):
    """The strides autograd gives p's gradient: p's own when p is dense in any order (e.g.
    channels_last weights), row-major otherwise. Buffers that stand in for gradients use them,
    since the fused kernels walk the tensors at one position in one memory order."""
    return torch.empty_like(p, device="meta").stride()


def in_layout_of(t, p):
    """t itself when it is laid out as p's state should be (grad_strides), else a copy that
    is: state saved from a model in another memory layout (a checkpoint written before
    ``model.to(memory_format=torch.channels_last)``) keeps working, as it does in torch.optim."""
    return t if t.stride() == grad_strides(p) else torch.empty_like(p, dtype=t.dtype).copy_(t)


def inv_scale_of(scaler):
    """1 / scale of a torch.amp.GradScaler as a 0-d device tensor (no host sync), or None."""
    if scaler is None or not scaler.is_enabled():
        return None
    s = getattr(scaler, "_scale", None)  # the device tensor behind get_scale()
    if s is None:
        s = torch.tensor(scaler.get_scale())
    return s.double().reciprocal().float()


def scaler_found_inf(scaler, optimizer):
    """The found_inf tensor GradScaler.unscale_(optimizer) recorded (summed over devices),
    without a host sync; GradScaler.update() reads the same tensors."""
    per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    found = list(per_device.values())
    return found[0] if len(found) == 1 else sum(f.to(found[0].device) for f in found)


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


# ---------------------------------------------------------------- swap or copy

def swap_is_safe(params):
    """Can parameter storage be swapped (``p.data = other``) instead of copied?

    Not when a parameter is a view of (or shares storage with) another tensor, e.g. flat
    parameter buffers or FSDP's sharded parameters, and not while a CUDA graph is captured."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    seen = set()
    for p in params:
        if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
            return False  # tensor subclasses (DTensor): their storage is not ours to swap
        if p._base is not None:
            return False
        key = p.untyped_storage().data_ptr()
        if key in seen:
            return False
        seen.add(key)
    return True


# Mean parameter size above which swapping pays for its per-parameter cost (a C++ set_data,
# twice per perturbation) with the bytes it saves (12 per element): ~1.5k elements at the
# ~60 GB/s of a CPU, ~75k at the ~3 TB/s of an H100. See benchmarks/RESULTS.md.
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
            raise ValueError("strategy='swap' is unsafe here: a parameter shares storage with another tensor, is a "
                             "tensor subclass (e.g. FSDP's DTensor), or a CUDA graph is being captured; use "
                             "strategy='copy'")
        return "swap"
    threshold = SWAP_MIN_MEAN_NUMEL.get(params[0].device.type, math.inf)
    mean = sum(p.numel() for p in params) / len(params)
    return "swap" if safe and mean >= threshold else "copy"
