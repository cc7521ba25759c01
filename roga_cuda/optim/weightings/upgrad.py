"""UPGrad: every gradient projected onto the dual cone of all of them, then combined."""
import torch

from . import _qp
from .base import Weighting, check_pref, finite, nan_unless, pref, register, scaled, with_unit_diagonal


@register("upgrad")
class UPGradWeighting(Weighting):
    r"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

    Each ``g_i`` is projected onto the dual cone ``{x : <g_j, x> >= 0 for all j}``; by the
    paper's Proposition 1 the projection of ``J' u`` is ``J' v`` with

    .. math:: v(u) = \arg\min_{v \ge u} v^\top G v,
              \qquad w = \sum_i p_i\, v(e_i)

    so the update ``sum_k w_k g_k`` never conflicts with any task.

    Convention: ``pref_vector`` ``p`` defaults to ones (sum form). The paper and torchjd's
    ``UPGradWeighting`` default to ``p = 1/K``: theirs is ours / K. torchjd also
    normalises G by its trace with an absolute 1e-4 floor and adds 1e-4 to the diagonal
    before quadprog; here the QP is solved exactly.

    Exact: with ``nu = diag(sigma) v / sigma_i`` each of the K problems reads ``min nu' C nu``
    s.t. ``nu >= e_i`` on the cosine matrix, independent of the gradient norms; its KKT
    conditions (``C nu >= 0``, zero where ``nu > e_i``) are met to rounding by support
    enumeration (K <= 10, no host sync on CUDA) or Lawson-Hanson (host); ``info["kkt"]`` is
    the worst scaled violation. Zero gradients add no constraint and get weight ``p_i``.

    Args:
        pref_vector: p (K non-negative numbers) or None for ones.
        solver: "auto", "enumerate" or "active_set".
    """

    def __init__(self, pref_vector=None, solver="auto"):
        super().__init__()
        self.pref_vector = check_pref(pref_vector, "UPGradWeighting")
        self.solver = _qp.check_solver(solver, "UPGradWeighting")

    def _options(self):
        return {"pref_vector": self.pref_vector, "solver": self.solver}

    def projections(self, G):
        """(K, K): row i holds the weights v(e_i) of the projection of g_i onto the dual cone
        (``G`` as for ``__call__``); the weighting is ``p @ projections(G)``."""
        from .base import as_gram
        return self._projections(as_gram(G, who="UPGradWeighting"))

    def _projections(self, G):
        k = G.shape[0]
        C, sigma, zero = scaled(G)
        eye = torch.eye(k, dtype=G.dtype, device=G.device)
        N, viol = _qp.box_qp(with_unit_diagonal(C, zero), eye, self.solver)  # row i: nu for e_i
        live = ~zero
        sig = torch.where(live, sigma, torch.ones_like(sigma))
        ratio = torch.where(live.unsqueeze(0) & live.unsqueeze(1), sig.unsqueeze(1) / sig.unsqueeze(0), torch.zeros_like(C))
        ratio = torch.where(eye.bool(), torch.ones_like(ratio), ratio)   # v_k = nu_k sigma_i / sigma_k
        self.info = {"kkt": viol.amax()}
        return nan_unless(finite(G), N * ratio)

    def weights(self, G):
        p = pref(self.pref_vector, G.shape[0], 1.0, G.device, "UPGradWeighting")
        return p @ self._projections(G)
