"""The compiled backends: ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda), i.e. the operators
``torch.ops.roga_cuda.*`` and their kernels in ``roga_cuda._C``.

Eager calls on plain tensors take the module's fast entry points (same checks and kernels,
without the dispatcher's per-tensor boxing); they hand back anything that needs the
dispatcher: tensor subclasses (FakeTensor, DTensor, ...), functional tensors, meta tensors,
an active TorchDispatchMode. Under torch.compile the registered operators are called
directly, so Dynamo records them in the graph.
"""
import functools
import itertools

import torch

from .registry import Backend

_C = None
_reason = None
try:
    from .. import _C
except Exception as e:  # ImportError, or an undefined symbol from a torch ABI mismatch
    import importlib.util
    try:
        built = importlib.util.find_spec("roga_cuda._C") is not None
    except (ImportError, ValueError):
        built = False
    if not built:
        _reason = ("the compiled module roga_cuda._C is not built; build it with "
                   "`pip install --no-build-isolation -e .` against the installed torch")
    else:
        _reason = (f"the compiled module roga_cuda._C failed to import ({type(e).__name__}: {e}); "
                   "rebuild with `pip install --no-build-isolation -e .` against the installed torch")
else:
    if _C.TORCH_VERSION.split("+")[0] != torch.__version__.split("+")[0]:
        _reason = (f"roga_cuda._C was built against torch {_C.TORCH_VERSION} but torch {torch.__version__} "
                   "is running; rebuild with `pip install --no-build-isolation -e .`")
        _C = None

_ops = torch.ops.roga_cuda if _C is not None else None
_compiling = torch.compiler.is_compiling


def _fast(name):
    """The fast entry ``name`` of roga_cuda._C. pybind11 reports a non-tensor list element as
    'incompatible function arguments': name the culprit instead."""
    fn = getattr(_C, name) if _C is not None else None

    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except TypeError as e:
            if "incompatible function arguments" not in str(e):
                raise
            from . import checks
            checks._name_non_tensors(name, args)
            raise
    return call


_f = {n: _fast(n) for n in ("norm", "perturb_", "restore_", "restore_accumulate_", "gram", "combine_", "sgd_",
                             "adam_")} if _C is not None else {}


def _flat(lists):
    return list(itertools.chain.from_iterable(lists))


def _dispatch(op, name, first, inplace=True):
    """Before a call goes through the dispatcher. DTensors: make sure the operators know
    them (distributed.py). torch.func.functionalize's C++ functional tensors cannot run
    list-mutating custom operators (torch.compile and export functionalise them fine, in
    Python): say so instead of torch's message about alias annotations."""
    if first is None or _compiling():
        return
    if type(first).__name__ == "DTensor":
        from . import distributed
        distributed.register()
    elif inplace and type(first) is torch.Tensor and torch._is_functional_tensor(first):
        raise TypeError(f"{op}: {name}[0] is a functional tensor of torch.func.functionalize, which cannot run "
                        "in-place operators on tensor lists; call roga_cuda ops outside functionalize (they work "
                        "under torch.compile and torch.export)")


def norm(ts, per_tensor, params, eta):
    if not _compiling():
        r = _f["norm"](ts, params, eta, per_tensor)
        if r is not None:
            return (r[0], r[1]) if per_tensor else (r[0], None)
    _dispatch("norm", "ts", ts[0] if ts else None, inplace=False)
    if params is None:
        total, per = _ops.norm(ts, per_tensor)
    else:
        total, per = _ops.asam_norm(ts, params, eta, per_tensor)
    return total, (per if per_tensor else None)


def perturb_(params, grads, backup, scale, scale_t, adaptive, eta):
    if not _compiling() and _f["perturb_"](params, grads, backup, scale, scale_t, adaptive, eta):
        return
    _dispatch("perturb_", "params", params[0] if params else None)
    if adaptive:
        _ops.asam_perturb_(params, grads, backup, scale, scale_t, eta)
    else:
        _ops.perturb_(params, grads, backup, scale, scale_t)


def restore_(params, backup):
    if not _compiling() and _f["restore_"](params, backup):
        return
    _dispatch("restore_", "params", params[0] if params else None)
    _ops.restore_(params, backup)


def restore_accumulate_(params, backup, acc, grads, weight, weight_t):
    if not _compiling() and _f["restore_accumulate_"](params, backup, acc, grads, weight, weight_t):
        return
    _dispatch("restore_accumulate_", "params", params[0] if params else None)
    _ops.restore_accumulate_(params, backup, acc, grads, weight, weight_t)


def gram(lists):
    if not _compiling():
        g = _f["gram"](lists)
        if g is not None:
            return g
    _dispatch("gram", "lists", lists[0][0] if lists[0] else None, inplace=False)
    return _ops.gram(_flat(lists), len(lists))


def combine_(out, lists, weights, weights_t):
    if not _compiling() and _f["combine_"](out, lists, weights, weights_t):
        return
    _dispatch("combine_", "out", out[0] if out else None)
    _ops.combine_(out, _flat(lists), weights, weights_t)


def sgd_(params, source, grads, weights, weights_t, grad_out, momentum_buffers, steps, lr, lr_t, momentum, dampening,
         nesterov, weight_decay, maximize, found_inf):
    args = (params, source, grads, weights, weights_t, grad_out, momentum_buffers, steps, lr, lr_t, momentum,
            dampening, nesterov, weight_decay, maximize, found_inf)
    if not _compiling() and _f["sgd_"](*args):
        return
    _dispatch("sgd_", "params", params[0] if params else None)
    _ops.sgd_(*args)


def adam_(params, source, grads, weights, weights_t, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_t,
          beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, found_inf):
    args = (params, source, grads, weights, weights_t, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
            lr_t, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, found_inf)
    if not _compiling() and _f["adam_"](*args):
        return
    _dispatch("adam_", "params", params[0] if params else None)
    _ops.adam_(*args)


def backends():
    import sys
    mod = sys.modules[__name__]
    cpu = Backend("cpu", mod, _C is not None, _reason, ("cpu",), compiled=True)
    if _C is None:
        cuda = Backend("cuda", mod, False, _reason, ("cuda",), compiled=True)
    elif not _C.WITH_CUDA:
        cuda = Backend("cuda", mod, False, "roga_cuda was built without CUDA kernels "
                       f"(torch.version.cuda={torch.version.cuda}; see README 'CUDA build')", ("cuda",), True)
    elif not torch.cuda.is_available():
        cuda = Backend("cuda", mod, False, "no CUDA device is visible (torch.cuda.is_available() is False)",
                       ("cuda",), True)
    else:
        cuda = Backend("cuda", mod, True, None, ("cuda",), True)
    return [cpu, cuda]
