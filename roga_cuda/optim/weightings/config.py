"""ConFIG: the direction with equal cosine to every gradient, with the projected length."""
import torch

from .base import Weighting, check_pref, default_rtol, eig_pinv, finite, nan_unless, pref, register, scaled

LENGTHS = ("projection", "min", "max", "harmonic", "arithmetic", "geometric")


@register("config")
class ConFIGWeighting(Weighting):
    r"""ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR 2025), Equation 2 / the reference ``ConFIG_update``.

    With unit gradients ``u_i = g_i / |g_i|`` (rows of U) and preference ``p`` (default
    ones): the direction ``v = U^+ p`` (so ``<u_i, v> = p_i`` when the gradients are
    independent), and the update ``d = (sum_i <g_i, v_hat>) v_hat`` with ``v_hat = v / |v|``.
    In Gram space ``U^+ p = U'C^+ p`` with C the cosine matrix, so the weights are
    ``w_k = (sigma' C nu / nu' C nu) nu_k / sigma_k`` with ``nu = C^+ p``.

    The reference's length models: ``"projection"`` (the default above) or, with every
    gradient first rescaled to one tracked norm ``t``, ``|d| = t sum_i <u_i, v_hat>`` with
    ``t`` the ``"min"``, ``"max"``, ``"harmonic"``, ``"arithmetic"`` or ``"geometric"`` mean
    of the norms, or the norm of task ``i`` for an int ``length=i`` (``TrackSpecific``).

    Convention: sum form as the paper, the reference and torchjd's ``ConFIG`` (K equal
    gradients give ``K g``). The reference's ``use_least_square`` option (lstsq instead of
    pinv) gives the same minimum-norm solution and is not needed; its two-gradient
    shortcut (``ConFIG_update_double``) is the same vector. Zero gradients get weight 0 (the
    reference's ``nan_to_num`` of their unit vector). Eigenvalues of C below ``rtol * max``
    count as zero (default: K float32 epsilons). One host sync on CUDA (eigh).

    Args:
        pref_vector: p (K non-negative numbers) or None for ones.
        length: the length model (see above).
        rtol: relative eigenvalue cutoff of the pseudo-inverse.
    """

    def __init__(self, pref_vector=None, length="projection", rtol=None):
        super().__init__()
        if rtol is not None and not 0 <= rtol < 1:
            raise ValueError(f"ConFIGWeighting: rtol must be in [0, 1), got {rtol!r}")
        if not (length in LENGTHS or (isinstance(length, int) and not isinstance(length, bool) and length >= 0)):
            raise ValueError(f"ConFIGWeighting: length must be one of {LENGTHS} or a task index, got {length!r}")
        self.pref_vector = check_pref(pref_vector, "ConFIGWeighting")
        self.length, self.rtol = length, rtol

    def _options(self):
        return {"pref_vector": self.pref_vector, "length": self.length, "rtol": self.rtol}

    def _tracked(self, sigma):
        """The tracked norm, in units of the largest gradient norm."""
        if isinstance(self.length, int):
            if self.length >= sigma.shape[0]:
                raise ValueError(f"ConFIGWeighting: length={self.length} is not a task index for K={sigma.shape[0]}")
            return sigma[self.length]
        k = sigma.shape[0]
        return {"min": lambda: sigma.amin(), "max": lambda: sigma.amax(), "arithmetic": lambda: sigma.mean(),
                "harmonic": lambda: k / (1.0 / sigma).sum(), "geometric": lambda: sigma.log().mean().exp()}[self.length]()

    def weights(self, G):
        k = G.shape[0]
        p = pref(self.pref_vector, k, 1.0, G.device, "ConFIGWeighting")
        C, sigma, zero = scaled(G)
        ok = finite(G)
        C = torch.where(ok, C, torch.eye(k, dtype=C.dtype, device=C.device))
        Cp, _ = eig_pinv(C, default_rtol(k) if self.rtol is None else self.rtol)
        nu = Cp @ p
        Cnu = C @ nu
        vv = nu @ Cnu                       # |v|^2 in units of the largest gradient
        if self.length == "projection":
            length = sigma @ Cnu            # sum_i <g_i, v> / max|g|
        else:
            length = self._tracked(sigma) * Cnu.sum()
        live = ~zero
        coef = torch.where(vv > 0, length / torch.where(vv > 0, vv, torch.ones_like(vv)), torch.zeros_like(vv))
        w = torch.where(live, coef * nu / torch.where(live, sigma, torch.ones_like(sigma)), torch.zeros_like(nu))
        return nan_unless(ok, w)
