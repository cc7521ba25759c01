"""roga_cuda: fused multi-tensor kernels and optimizers for gradient-alignment training.

    import roga_cuda
    roga_cuda.backends()                 # which kernel backends run here, and why not
    roga_cuda.ops.norm(grads)            # the primitives (see roga_cuda.ops)
    roga_cuda.SAM / RoGA / PCGrad        # drop-in optimizers (see roga_cuda.optim)
    roga_cuda.GSAM / WSAM / FriendlySAM / LookSAM   # SAM variants
"""
__version__ = "0.1.0"

from . import ops
from .ops import backends
from .optim import GSAM, WSAM, FriendlySAM, GradientAggregator, LookSAM, PCGrad, RoGA, SAM, clip_grad_norm_, freeze_bn_stats

__all__ = ["ops", "backends", "SAM", "GSAM", "WSAM", "FriendlySAM", "LookSAM", "RoGA", "PCGrad", "GradientAggregator",
           "freeze_bn_stats", "clip_grad_norm_", "__version__"]
