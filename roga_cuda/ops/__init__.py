"""Fused multi-tensor primitives behind one API, with a choice of backend.

Every function takes lists of tensors on one device (mixed shapes and float dtypes,
0-element and 0-d tensors allowed) and a ``backend``:

=============  ===============================================================
``reference``  per-tensor Python loop; the executable specification
``foreach``    ``torch._foreach_*`` composition; the baseline and the fallback
``cpu``        C++ multi-tensor kernels (compiled ``roga_cuda._C``), CPU tensors
``cuda``       CUDA multi-tensor kernels (compiled ``roga_cuda._C``), CUDA tensors
``triton``     Triton multi-tensor kernels; CUDA tensors (CPU under TRITON_INTERPRET=1)
``auto``       the fastest available for the device; ``ROGA_BACKEND`` overrides it
=============  ===============================================================

Scalars (``scale``, ``weight``, ``weights``) may be Python floats or 0-d tensors on the
lists' device (read on the device: no host synchronisation). Reductions accumulate in
float32 or wider and return float32 (float64 when an input is float64).
"""
import numbers
import os
import warnings
from dataclasses import dataclass, field

import torch

from . import foreach, reference

__all__ = [
    "norm", "perturb_", "restore_", "restore_accumulate_", "gram", "combine_",
    "backends", "resolve_backend", "BACKENDS",
]

