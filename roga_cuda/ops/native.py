"""The compiled backends: ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda), one module ``roga_cuda._C``.

The C++ frontend validates its inputs itself (cheaply, in one loop), so the Python layer
only normalises scalars: a Python float travels as a double, a 0-d device tensor by
pointer (read on the device, no host synchronisation).
"""
import torch

from . import Backend

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


def _clear_type_errors(fn):
    """pybind11 reports a non-tensor list element as 'incompatible function arguments'; the
    fast path skips the Python checks, so re-run them here to name the culprit."""
    import functools
    import inspect

    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except TypeError as e:
            if "incompatible function arguments" not in str(e):
                raise
            from . import _tensor_list
            for name, a in zip(names, args):
                if name == "lists":
                    for k, l in enumerate(a):
                        _tensor_list(fn.__name__, f"lists[{k}]", l)
                elif isinstance(a, (list, tuple)):
                    _tensor_list(fn.__name__, name, a)
            raise

    return wrapper


def _split(s):
    return (0.0, s) if isinstance(s, torch.Tensor) else (float(s), None)


@_clear_type_errors
def norm(ts, per_tensor, params, eta):
    return _C.norm(ts, params, eta, per_tensor)


@_clear_type_errors
def perturb_(params, grads, backup, scale, adaptive, eta):
    _C.perturb_(params, grads, backup, *_split(scale), adaptive, eta)


@_clear_type_errors
def restore_(params, backup):
    _C.restore_(params, backup)


@_clear_type_errors
def restore_accumulate_(params, backup, acc, grads, weight):
    _C.restore_accumulate_(params, backup, acc, grads, *_split(weight))


@_clear_type_errors
def gram(lists):
    return _C.gram(lists)


@_clear_type_errors
def combine_(out, lists, weights):
    if isinstance(weights, torch.Tensor):
        _C.combine_(out, lists, [], weights)
    else:
        _C.combine_(out, lists, weights, None)


def backends():
    import sys
    mod = sys.modules[__name__]
    cpu = Backend("cpu", mod, _C is not None, _reason, ("cpu",), validates=True)
    if _C is None:
        cuda = Backend("cuda", mod, False, _reason, ("cuda",), validates=True)
    elif not _C.WITH_CUDA:
        cuda = Backend("cuda", mod, False, "roga_cuda was built without CUDA kernels "
                       f"(torch.version.cuda={torch.version.cuda}; see README 'CUDA build')", ("cuda",), True)
    elif not torch.cuda.is_available():
        cuda = Backend("cuda", mod, False, "no CUDA device is visible (torch.cuda.is_available() is False)",
                       ("cuda",), True)
    else:
        cuda = Backend("cuda", mod, True, None, ("cuda",), True)
    return [cpu, cuda]
