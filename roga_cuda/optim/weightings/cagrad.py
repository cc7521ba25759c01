"""CAGrad: the conflict-averse direction, solved exactly."""
import torch

from . import _qp, base
from .base import Weighting, finite, nan_unless, register, scaled, with_unit_diagonal

RESCALE = {0: lambda c: 1.0, 1: lambda c: 1.0 + c * c, 2: lambda c: 1.0 + c}


@register("cagrad")
class CAGradWeighting(Weighting):
    r"""CAGrad (Liu et al., NeurIPS 2021), Algorithm 1 with the reference code's rescaling.

    With ``g0 = sum_k b_k g_k`` (``b = 1/K``: the mean gradient) and ``c' = c |g0|``:

    .. math:: \max_d \min_i \langle g_i, d\rangle \ \text{s.t.}\ |d - g_0| \le c',
              \qquad d = g_0 + \frac{c'}{|g_w|}\, g_w,\quad
              w = \arg\min_{w \in \Delta} g_w^\top g_0 + c' |g_w|

    and the reference divides ``d`` by ``1 + c^2`` (``rescale=1``, its default), ``1 + c``
    (``rescale=2``) or nothing (``rescale=0``).

    Convention: returns sum-form coefficients, ``K`` times the reference's (whose ``d``
    is mean-like: K equal gradients ``g`` give ``g (1 + c) / rescale``). torchjd's
    ``CAGradWeighting`` returns ``1/K + (c'/|g_w|) w`` (mean form, no rescale): ours with
    ``rescale=0`` divided by K.

    Exact: on a support S the stationarity conditions are linear in ``u = (c'/|g_w|) w``
    and a multiplier, up to one quadratic, ``u' C u = c'^2``, in a scalar; every support is
    solved (K <= 10, no host sync on CUDA) or the support is found by bisection on the
    multiplier with an NNLS active set (host), and the candidate meeting the KKT conditions
    is returned (``info["kkt"]``). All on the scale-free cosine matrix, with no absolute
    epsilon; the only thresholds are relative: ``|g0|^2`` below its own rounding error
    (``4 K eps (sum_i |g_i| / K)^2``) counts as 0, and a scaled KKT violation above 1e-8 means
    "no stationary point" (found ones are at ~1e-16).
    When the optimum has ``g_w = 0`` (0 in the hull and no conflict-averse gain) the
    direction is not defined by the formula; the primal optimum closest to ``g0`` is
    returned: ``g0`` projected onto the dual cone ``{d : <g_i, d> >= 0}``, which lies in
    the ball. ``c = 0`` or ``g0 = 0`` gives ``d = g0``.

    Args:
        c: radius factor (>= 0; the paper uses 0.2..0.9).
        rescale: 0, 1 or 2 as above.
        solver: "auto", "enumerate" or "active_set" (see :mod:`._qp`).
    """

    def __init__(self, c=0.5, rescale=1, solver="auto"):
        super().__init__()
        if not (isinstance(c, (int, float)) and c >= 0 and c == c and c != float("inf")):
            raise ValueError(f"CAGradWeighting: c must be a finite number >= 0, got {c!r}")
        if rescale not in RESCALE:
            raise ValueError(f"CAGradWeighting: rescale must be 0, 1 or 2, got {rescale!r}")
        self.c, self.rescale = float(c), rescale
        self.solver = _qp.check_solver(solver, "CAGradWeighting")

    def _options(self):
        return {"c": self.c, "rescale": self.rescale, "solver": self.solver}

    def weights(self, G):
        k = G.shape[0]
        C, sigma, zero = scaled(G)
        live = ~zero
        sig = torch.where(live, sigma, torch.ones_like(sigma))
        beta = sigma  # g0 = (m / K) sum_i beta_i ghat_i with ghat_i the unit gradients
        # |g0|^2 from G carries a rounding error of about K eps (sum beta)^2: below that,
        # g0 = 0 to working precision and so is the radius (a relative test, no epsilon).
        g02 = beta @ C @ beta
        g02 = torch.where(g02 > 4 * k * torch.finfo(torch.float64).eps * beta.sum() ** 2, g02, torch.zeros_like(g02))
        c2 = self.c ** 2 * g02
        smin = torch.where(live, sigma, torch.full_like(sigma, float("inf"))).amin()
        a = torch.where(live, torch.where(live.any(), smin, 1.0) / sig, torch.zeros_like(sigma))
        u, viol = _qp.cagrad_qp(C, beta, a, c2, live, self.solver)
        # A zero gradient puts 0 in the hull: the optimum over the live tasks only stands if
        # its objective (proportional to u'C beta + c'^2) is negative; else g_w = 0.
        # A stationary point found to rounding has a violation ~1e-16; 1e-8 only separates
        # "found" from "none exists" (then the g_w = 0 case below).
        stands = (viol <= 1e-8) & ~(zero.any() & ((u @ C @ beta) + c2 >= 0))
        if not base.can_branch(G) or not bool(stands):  # on CPU, skip what cannot be used
            nu, cone_viol = _qp.box_qp(with_unit_diagonal(C, zero), beta.unsqueeze(0), self.solver)
            u_cone = nu[0] - beta
            use_cone = ~stands & ((u_cone @ C @ u_cone) <= c2 * (1 + 1e-12))
            u = torch.where(use_cone, u_cone, u)
            viol = torch.where(use_cone, cone_viol[0], viol)
        live_c = c2 > 0
        u = torch.where(live_c, u, torch.zeros_like(u))
        self.info = {"kkt": torch.where(live_c, viol, torch.zeros_like(viol))}
        w = 1.0 + torch.where(live, u / sig, torch.zeros_like(u))
        return nan_unless(finite(G), w / RESCALE[self.rescale](self.c))
