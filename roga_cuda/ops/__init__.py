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
import itertools

import torch

from . import checks
from .registry import BACKENDS, Backend, _registry, _register_all, backends, resolve_backend

__all__ = [
    "norm", "perturb_", "restore_", "restore_accumulate_", "gram", "combine_", "sgd_", "adam_",
    "backends", "resolve_backend", "BACKENDS",
]

_register_all()
if "torch.distributed.tensor" in __import__("sys").modules:  # else on first use (its import costs seconds)
    from . import distributed as _distributed
    _distributed.register()


def _backend(backend, first):
    """The backend for lists whose first tensor is ``first`` (None: empty lists)."""
    be = resolve_backend(backend, first.device if first is not None else torch.device("cpu"))
    if not be.compiled and first is not None and type(first).__name__ == "DTensor":
        raise TypeError(f"roga_cuda.ops: DTensor inputs run through the compiled operators (backend 'auto', 'cpu' or "
                        f"'cuda': one collective per reduction), not backend {be.name!r}"
                        + ("" if backend != "auto" else " (what 'auto' chose: the compiled backend is unavailable)"))
    return be


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


# ------------------------------------------------------------------ fused base updates

def _update_inputs(op, params, grads, grad_weights, direct_weights, source, grad_out, found_inf):
    """Normalises what both updates share: K gradient lists and their weights (one row of
    2K with direct_weights), the optional lists, found_inf."""
    params = checks.tensor_list(op, "params", params)
    grads = checks.tensor_list(op, "grads", grads)
    nested = bool(grads) and not isinstance(grads[0], torch.Tensor) and isinstance(grads[0], (list, tuple))
    grads = checks.list_of_lists(op, grads if nested else [grads], len(params), "params", name="grads")
    if grad_weights is None:
        ws, wt = [1.0] * len(grads), None
    else:
        ws, wt = checks.weights(op, grad_weights, len(grads))
    if direct_weights is not None:
        ws, wt = _two_rows(ws, wt, *checks.weights(op, direct_weights, len(grads), "direct_weights"))
    source = None if source is None else checks.tensor_list(op, "source", source)
    grad_out = None if grad_out is None else checks.tensor_list(op, "grad_out", grad_out)
    if found_inf is not None and not isinstance(found_inf, torch.Tensor):
        raise TypeError(f"{op}: `found_inf` must be a tensor (GradScaler's) or None, got {type(found_inf).__name__}")
    return params, grads, ws, wt, source, grad_out


def _two_rows(ws, wt, ds, dt):
    """The kernels' single weights row: the combination's K weights, then the direct K."""
    if wt is None and dt is None:
        return ws + ds, None
    dev = (wt if wt is not None else dt).device
    rows = [r if r is not None else torch.tensor(v, dtype=torch.float64, device=dev) for v, r in ((ws, wt), (ds, dt))]
    dtype = torch.promote_types(rows[0].dtype, rows[1].dtype)
    return [], torch.cat([r.to(dev, dtype) for r in rows])


