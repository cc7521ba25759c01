"""Drop-in optimizers built on the fused primitives of :mod:`roga_cuda.ops`.

* :class:`SAM` — SAM and ASAM (``adaptive=True``), davda54/sam's API; ``interval=k``.
* :class:`GSAM`, :class:`WSAM`, :class:`FriendlySAM`, :class:`LookSAM` — SAM variants
  (surrogate gap, weighted sharpness, noise-only ascent, reused ascent gradient).
* :class:`RoGA` — robust gradient alignment over K domains (first-order or exact HVP alignment).
* :class:`GradientAggregator` — K task gradients aggregated in Gram space by a weighting
  (:mod:`.weightings`: PCGrad, GradVac, CAGrad, MGDA, UPGrad, DualProj, IMTL-G, Aligned-MTL,
  Nash-MTL, random, ConFIG, sum, or your own); :class:`PCGrad` is the same with
  ``method="pcgrad"`` by default.

Helpers: :func:`freeze_bn_stats` (BatchNorm statistics untouched on a perturbed pass) and
:func:`clip_grad_norm_` (fused global-norm clipping).
"""
from . import weightings
from ._utils import clip_grad_norm_, freeze_bn_stats
from .aggregator import METHODS, GradientAggregator, PCGrad
from .base import WrapperOptimizer
from .roga import RoGA
from .sam import SAM
from .sam_family import GSAM, WSAM, FriendlySAM, LookSAM

__all__ = ["SAM", "GSAM", "WSAM", "FriendlySAM", "LookSAM", "RoGA", "GradientAggregator", "PCGrad", "weightings",
           "freeze_bn_stats", "clip_grad_norm_", "WrapperOptimizer", "METHODS"]
