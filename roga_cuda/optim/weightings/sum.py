"""The plain sum: no alignment."""
import torch

from .base import Weighting, finite, nan_unless, register


@register("sum")
class SumWeighting(Weighting):
    """``w = 1``: the update is ``sum_k g_k`` (torchjd's ``SumWeighting``; its ``Mean`` is ``1/K``)."""

    def weights(self, G):
        return nan_unless(finite(G), torch.ones(G.shape[0], dtype=torch.float64, device=G.device))
