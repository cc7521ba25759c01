"""IMTL-G: the update with equal projections on every task's unit gradient."""
import torch

from .base import Weighting, default_rtol, eig_pinv, finite, nan_unless, register, scaled


@register("imtl_g", "imtlg")
class IMTLGWeighting(Weighting):
    r"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

    The weights ``alpha`` (summing to 1) such that the update ``d = sum_k alpha_k g_k`` has
    the same projection on every unit gradient, ``<d, g_i / |g_i|> = const``: for linearly
    independent gradients ``alpha`` is proportional to ``G^{-1} (|g_1|, ..., |g_K|)``
    (the paper's closed form ``alpha_{2:K} = g_1 U'(D U')^{-1}`` is the same vector).
    Linearly dependent gradients (torchjd's generalisation, from Quinton & Rey 2024) use the
    pseudo-inverse, here of the cosine matrix: ``alpha_k`` proportional to
    ``(C^+ 1)_k / |g_k|``, the same direction as torchjd's ``G^+ |g|`` whenever ``1`` is in the
    range of C, and insensitive to the spread of the gradient norms. When ``1`` has no
    component in that range (e.g. two opposite gradients) or the weights sum to 0 there is
    no such direction, and the weights are 0.

    Convention: returns ``K alpha`` (sum form); the paper and torchjd return ``alpha``.
    Eigenvalues of C below ``rtol * max`` count as zero (default: K float32 epsilons).
    Uses ``torch.linalg.eigh``: one host sync on CUDA.
    """

    def __init__(self, rtol=None):
        super().__init__()
        if rtol is not None and not 0 <= rtol < 1:
            raise ValueError(f"IMTLGWeighting: rtol must be in [0, 1), got {rtol!r}")
        self.rtol = rtol

    def _options(self):
        return {"rtol": self.rtol}

    def weights(self, G):
        k = G.shape[0]
        C, sigma, zero = scaled(G)
        ok = finite(G)
        C = torch.where(ok, C, torch.eye(k, dtype=C.dtype, device=C.device))  # eigh must not see NaN
        rtol = default_rtol(k) if self.rtol is None else self.rtol
        Cp, P = eig_pinv(C, rtol)
        ones = torch.ones(k, dtype=C.dtype, device=C.device)
        nu = Cp @ ones
        live = ~zero
        alpha = torch.where(live, nu / torch.where(live, sigma, ones), torch.zeros_like(nu))
        s = alpha.sum()
        reach = (P @ ones).square().sum() > rtol * k      # 1 has a component in range(C)
        good = reach & (s.abs() > rtol * alpha.abs().sum())
        out = torch.where(good, k * alpha / torch.where(good, s, ones[0]), torch.zeros_like(alpha))
        return nan_unless(ok, out)