BACKENDS = ("reference", "foreach", "cpu", "cuda", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Backend:
    name: str
    module: object = None
    available: bool = False
    reason: str = None  # why unavailable
    device_types: tuple = ()  # device types it runs on; () = any
    validates: bool = False  # True: the kernels check their inputs themselves (C++)
    extra: dict = field(default_factory=dict)


_registry = {
    "reference": Backend("reference", reference, True),
    "foreach": Backend("foreach", foreach, True),
}


def _register_compiled():
    from . import native
    for be in native.backends():
        _registry[be.name] = be
    try:
        from . import triton as triton_backend
        _registry["triton"] = triton_backend.backend()
    except ImportError:
        _registry["triton"] = Backend("triton", reason="roga_cuda.ops.triton is missing")


_register_compiled()


def backends():
    """Availability of every backend: ``{name: {"available": bool, "reason": str|None, "devices": [...]}}``."""
    return {
        name: {
            "available": be.available,
            "reason": be.reason,
            "devices": list(be.device_types) or ["any"],
        }
        for name, be in ((n, _registry[n]) for n in BACKENDS)
    }


_warned = set()


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _auto(device):
    """The backend ``auto`` means for tensors on ``device``."""
    if device.type == "cpu":
        be = _registry["cpu"]
        if be.available:
            return be
        _warn_once("auto-cpu", f"roga_cuda: the compiled CPU backend is unavailable ({be.reason}); "
                               "backend='auto' falls back to 'foreach'.")
        return _registry["foreach"]
    if device.type == "cuda":
        for name in _cuda_preference():
            be = _registry[name]
            if be.available and (not be.device_types or "cuda" in be.device_types):
                return be
        _warn_once("auto-cuda", "roga_cuda: neither the compiled CUDA backend "
                                f"({_registry['cuda'].reason}) nor Triton ({_registry['triton'].reason}) "
                                "is available; backend='auto' falls back to 'foreach'.")
    return _registry["foreach"]


def _cuda_preference():
    # Measured (benchmarks/RESULTS.md, H100, 2026-11-22): the CUDA kernels beat the Triton
    # ones on every primitive and list through this API (RoGA cycle on ResNet-34: 0.47 vs
    # 2.34 ms; 400-tensor list: 0.63 vs 6.9 ms), mostly on host cost per call. Triton is the
    # fallback when the extension was built without CUDA. See docs/kernels.md "auto".
    return ("cuda", "triton")


def resolve_backend(backend, device):
    """The :class:`Backend` that ``backend`` names for tensors on ``device``."""
    device = torch.device(device)
    source = "backend"
    if backend == "auto":
        env = os.environ.get("ROGA_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = env, "ROGA_BACKEND"
        else:
            return _auto(device)
    be = _registry.get(backend)
    if be is None:
        raise ValueError(f"unknown {source} {backend!r}; choose one of {('auto',) + BACKENDS}")
    if not be.available:
        raise RuntimeError(f"{source} {backend!r} is unavailable: {be.reason}")
    if be.device_types and device.type not in be.device_types:
        raise ValueError(f"{source} {backend!r} runs on {'/'.join(be.device_types)} tensors, "
                         f"but the tensors are on {device}")
    return be


# ----------------------------------------------------------------------------- validation

def _tensor_list(op, name, x):
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a list or tuple of tensors, not a single Tensor")
    try:
        lst = list(x)
    except TypeError:
        raise TypeError(f"{op}: `{name}` must be a list or tuple of tensors, got {type(x).__name__}") from None
    for i, t in enumerate(lst):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")
    return lst


def _extent(t):
    """[start, end) byte range a strided tensor can touch."""
    n = t.numel()
    if n == 0:
        return 0, 0
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + n * t.element_size()
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return start, start + span * t.element_size()


def _validate(op, named, written=(), alias_ok=False):
    """Python-side checks for backends without their own (reference, foreach, triton).

    named: [(name, list)]; written: names of lists the op writes. All lists have one
    length; tensors are dense float tensors on one device; tensors at one position agree
    in shape and dtype; a written tensor may share memory with another at its position
    only as an exact alias, and only where the op allows it (``combine_``'s ``out``).
    The common case is checked with whole-list comparisons; only a failure walks the
    tensors one by one to name the culprit.
    """
    (name0, first), *rest = named
    n = len(first)
    for name, lst in rest:
        if len(lst) != n:
            raise ValueError(f"{op}: `{name}` has {len(lst)} tensors but `{name0}` has {n}")
    dev = first[0].device
    metas = [[(t.layout, t.dtype, t.device) for t in lst] for _, lst in named]
    ok_meta = {(torch.strided, dt, dev) for dt in _FLOAT_DTYPES}
    for (name, lst), meta in zip(named, metas):
        if not ok_meta.issuperset(meta):
            for i, (t, (layout, dtype, device)) in enumerate(zip(lst, meta)):
                if layout != torch.strided:
                    raise TypeError(f"{op}: {name}[{i}] is a {layout} tensor; only dense (strided) tensors are supported")
                if dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"{op}: {name}[{i}] has dtype {dtype}; supported: float16, bfloat16, float32, float64")
                if device != dev:
                    raise ValueError(f"{op}: {name}[{i}] is on {device} but {name0}[0] is on {dev}; "
                                     "all tensors must be on one device")
    shapes0 = [t.shape for t in first]
    for (name, lst), meta in zip(rest, metas[1:]):
        if meta != metas[0] or [t.shape for t in lst] != shapes0:
            for i, (a, b) in enumerate(zip(first, lst)):
                if a.shape != b.shape:
                    raise ValueError(f"{op}: {name}[{i}] has shape {list(b.shape)} but {name0}[{i}] has shape {list(a.shape)}")
                if a.dtype != b.dtype:
                    raise TypeError(f"{op}: {name}[{i}] has dtype {b.dtype} but {name0}[{i}] has {a.dtype}; "
                                    "tensors at one position must share a dtype")
    lists = dict(named)
    extents = {}
    for wname in written:
        wext = extents.setdefault(wname, [_extent(t) for t in lists[wname]])
        for name, lst in named:
            if name == wname:
                continue
            ext = extents.setdefault(name, [_extent(t) for t in lst])
            for i, ((a0, a1), (b0, b1)) in enumerate(zip(wext, ext)):
                if a0 < b1 and b0 < a1:
                    w, t = lists[wname][i], lst[i]
                    exact = w.data_ptr() == t.data_ptr() and w.stride() == t.stride()
                    if not (alias_ok and exact):
                        raise ValueError(f"{op}: {wname}[{i}] shares memory with {name}[{i}]"
                                         + (" without being the same tensor" if alias_ok else ""))


def _prepare(op, backend, named, written=(), alias_ok=False, allow_empty=True):
    """Lists to Python lists, pick the backend, validate. Returns (backend, lists, device).

    Fast path for the compiled backends, which check every tensor in C++: lists and tuples
    of tensors go through untouched (no per-element Python loop); anything else, or an
    element that is not a tensor, takes the checking path and its precise error."""
    raw = [lst for _, lst in named]
    if all(type(l) in (list, tuple) for l in raw) and raw[0] and isinstance(raw[0][0], torch.Tensor):
        device = raw[0][0].device
        be = resolve_backend(backend, device)
        if be.validates:
            return be, raw, device
    lists = [_tensor_list(op, name, lst) for name, lst in named]
    if not lists[0] or any(len(l) == 0 for l in lists):
        if allow_empty and all(len(l) == 0 for l in lists):
            return None, lists, None
        if all(len(l) == 0 for l in lists):
            raise ValueError(f"{op}: `{named[0][0]}` is an empty list; there is nothing to reduce "
                             "(and no device to return a result on)")
        raise ValueError(f"{op}: list lengths differ: "
                         + ", ".join(f"`{name}` has {len(l)}" for (name, _), l in zip(named, lists)))
    device = lists[0][0].device
    be = resolve_backend(backend, device)
    if not be.validates:
        _validate(op, [(name, l) for (name, _), l in zip(named, lists)], written, alias_ok)
    return be, lists, device


def _scalar(op, name, s, device):
    """A Python float, or a float32/float64 0-d tensor on ``device`` (CPU tensors become floats)."""
    if isinstance(s, torch.Tensor):
        if s.dim() != 0:
            raise ValueError(f"{op}: `{name}` must be a Python number or a 0-d tensor, got shape {list(s.shape)}")
        if s.is_complex() or not (s.is_floating_point() or s.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{op}: `{name}` has dtype {s.dtype}; use a real floating-point value")
        s = s.detach()
        if s.device.type == "cpu":
            return float(s)  # free: no device to synchronise with
        if s.device != device:
            raise ValueError(f"{op}: `{name}` is on {s.device} but the tensors are on {device}")
        return s if s.dtype in (torch.float32, torch.float64) else s.float()
    if isinstance(s, numbers.Real):  # Python and NumPy numbers
        return float(s)
    raise TypeError(f"{op}: `{name}` must be a number or a 0-d tensor, got {type(s).__name__}")


def _weights(op, weights, k, device):
    """K weights: a list of floats, or a float32/float64 1-d tensor on ``device``."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.numel() != k:
            raise ValueError(f"{op}: `weights` must hold {k} values (one per list), got shape {list(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"{op}: `weights` has dtype {weights.dtype}; use a floating-point tensor")
        weights = weights.detach()
        if weights.device.type == "cpu":
            return [float(w) for w in weights.tolist()]
        if weights.device != device:
            raise ValueError(f"{op}: `weights` is on {weights.device} but the tensors are on {device}")
        return weights if weights.dtype in (torch.float32, torch.float64) else weights.float()
    try:
        ws = list(weights)
    except TypeError:
        raise TypeError(f"{op}: `weights` must be a sequence of {k} numbers or a 1-d tensor") from None
    if len(ws) != k:
        raise ValueError(f"{op}: got {len(ws)} weights for {k} lists")
    ws = [_scalar(op, f"weights[{j}]", w, device) for j, w in enumerate(ws)]
    if any(isinstance(w, torch.Tensor) for w in ws):
        return torch.stack([w.float() if isinstance(w, torch.Tensor) else torch.tensor(w, device=device) for w in ws])
    return ws


# ------------------------------------------------------------------------------ the API

@torch.no_grad()
def norm(ts, per_tensor=False, *, params=None, eta=0.0, backend="auto"):
    """Global L2 norm ``sqrt(sum_i ||ts[i]||^2)`` as a 0-d tensor on the lists' device.

    ``per_tensor=True`` returns ``(total, per_tensor_norms)``. With ``params`` it is the
    ASAM norm ``|| (|params| + eta) * ts ||``. Non-finite values propagate.
    """
    named = [("ts", ts)] + ([("params", params)] if params is not None else [])
    be, lists, _ = _prepare("norm", backend, named, allow_empty=False)
    total, per = be.module.norm(lists[0], bool(per_tensor), lists[1] if params is not None else None, float(eta))
    return (total, per) if per_tensor else total


@torch.no_grad()
def perturb_(params, grads, backup, scale, *, adaptive=False, eta=0.0, backend="auto"):
    """``backup <- params; params += scale * grads`` in one pass.

    ``adaptive=True`` (ASAM) perturbs by ``scale * (|params| + eta)^2 * grads``.
    """
    be, (p, g, b), dev = _prepare("perturb_", backend, [("params", params), ("grads", grads), ("backup", backup)],
                                  written=("params", "backup"))
    if be is not None:
        be.module.perturb_(p, g, b, _scalar("perturb_", "scale", scale, dev), bool(adaptive), float(eta))


@torch.no_grad()
def restore_(params, backup, *, backend="auto"):
    """``params <- backup``, bit-exact."""
    be, (p, b), _ = _prepare("restore_", backend, [("params", params), ("backup", backup)], written=("params",))
    if be is not None:
        be.module.restore_(p, b)


@torch.no_grad()
def restore_accumulate_(params, backup, acc, grads, weight, *, backend="auto"):
    """``params <- backup; acc += weight * grads`` in one pass."""
    be, (p, b, a, g), dev = _prepare("restore_accumulate_", backend,
                                     [("params", params), ("backup", backup), ("acc", acc), ("grads", grads)],
                                     written=("params", "acc"))
    if be is not None:
        be.module.restore_accumulate_(p, b, a, g, _scalar("restore_accumulate_", "weight", weight, dev))


@torch.no_grad()
def gram(lists, *, backend="auto"):
    """K x K matrix ``G[a, b] = sum_i <lists[a][i], lists[b][i]>``, reading each list once."""
    lists = _tensor_list_of_lists("gram", lists)
    be, lists, _ = _prepare("gram", backend, [(f"lists[{k}]", l) for k, l in enumerate(lists)], allow_empty=False)
    return be.module.gram(lists)


@torch.no_grad()
def combine_(out, lists, weights, *, backend="auto"):
    """``out[i] = sum_k weights[k] * lists[k][i]``; ``out`` may be one of the input lists."""
    lists = _tensor_list_of_lists("combine_", lists)
    named = [("out", out)] + [(f"lists[{k}]", l) for k, l in enumerate(lists)]
    be, (o, *ls), dev = _prepare("combine_", backend, named, written=("out",), alias_ok=True)
    w = _weights("combine_", weights, len(lists), dev if dev is not None else torch.device("cpu"))
    if be is not None:
        be.module.combine_(o, ls, w)


def _tensor_list_of_lists(op, lists):
    if isinstance(lists, torch.Tensor):
        raise TypeError(f"{op}: `lists` must be a sequence of tensor lists, not a Tensor")
    try:
        lists = list(lists)
    except TypeError:
        raise TypeError(f"{op}: `lists` must be a sequence of tensor lists, got {type(lists).__name__}") from None
    if not lists:
        raise ValueError(f"{op}: `lists` is empty; give at least one tensor list")
    return lists
