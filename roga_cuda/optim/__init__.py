"""Drop-in optimizers built on the fused primitives of :mod:`roga_cuda.ops`.

* :class:`SAM` — SAM and ASAM (``adaptive=True``), davda54/sam's API; ``interval=k``.
* :class:`GSAM`, :class:`WSAM`, :class:`FriendlySAM`, :class:`LookSAM` — SAM variants
  (surrogate gap, weighted sharpness, noise-only ascent, reused ascent gradient).
* :class:`RoGA` — robust gradient alignment over K domains (first-order or exact HVP alignment).
* :class:`PCGrad` — gradient surgery in Gram space: PCGrad, GradVac, CAGrad, MGDA, plain sum.

Helpers: :func:`freeze_bn_stats` (BatchNorm statistics untouched on a perturbed pass) and
:func:`clip_grad_norm_` (fused global-norm clipping).
"""
from ._utils import clip_grad_norm_, freeze_bn_stats
from .base import WrapperOptimizer
from .roga import RoGA
from .sam import SAM
from .sam_family import GSAM, WSAM, FriendlySAM, LookSAM
from .surgery import METHODS, PCGrad, cagrad_weights, gradvac_weights, mgda_weights, pcgrad_weights

__all__ = ["SAM", "GSAM", "WSAM", "FriendlySAM", "LookSAM", "RoGA", "PCGrad", "freeze_bn_stats", "clip_grad_norm_", "WrapperOptimizer", "METHODS",
           "pcgrad_weights", "gradvac_weights", "cagrad_weights", "mgda_weights"]