def sgd_(params, grads, *, lr, momentum_buffers=None, steps=None, momentum=0.0, dampening=0.0, nesterov=False,
         weight_decay=0.0, maximize=False, source=None, grad_weights=None, direct_weights=None, grad_out=None,
         found_inf=None, backend="auto"):
    """``torch.optim.SGD``'s update of ``params`` in one pass (per dtype, per launch).

    ``grads``: a list, or K lists combined as ``sum_k grad_weights[k] * grads[k]`` in the
    same pass (``grad_weights`` floats or a 1-d device tensor: AMP's unscaling, clipping and
    gradient surgery's coefficients fold in here). ``source``: read the parameters' values
    from this list instead (SAM: restore and update in one pass). ``grad_out``: also write
    the combined gradient there (e.g. into ``.grad``; it may be one of the ``grads`` lists:
    every list is read first). ``direct_weights`` (K floats or a
    1-d tensor): also ``params -= lr * sum_k direct_weights[k] * grads[k]`` after the update,
    outside momentum, weight decay and ``maximize`` (WSAM's decoupled term, in the same
    pass). With ``momentum``,
    ``momentum_buffers`` and ``steps`` (one-element float32 tensors: the buffer starts as the
    gradient when the count is 0; counts are incremented) are required. ``lr`` a float or a
    0-d device tensor. ``found_inf`` (GradScaler's): when nonzero the update is skipped and
    only ``source`` (if given) is copied into ``params``, so a folded restore still happens.
    """
    params, grads, ws, wt, source, grad_out = _update_inputs("sgd_", params, grads, grad_weights, direct_weights,
                                                             source, grad_out, found_inf)
    bufs = [] if momentum_buffers is None else checks.tensor_list("sgd_", "momentum_buffers", momentum_buffers)
    steps = [] if steps is None else checks.tensor_list("sgd_", "steps", steps)
    lr_v, lr_t = checks.scalar("sgd_", "lr", lr)
    be = _backend(backend, _first(params))
    hyper = (float(momentum), float(dampening), bool(nesterov), float(weight_decay), bool(maximize))
    if be.compiled:
        be.module.sgd_(params, source or [], _flat_grads(grads), ws, wt, grad_out or [], bufs, steps, lr_v, lr_t,
                       *hyper, found_inf)
        return
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("sgd_: Nesterov momentum requires a momentum and zero dampening")
    checks.validate("sgd_", params, source or [], _flat_grads(grads), len(ws), wt, grad_out or [], bufs, steps,
                    float(momentum), lr_t, found_inf)
    if params:
        with torch.no_grad():
            be.module.sgd_(params, source, grads, ws if wt is None else wt, grad_out, bufs, steps,
                           lr_v if lr_t is None else lr_t, *hyper, found_inf)


def adam_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
          decoupled=False, amsgrad=False, max_exp_avg_sqs=None, maximize=False, source=None, grad_weights=None,
          direct_weights=None, grad_out=None, found_inf=None, backend="auto"):
    """``torch.optim.Adam``'s update (``decoupled=True``: AdamW's) of ``params`` in one pass.

    ``exp_avgs``, ``exp_avg_sqs`` (and with ``amsgrad`` ``max_exp_avg_sqs``) are the
    optimizer's state; ``steps`` the per-parameter counts before this update (one-element
    float32 tensors; bias corrections use count + 1, then the counts are incremented).
    ``grads``, ``grad_weights``, ``direct_weights`` (outside the moments too), ``source``,
    ``grad_out``, ``lr`` and ``found_inf`` as in :func:`sgd_`.
    """
    params, grads, ws, wt, source, grad_out = _update_inputs("adam_", params, grads, grad_weights, direct_weights,
                                                             source, grad_out, found_inf)
    m = checks.tensor_list("adam_", "exp_avgs", exp_avgs)
    v = checks.tensor_list("adam_", "exp_avg_sqs", exp_avg_sqs)
    vmax = [] if max_exp_avg_sqs is None else checks.tensor_list("adam_", "max_exp_avg_sqs", max_exp_avg_sqs)
    steps = checks.tensor_list("adam_", "steps", steps)
    lr_v, lr_t = checks.scalar("adam_", "lr", lr)
    beta1, beta2 = (float(b) for b in betas)
    be = _backend(backend, _first(params))
    hyper = (beta1, beta2, float(eps), float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize))
    if be.compiled:
        be.module.adam_(params, source or [], _flat_grads(grads), ws, wt, grad_out or [], m, v, vmax, steps, lr_v,
                        lr_t, *hyper, found_inf)
        return
    checks.validate("adam_", params, source or [], _flat_grads(grads), len(ws), wt, grad_out or [], m, v, vmax, steps,
                    bool(amsgrad), lr_t, found_inf)
    if params:
        with torch.no_grad():
            be.module.adam_(params, source, grads, ws if wt is None else wt, grad_out, m, v, vmax, steps,
                            lr_v if lr_t is None else lr_t, *hyper, found_inf)


def _flat_grads(grads):
    return grads[0] if len(grads) == 1 else list(itertools.chain.from_iterable(grads))
