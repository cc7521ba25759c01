"""Fused multi-tensor primitives behind one API, with a choice of backend.

Every function takes lists of tensors on one device (mixed shapes and float dtypes,
0-element and 0-d tensors allowed) and a ``backend``:

=============  ===============================================================
``reference``  per-tensor Python loop; the executable specification
``foreach``    ``torch._foreach_*`` composition; the baseline and the fallback
``cpu``        C++ multi-tensor kernels (``torch.ops.roga_cuda``), CPU tensors
``cuda``       CUDA multi-tensor kernels (``torch.ops.roga_cuda``), CUDA tensors
``triton``     Triton multi-tensor kernels; CUDA tensors (CPU under TRITON_INTERPRET=1)
``auto``       the fastest available for the device; ``ROGA_BACKEND`` overrides it
=============  ===============================================================

Scalars (``scale``, ``weight``, ``weights``) may be Python floats or 0-d tensors on the
lists' device (read on the device: no host synchronisation). Reductions accumulate in
float32 or wider and return float32 (float64 when an input is float64).

The compiled backends are the operators ``torch.ops.roga_cuda.*``, so these functions work
under ``torch.compile(fullgraph=True)``, ``torch.export`` and FakeTensor tracing, and tensor
subclasses reach the dispatcher rather than raw pointers. The layout of this package:
``registry`` (backends, ``auto``), ``checks`` (input checks), one module per backend.
"""
import torch

from . import checks
from .registry import BACKENDS, Backend, _registry, _register_all, backends, resolve_backend

__all__ = [
    "norm", "perturb_", "restore_", "restore_accumulate_", "gram", "combine_",
    "backends", "resolve_backend", "BACKENDS",
]

_register_all()
if "torch.distributed.tensor" in __import__("sys").modules:  # else on first use (its import costs seconds)
    from . import distributed as _distributed
    _distributed.register()


def _backend(backend, first):
    """The backend for lists whose first tensor is ``first`` (None: empty lists)."""
    return resolve_backend(backend, first.device if first is not None else torch.device("cpu"))


def _first(lst):
    return lst[0] if lst and isinstance(lst[0], torch.Tensor) else None


def norm(ts, per_tensor=False, *, params=None, eta=0.0, backend="auto"):
    """Global L2 norm ``sqrt(sum_i ||ts[i]||^2)`` as a 0-d tensor on the lists' device.

    ``per_tensor=True`` returns ``(total, per_tensor_norms)``. With ``params`` it is the
    ASAM norm ``|| (|params| + eta) * ts ||``. Non-finite values propagate.
    """
    ts = checks.tensor_list("norm", "ts", ts)
    if params is not None:
        params = checks.tensor_list("norm", "params", params)
    be = _backend(backend, _first(ts))
    eta = float(eta)
    if not be.compiled:
        checks.validate("norm", ts, params)
        with torch.no_grad():
            total, per = be.module.norm(ts, bool(per_tensor), params, eta)
    else:
        total, per = be.module.norm(ts, bool(per_tensor), params, eta)
    return (total, per) if per_tensor else total


def perturb_(params, grads, backup, scale, *, adaptive=False, eta=0.0, backend="auto"):
    """``backup <- params; params += scale * grads`` in one pass.

    ``adaptive=True`` (ASAM) perturbs by ``scale * (|params| + eta)^2 * grads``.
    """
    params = checks.tensor_list("perturb_", "params", params)
    grads = checks.tensor_list("perturb_", "grads", grads)
    backup = checks.tensor_list("perturb_", "backup", backup)
    s, st = checks.scalar("perturb_", "scale", scale)
    be = _backend(backend, _first(params))
    if be.compiled:
        be.module.perturb_(params, grads, backup, s, st, bool(adaptive), float(eta))
        return
    checks.validate("perturb_", params, grads, backup, st)
    if params:
        with torch.no_grad():
            be.module.perturb_(params, grads, backup, s if st is None else st, bool(adaptive), float(eta))


def restore_(params, backup, *, backend="auto"):
    """``params <- backup``, bit-exact."""
    params = checks.tensor_list("restore_", "params", params)
    backup = checks.tensor_list("restore_", "backup", backup)
    be = _backend(backend, _first(params))
    if be.compiled:
        be.module.restore_(params, backup)
        return
    checks.validate("restore_", params, backup)
    if params:
        with torch.no_grad():
            be.module.restore_(params, backup)


def restore_accumulate_(params, backup, acc, grads, weight, *, backend="auto"):
    """``params <- backup; acc += weight * grads`` in one pass."""
    op = "restore_accumulate_"
    params, backup = checks.tensor_list(op, "params", params), checks.tensor_list(op, "backup", backup)
    acc, grads = checks.tensor_list(op, "acc", acc), checks.tensor_list(op, "grads", grads)
    w, wt = checks.scalar(op, "weight", weight)
    be = _backend(backend, _first(params))
    if be.compiled:
        be.module.restore_accumulate_(params, backup, acc, grads, w, wt)
        return
    checks.validate(op, params, backup, acc, grads, wt)
    if params:
        with torch.no_grad():
            be.module.restore_accumulate_(params, backup, acc, grads, w if wt is None else wt)


def gram(lists, *, backend="auto"):
    """K x K matrix ``G[a, b] = sum_i <lists[a][i], lists[b][i]>``, reading each list once."""
    lists = checks.list_of_lists("gram", lists)
    be = _backend(backend, _first(lists[0]))
    if be.compiled:
        return be.module.gram(lists)
    checks.validate("gram", lists)
    with torch.no_grad():
        return be.module.gram(lists)


def combine_(out, lists, weights, *, backend="auto"):
    """``out[i] = sum_k weights[k] * lists[k][i]``; ``out`` may be one of the input lists."""
    out = checks.tensor_list("combine_", "out", out)
    lists = checks.list_of_lists("combine_", lists, len(out), "out")
    ws, wt = checks.weights("combine_", weights, len(lists))
    be = _backend(backend, _first(out))
    if be.compiled:
        be.module.combine_(out, lists, ws, wt)
        return
    checks.validate("combine_", out, lists, len(ws), wt)
    if out:
        with torch.no_grad():
            be.module.combine_(out, lists, ws if wt is None else wt)
