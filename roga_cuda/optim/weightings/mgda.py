"""MGDA: the min-norm point of the convex hull of the task gradients."""
import torch

from . import _qp
from .base import Weighting, finite, nan_unless, register, scaled


@register("mgda")
class MGDAWeighting(Weighting):
    r"""MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018).

    .. math:: w^\star = \arg\min_{w \ge 0,\ \sum_k w_k = 1} w^\top G w, \qquad
              d = \sum_k w^\star_k g_k

    ``d`` is the min-norm point of conv{g_1..g_K}: it decreases every task (``<g_i, d> >=
    |d|^2``) and is 0 exactly at a Pareto-stationary point.

    Convention: returns ``K w*`` (sum form: K equal gradients give ``K g``). The paper and
    torchjd's ``MGDAWeighting`` return ``w*`` itself (summing to 1); torchjd and the paper's
    Algorithm 2 use Frank-Wolfe iterations, this solves the QP exactly.

    Exact: with ``G = m^2 S C S`` (``S = diag(sigma)``, see :func:`base.scaled`) and
    ``omega = S w``, the problem is ``min omega' C omega`` s.t. ``omega >= 0``,
    ``a' omega = 1`` with ``a_i`` proportional to ``1 / sigma_i``; its KKT conditions
    (``(C omega)_i >= mu a_i``, equality where ``omega_i > 0``) are met to rounding by
    support enumeration (K <= 10, no host sync on CUDA) or the NNLS active set (host).
    ``info["kkt"]``: the scaled KKT violation. A zero gradient is itself the min-norm
    point: the weights are then spread over the zero-gradient tasks (``d = 0``).

    Args:
        solver: "auto" (enumerate for K <= 10, else active set), "enumerate", "active_set".
    """

    def __init__(self, solver="auto"):
        super().__init__()
        self.solver = _qp.check_solver(solver, "MGDAWeighting")

    def _options(self):
        return {"solver": self.solver}

    def weights(self, G):
        k = G.shape[0]
        C, sigma, zero = scaled(G)
        live = ~zero
        one = torch.ones_like(sigma)
        sig = torch.where(live, sigma, one)
        smin = torch.where(live, sigma, torch.full_like(sigma, float("inf"))).amin()
        a = torch.where(live, torch.where(live.any(), smin, 1.0) / sig, torch.zeros_like(sigma))
        omega, viol = _qp.simplex_qp(C, a, self.solver)
        w = omega / sig
        w = w / w.sum()
        has_zero = zero.any()
        w = torch.where(has_zero, zero.double() / zero.sum().clamp_min(1), w)
        self.info = {"kkt": torch.where(has_zero, torch.zeros_like(viol), viol)}
        return nan_unless(finite(G), k * w)
