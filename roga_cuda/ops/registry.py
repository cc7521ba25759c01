"""The backend registry: which backends exist, which run here (and why not), and what
``backend="auto"`` means for a device."""
import os
import warnings
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "foreach", "cpu", "cuda", "triton")


@dataclass
class Backend:
    name: str
    module: object = None  # implements the primitives (see reference.py for the interface)
    available: bool = False
    reason: str = None  # why unavailable
    device_types: tuple = ()  # device types it runs on; () = any
    compiled: bool = False  # the C++/CUDA kernels of roga_cuda._C (they check their inputs themselves)
    extra: dict = field(default_factory=dict)


_registry = {}


def _register_all():
    from . import foreach, native, reference
    _registry["reference"] = Backend("reference", reference, True)
    _registry["foreach"] = Backend("foreach", foreach, True)
    for be in native.backends():
        _registry[be.name] = be
    try:
        from . import triton as triton_backend
        _registry["triton"] = triton_backend.backend()
    except ImportError as e:
        _registry["triton"] = Backend("triton", reason=f"roga_cuda.ops.triton failed to import ({e})")


def backends():
    """Availability of every backend: ``{name: {"available": bool, "reason": str|None, "devices": [...]}}``."""
    return {
        name: {"available": be.available, "reason": be.reason, "devices": list(be.device_types) or ["any"]}
        for name, be in ((n, _registry[n]) for n in BACKENDS)
    }


_warned = set()


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)


def _cuda_preference():
    # Measured (benchmarks/RESULTS.md, H100, 2026-11-22): the CUDA kernels beat the Triton
    # ones on every primitive and list through this API (RoGA cycle on ResNet-34: 0.47 vs
    # 2.34 ms; 400-tensor list: 0.63 vs 6.9 ms), mostly on host cost per call. Triton is the
    # fallback when the extension was built without CUDA. See docs/kernels.md "auto".
    return ("cuda", "triton")


def _auto(device_type):
    """The backend ``auto`` means for tensors of ``device_type``."""
    if device_type == "cpu":
        be = _registry["cpu"]
        if be.available:
            return be
        _warn_once("auto-cpu", f"roga_cuda: the compiled CPU backend is unavailable ({be.reason}); "
                               "backend='auto' falls back to 'foreach'.")
        return _registry["foreach"]
    if device_type == "cuda":
        for name in _cuda_preference():
            be = _registry[name]
            if be.available and (not be.device_types or "cuda" in be.device_types):
                return be
        _warn_once("auto-cuda", "roga_cuda: neither the compiled CUDA backend "
                                f"({_registry['cuda'].reason}) nor Triton ({_registry['triton'].reason}) "
                                "is available; backend='auto' falls back to 'foreach'.")
    return _registry["foreach"]


_resolved = {}  # (backend, env, device type) -> Backend: resolution is a few dict lookups per call


def resolve_backend(backend, device):
    """The :class:`Backend` that ``backend`` names for tensors on ``device``."""
    dtype_ = device.type if isinstance(device, torch.device) else torch.device(device).type
    env = os.environ.get("ROGA_BACKEND", "").strip() if backend == "auto" else ""
    key = (backend, env, dtype_)
    be = _resolved.get(key)
    if be is None:
        be = _resolve(backend, env, dtype_)
        if be.available:
            _resolved[key] = be
    return be


def _resolve(backend, env, device_type):
    source = "backend"
    if backend == "auto":
        if env and env != "auto":
            backend, source = env, "ROGA_BACKEND"
        else:
            return _auto(device_type)
    be = _registry.get(backend)
    if be is None:
        raise ValueError(f"unknown {source} {backend!r}; choose one of {('auto',) + BACKENDS}")
    if not be.available:
        raise RuntimeError(f"{source} {backend!r} is unavailable: {be.reason}")
    if be.device_types and device_type not in be.device_types:
        raise ValueError(f"{source} {backend!r} runs on {'/'.join(be.device_types)} tensors, "
                         f"but the tensors are on {device_type}")
    return be
