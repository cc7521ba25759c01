"""DualProj: the preference-weighted gradient projected onto the dual cone."""
import torch

from . import _qp
from .base import Weighting, check_pref, finite, nan_unless, pref, register, scaled, with_unit_diagonal


@register("dualproj")
class DualProjWeighting(Weighting):
    r"""DualProj: the projection of ``sum_i p_i g_i`` onto the dual cone
    ``{x : <g_j, x> >= 0 for all j}`` (GEM's Equation 11, Lopez-Paz & Ranzato 2017, as
    formulated by Quinton & Rey 2024):

    .. math:: w = \arg\min_{v \ge p} v^\top G v

    Convention: ``p`` defaults to ones (sum form: the projected *sum*); torchjd's
    ``DualProjWeighting`` defaults to ``1/K`` (the projected mean), i.e. ours / K, and
    regularises G as UPGrad does. The projection is positively homogeneous, so only the
    scale differs.

    Exact: solved as ``min nu' C nu`` s.t. ``nu >= sigma * p / max(sigma * p)`` on the cosine
    matrix (support enumeration for K <= 10 without host sync on CUDA, else Lawson-Hanson
    on the host); ``info["kkt"]`` is the scaled KKT violation. Zero gradients get ``p_i``.

    Args:
        pref_vector: p (K non-negative numbers) or None for ones.
        solver: "auto", "enumerate" or "active_set".
    """

    def __init__(self, pref_vector=None, solver="auto"):
        super().__init__()
        self.pref_vector = check_pref(pref_vector, "DualProjWeighting")
        self.solver = _qp.check_solver(solver, "DualProjWeighting")

    def _options(self):
        return {"pref_vector": self.pref_vector, "solver": self.solver}

    def weights(self, G):
        k = G.shape[0]
        p = pref(self.pref_vector, k, 1.0, G.device, "DualProjWeighting")
        C, sigma, zero = scaled(G)
        sp = sigma * p
        rho = sp.amax()
        rho = torch.where(rho > 0, rho, torch.ones_like(rho))
        nu, viol = _qp.box_qp(with_unit_diagonal(C, zero), (sp / rho).unsqueeze(0), self.solver)
        live = ~zero
        sig = torch.where(live, sigma, torch.ones_like(sigma))
        self.info = {"kkt": viol[0]}
        return nan_unless(finite(G), torch.where(live, nu[0] * rho / sig, p))
