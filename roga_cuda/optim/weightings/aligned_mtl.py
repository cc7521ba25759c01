"""Aligned-MTL: align the gradients' principal components to a stable, equal scale."""
import torch

from .base import Weighting, check_pref, default_rtol, finite, nan_unless, pref, register

SCALES = ("min", "median", "rmse")


@register("aligned_mtl", "alignedmtl")
class AlignedMTLWeighting(Weighting):
    r"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023), Algorithm 1.

    With ``G = V Lambda V'`` (rank r: eigenvalues above ``rtol * max``), the balance matrix
    ``B = sqrt(lambda_R) V_r Lambda_r^{-1/2} V_r'`` makes the aligned gradients ``J' B``
    orthogonal with equal norms ``sqrt(lambda_R)`` (the condition number of the system
    becomes 1); the update is ``J' B p``: ``w = B p``. ``lambda_R`` is the smallest kept
    eigenvalue (``"min"``, the paper), their median (``"median"``) or mean (``"rmse"``).
    G of rank 0 (all gradients zero) gives ``w = p``.

    Convention: ``p`` defaults to ones: the reference implementation (SamsungLabs/MTL) sums
    the aligned gradients; torchjd's ``AlignedMTLWeighting`` defaults to ``p = 1/K`` (ours / K).
    ``rtol`` defaults to K float32 epsilons as in the reference (torchjd: K epsilons of G's
    dtype). Invariant to a global rescaling of G. One host sync on CUDA (eigh).

    Args:
        pref_vector: p (K non-negative numbers) or None for ones.
        scale_mode: "min", "median" or "rmse".
        rtol: relative eigenvalue cutoff for the rank.
    """

    def __init__(self, pref_vector=None, scale_mode="min", rtol=None):
        super().__init__()
        if scale_mode not in SCALES:
            raise ValueError(f"AlignedMTLWeighting: scale_mode must be one of {SCALES}, got {scale_mode!r}")
        if rtol is not None and not 0 <= rtol < 1:
            raise ValueError(f"AlignedMTLWeighting: rtol must be in [0, 1), got {rtol!r}")
        self.pref_vector = check_pref(pref_vector, "AlignedMTLWeighting")
        self.scale_mode, self.rtol = scale_mode, rtol

    def _options(self):
        return {"pref_vector": self.pref_vector, "scale_mode": self.scale_mode, "rtol": self.rtol}

    def weights(self, G):
        k = G.shape[0]
        p = pref(self.pref_vector, k, 1.0, G.device, "AlignedMTLWeighting")
        ok = finite(G)
        tr = G.diagonal().sum()
        Gn = torch.where(ok & (tr > 0), G / torch.where(tr > 0, tr, torch.ones_like(tr)), torch.eye(k, dtype=G.dtype, device=G.device))
        lam, V = torch.linalg.eigh(Gn)                   # ascending
        keep = lam > (default_rtol(k) if self.rtol is None else self.rtol) * lam[-1]
        r = keep.sum()
        safe = torch.where(keep, lam, torch.ones_like(lam))
        if self.scale_mode == "min":
            scale = torch.where(keep, lam, torch.full_like(lam, float("inf"))).amin()
        elif self.scale_mode == "rmse":
            scale = torch.where(keep, lam, torch.zeros_like(lam)).sum() / r.clamp_min(1)
        else:  # lower median of the kept eigenvalues (torch.median's convention), kept = the top r
            scale = lam.gather(0, (k - r + (r - 1) // 2).clamp(0, k - 1).unsqueeze(0))[0]
        inv = torch.where(keep, safe.rsqrt(), torch.zeros_like(lam))
        B = scale.clamp_min(0).sqrt() * (V * inv) @ V.T
        w = torch.where((r > 0) & (tr > 0), B @ p, p)
        return nan_unless(ok, w)
