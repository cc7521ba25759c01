"""Nash-MTL: the Nash bargaining solution alpha_i (G alpha)_i = 1, solved by Newton."""
import math

import torch

from . import base
from .base import Weighting, finite, nan_unless, register, scaled, with_unit_diagonal


def nash_newton(C, iters, early_exit):
    """gamma > 0 with gamma_i (C gamma)_i = 1: the minimiser of the strictly convex,
    self-concordant phi(gamma) = gamma'C gamma / 2 - sum log gamma_i, by damped Newton
    (step 1/(1 + decrement): stays in the domain, converges globally, quadratically near
    the solution). Starts at the best multiple of ones (exact for orthogonal or identical
    gradients). Returns (gamma, residual max_i |gamma_i (C gamma)_i - 1|)."""
    k = C.shape[0]
    ones = torch.ones(k, dtype=C.dtype, device=C.device)
    s = ones @ C @ ones
    gamma = ones * torch.where(s > 0, (k / torch.where(s > 0, s, ones[0])).sqrt(), ones[0])
    for _ in range(iters):
        grad = C @ gamma - 1.0 / gamma
        H = C + torch.diag(gamma.pow(-2))
        step, _ = torch.linalg.solve_ex(H, -grad)
        dec = (-(grad @ step)).clamp_min(0).sqrt()
        gamma = gamma + step / (1.0 + dec)
        if early_exit and not bool(dec > 1e-13):
            break
    return gamma, (gamma * (C @ gamma) - 1.0).abs().amax()


@register("nash_mtl", "nash")
class NashMTLWeighting(Weighting):
    r"""Nash-MTL (Navon et al., ICML 2022), Algorithm 1.

    The bargaining solution: :math:`\alpha > 0` with :math:`\alpha_i (G\alpha)_i = 1` for
    every task, i.e. ``<g_i, d> = 1 / alpha_i`` for the update ``d = sum_k alpha_k g_k``
    (then ``|d|^2 = K``). Like the reference, ``|d|`` is then clipped to ``max_norm``
    (the reference clips the shared gradients; here the same factor goes into the
    weights), and the weights are recomputed every ``update_weights_every`` calls only
    (the reference reuses its last ``alpha``).

    Convention: ``alpha`` is the paper's and the reference's (already sum form; torchjd's
    ``NashMTL`` returns the same). The reference solves a sequence of convex programs with
    cvxpy (``optim_niter`` = 20 rounds, stopping at a 1e-3 residual); here the equation is
    solved to rounding.

    Exact: with ``alpha_i = gamma_i / |g_i|`` the equation becomes ``gamma_i (C gamma)_i = 1``
    on the cosine matrix (so the weights follow each gradient's scale exactly), solved by
    :func:`nash_newton`. On CPU the iteration stops when the Newton decrement is at rounding
    level (at most ``max_iter``); on CUDA it runs ``device_iter`` iterations without host
    synchronisation. Solvable random problems with K <= 8 and norms spread over 12 decades
    reach rounding level in at most 18 iterations from the start used here; close to Pareto
    stationarity the damped phase needs about log2 of how close more.
    ``info["residual"]``: ``max |alpha_i (G alpha)_i - 1|``.
    No solution exists when 0 is in the convex hull of the gradients (a zero gradient, or
    Pareto stationarity): the iteration then fails to converge (residual above 1e-9), and
    the weights are 0 (no update), as no direction improves every task. Zero-gradient tasks are left out of the
    bargaining (weight 0).

    A non-finite G (an AMP overflow: NaN weights, the step is skipped) leaves the kept weights
    as they were; with none yet (an overflow on the first calls), the next finite G gets
    fresh ones whether or not they are due. The schedule counts calls, skipped ones included.
    On CUDA (no host sync) the solve runs on every call and the result is kept only when
    that rule says so, so ``update_weights_every`` there changes the weights, not the cost.

    Args:
        max_norm: clip ``|d|`` to this (0 disables; the reference's default is 1.0).
        update_weights_every: recompute the weights every this many calls (>= 1).
        max_iter: Newton iterations at most (CPU, which stops at convergence).
        device_iter: Newton iterations on CUDA (a fixed count: no host sync).
    """

    def __init__(self, max_norm=1.0, update_weights_every=1, max_iter=100, device_iter=30):
        super().__init__()
        if not (max_norm >= 0 and math.isfinite(max_norm)):
            raise ValueError(f"NashMTLWeighting: max_norm must be finite and >= 0, got {max_norm!r}")
        if not (isinstance(update_weights_every, int) and update_weights_every >= 1):
            raise ValueError(f"NashMTLWeighting: update_weights_every must be an int >= 1, got {update_weights_every!r}")
        for name, v in (("max_iter", max_iter), ("device_iter", device_iter)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"NashMTLWeighting: {name} must be an int >= 1, got {v!r}")
        self.max_norm, self.update_weights_every = float(max_norm), update_weights_every
        self.max_iter, self.device_iter = max_iter, device_iter
        self.reset()

    def _options(self):
        return {"max_norm": self.max_norm, "update_weights_every": self.update_weights_every,
                "max_iter": self.max_iter, "device_iter": self.device_iter}

    def reset(self):
        self.step = 0
        self.alpha = None

    def state_dict(self):
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.detach().cpu()}

    def load_state_dict(self, state):
        self.step = int(state.get("step", 0))
        self.alpha = state.get("alpha")

    def _solve(self, G, host):
        """The bargaining weights of G and the solver's diagnostics."""
        C, _, zero = scaled(G)
        gamma, residual = nash_newton(with_unit_diagonal(C, zero), self.max_iter if host else self.device_iter, host)
        norms = G.diagonal().clamp_min(0).sqrt()
        alpha = torch.where(zero, torch.zeros_like(gamma), gamma / torch.where(zero, torch.ones_like(norms), norms))
        ok = residual <= 1e-9
        return torch.where(ok, alpha, torch.zeros_like(alpha)), {"residual": residual, "converged": ok}

    def weights(self, G):
        k = G.shape[0]
        if self.alpha is not None and self.alpha.shape != (k,):
            raise ValueError(f"NashMTLWeighting: got {k} tasks, but the saved weights are for {self.alpha.shape[0]}")
        due = self.alpha is None or self.step % self.update_weights_every == 0
        self.step += 1  # (calls: an overflow the scaler skips counts too, on every device alike)
        fin = finite(G)
        old = None if self.alpha is None else self.alpha.to(G.device, torch.float64)
        if base.can_branch(G):
            # A non-finite G (the step is skipped) leaves the weights as they were; with none
            # good yet, the next call solves again.
            if bool(fin) and (due or not bool(torch.isfinite(old).all())):
                self.alpha, self.info = self._solve(G, True)
        else:
            # No host sync: solve on every call, and take the new weights where G is finite and
            # they are due, or the kept ones are not finite (an overflow before any good step).
            new, self.info = self._solve(G, False)
            if old is None:
                self.alpha = torch.where(fin, new, torch.full_like(new, float("nan")))
            else:
                take = fin if due else fin & ~torch.isfinite(old).all()
                self.alpha = torch.where(take, new, old)
        if self.alpha is None:
            return torch.full((k,), float("nan"), dtype=torch.float64, device=G.device)
        alpha = self.alpha.to(G.device, torch.float64)
        if self.max_norm > 0:
            dnorm = (alpha @ G @ alpha).clamp_min(0).sqrt()
            alpha = alpha * torch.where(dnorm > self.max_norm, self.max_norm / dnorm, torch.ones_like(dnorm))
        return nan_unless(fin, alpha)
