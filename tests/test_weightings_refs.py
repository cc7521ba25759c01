"""Float64 references for roga_cuda.optim.weightings, written from the papers in vector space
(task gradients are the rows of J, never only their Gram matrix), test-case generators, and
optimality certificates. Imported by the other test_weightings* files; the tests here check
the references themselves on cases whose answers are known in closed form.

Tolerances follow the backward error of float64: a condition on <g_i, d> is met "to float
precision" when its residual is a few hundred epsilons of the size of the terms it is made
of (|g_i| times the total weight rho = sum_k |w_k| |g_k|, plus rho^2 for |d|^2 = w'Gw).
"""
import numpy as np
import pytest
import torch
from scipy.optimize import nnls

EPS = np.finfo(np.float64).eps
TOL = 256 * EPS
KINDS = ("random", "conflict", "aligned", "duplicate", "rank2", "zero", "opposite", "hull0")


# ---------------------------------------------------------------- test cases

def gradients(k, kind, gen, spread=0.0, scale=1.0, n=None):
    """K x n float64 gradients of a named kind; row norms multiplied by 10^U(-spread, spread),
    everything by ``scale``."""
    n = n or max(2 * k, 12)
    J = torch.randn(k, n, generator=gen, dtype=torch.float64)
    if kind == "conflict":       # chains of strongly conflicting pairs
        for i in range(1, k):
            J[i] = -(0.5 + torch.rand((), generator=gen, dtype=torch.float64)) * J[i - 1] + 0.3 * J[i]
    elif kind == "aligned":
        J = 0.2 * J + torch.randn(1, n, generator=gen, dtype=torch.float64)
    elif kind == "duplicate":
        J[k - 1] = J[0]
        if k > 3:
            J[k - 2] = 2.5 * J[1]
    elif kind == "rank2":
        J = torch.randn(k, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, n, generator=gen, dtype=torch.float64)
    elif kind == "zero":
        J[k - 1] = 0
    elif kind == "opposite":
        J[k - 1] = -J[0]
    elif kind == "hull0":        # 0 strictly inside the convex hull
        if k > 1:
            J[k - 1] = -0.7 * J[: k - 1].sum(0)
    elif kind != "random":
        raise ValueError(kind)
    if spread:
        J = J * 10.0 ** ((2 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 1) * spread)
    return J * scale


def gram(J):
    return J @ J.T


# ---------------------------------------------------------------- certificates

def _norms(J):
    return J.norm(dim=1)


def mgda_violation(J, w):
    """KKT of min |J'w| over the simplex, in vector space: <g_i, d> >= |d|^2 for all i,
    with equality where w_i > 0 (complementarity as min(w_i |g_i| / rho, |residual|))."""
    w = w.to(torch.float64)
    nrm = _norms(J)
    rho = (w.abs() * nrm).sum()
    primal = max(float((-w).clamp_min(0).max()), abs(float(w.sum()) - 1))
    if rho == 0:  # all the weight on zero gradients: d = 0, the min-norm point itself
        return primal
    d = w @ J
    r = J @ d - d @ d
    scale = rho * (nrm + rho)
    dual = (-r / scale).clamp_min(0)
    comp = torch.minimum(w.clamp_min(0) * nrm / rho, r.abs() / scale)
    return max(float(dual.max()), float(comp.max()), primal)


def cone_violation(J, u, v):
    """KKT of the projection of J'u onto the dual cone {x : Jx >= 0}, given its weights v:
    d = J'v, lambda = v - u >= 0, Jd >= 0, lambda_i (Jd)_i = 0 (Moreau decomposition)."""
    u, v = u.to(torch.float64), v.to(torch.float64)
    nrm = _norms(J)
    rho = (v.abs() * nrm).sum() + (u.abs() * nrm).sum()
    if rho == 0:
        return 0.0
    Jd = J @ (v @ J)
    lam = v - u
    scale = torch.where(nrm > 0, nrm * rho, torch.ones_like(nrm))
    feas = (-Jd / scale).clamp_min(0)
    mult = (-lam * nrm / rho).clamp_min(0)
    comp = torch.minimum(lam.clamp_min(0) * nrm / rho, Jd.abs() / scale)
    return max(float(feas.max()), float(mult.max()), float(comp.max()))


def cagrad_certificate(J, W, c, extra_certificates=()):
    """CAGrad's primal-dual certificate for sum-form weights W with rescale=0:
    d = W'J / K must lie on the ball |d - g0| = c|g0| (or inside it, in the degenerate
    g_w = 0 case) and reach the dual bound: min_i <g_i, d> = min_w <g_w, g0> + c|g0||g_w|.
    Any simplex w bounds the dual from above (weak duality), so a zero gap with a feasible d
    proves both optimal. Certificates tried: the method's own w (from W - 1), the min-norm
    point (scipy's, and any ``extra_certificates``).

    Scales are the first-order effect of a relative rounding of G (|dG_ij| <= eps |g_i||g_j|),
    the data a Gram-space method has: |g0|^2 moves by eps rho0^2 (rho0 = sum |g_i| / K), so
    c|g0| by c eps rho0^2 / (2|g0|). Returns (ball excess, gap), both scaled."""
    k = J.shape[0]
    W = W.to(torch.float64)
    g0 = J.mean(0)
    n0 = g0.norm()
    cp = c * n0
    nrm = _norms(J)
    rho0 = nrm.sum() / k
    d = (W / k) @ J
    u = W / k - 1.0 / k
    rhou = (u.abs() * nrm).sum()
    r2 = (d - g0) @ (d - g0)
    ball = float((r2 - cp * cp) / (c * c * rho0 * rho0 + rhou * rhou)) if rhou + cp > 0 else 0.0
    primal = float((J @ d).min())
    certs = [mgda_reference(J)] + list(extra_certificates)
    if u.sum() > 0:
        certs.append(u / u.sum())
    best = None
    for w in certs:
        gw = w @ J
        ngw, rhow = gw.norm(), (w.abs() * nrm).sum()
        value = float(gw @ g0 + cp * ngw)
        sens = rhow * rho0 + c * (rho0 * rho0 * ngw / (2 * n0) if n0 > 0 else rho0 * rhow) + c * n0 * rhow
        scale = float(sens + nrm.max() * (W.abs() / k * nrm).sum())
        gap = (value - primal) / max(scale, 1e-300)
        best = gap if best is None else min(best, gap, key=abs)
    return ball, best


# ---------------------------------------------------------------- references (papers)

def mgda_reference(J):
    """Min-norm point of conv{g_i} by scipy's NNLS (Lawson-Hanson): min |[J'; 1'] x - e|
    over x >= 0 gives x proportional to the min-norm weights. Returns w (sum 1)."""
    k = J.shape[0]
    A = np.vstack([J.T.numpy(), np.ones((1, k))])
    b = np.zeros(A.shape[0])
    b[-1] = 1.0
    x, _ = nnls(A, b, maxiter=50 * k)
    return torch.from_numpy(x / x.sum())


def mgda_two(J):
    """Sener & Koltun Algorithm 1 (K = 2): gamma = clip(<g2 - g1, g2> / |g1 - g2|^2, 0, 1)."""
    g1, g2 = J[0], J[1]
    den = (g1 - g2) @ (g1 - g2)
    gamma = 0.5 if den == 0 else float(((g2 - g1) @ g2 / den).clamp(0, 1))
    return torch.tensor([gamma, 1 - gamma], dtype=torch.float64)


def cone_projection_reference(J, x):
    """Projection of x onto {y : Jy >= 0} by Moreau: y = x + J'lam, lam = argmin_{lam >= 0}
    |x + J'lam| (scipy NNLS). Returns y."""
    lam, _ = nnls(J.T.numpy(), -x.numpy(), maxiter=50 * J.shape[0])
    return x + torch.from_numpy(lam) @ J


def cagrad_reference_two(J, c):
    """K = 2 CAGrad, Algorithm 1, by a fine bounded scalar minimisation of the convex
    F(gamma) = <g_w, g0> + c|g0||g_w| (to 1e-15). Returns (d, F*): d mean-like, no rescale."""
    from scipy.optimize import minimize_scalar
    g0 = J.mean(0)
    cp = float(c * g0.norm())

    def F(t):
        gw = t * J[0] + (1 - t) * J[1]
        return float(gw @ g0 + cp * gw.norm())

    t = minimize_scalar(F, bounds=(0, 1), method="bounded", options={"xatol": 1e-15}).x
    t = min([t, 0.0, 1.0], key=F)  # the bounded search never evaluates the end points
    gw = t * J[0] + (1 - t) * J[1]
    return g0 + cp * gw / gw.norm(), F(t)


def pcgrad_reference(J, orders):
    """Yu et al. 2020, Algorithm 1, on the vectors: returns sum_i g_i'."""
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    for i, order in enumerate(orders):
        g = J[i].clone()
        for j in order:
            dot = g @ J[j]
            if dot < 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        out += g
    return out


def gradvac_reference(J, targets, beta, orders, blocks, update="always"):
    """Wang et al. 2021, Algorithm 1, on the vectors, per block of coordinates (LibMTL's
    groups). targets: (n_blocks, K, K), updated in place. Returns sum_i g_i' (a vector)."""
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    for i, order in enumerate(orders):
        g = J[i].clone()
        for j in order:
            for b, (lo, hi) in enumerate(blocks):
                gi, gj = g[lo:hi], J[j, lo:hi]
                ni, nj = gi.norm(), gj.norm()
                if ni == 0 or nj == 0:
                    continue
                phi = float((gi @ gj / (ni * nj)).clamp(-1, 1))
                t = float(targets[b, i, j])
                applied = False
                if phi < t and t * t < 1:
                    w = ni * (t * (1 - phi * phi) ** 0.5 - phi * (1 - t * t) ** 0.5) / (nj * (1 - t * t) ** 0.5)
                    g[lo:hi] = gi + w * gj
                    applied = True
                if update == "always" or applied:
                    targets[b, i, j] = (1 - beta) * t + beta * phi
        out += g
    return out


def orders_reference(k, seed):
    """The documented order rule: for each task i, a torch.randperm(K - 1) of the other tasks
    from a torch.Generator seeded with ``seed`` (no draw for K <= 2)."""
    gen = torch.Generator().manual_seed(seed)

    def draw():
        out = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            if k > 2:
                others = [others[m] for m in torch.randperm(k - 1, generator=gen).tolist()]
            out.append(others)
        return out
    return draw


def imtlg_reference(J):
    """Liu et al. 2021, IMTL-G closed form: D rows g_1 - g_i, U rows u_1 - u_i (i >= 2);
    alpha_{2:K} = g_1 U'(D U')^{-1}, alpha_1 = 1 - sum. Returns d = sum alpha_i g_i."""
    u = J / J.norm(dim=1, keepdim=True)
    D = J[:1] - J[1:]
    U = u[:1] - u[1:]
    a = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - a.sum().reshape(1), a])
    return alpha @ J


def aligned_mtl_reference(J, p, mode="min"):
    """Senushkin et al. 2023: with J = U S V' (rank r), the aligned gradients are
    lambda_R^{1/2} U_r V_r' rows; the update is p' of them, i.e. sqrt(lambda_R) V_r U_r' p."""
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    keep = S ** 2 > J.shape[0] * torch.finfo(torch.float32).eps * S[0] ** 2
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    lam = S ** 2
    lam_r = {"min": lam.min(), "median": lam.median(), "rmse": lam.mean()}[mode]
    return lam_r.sqrt() * (p @ U) @ Vh


def config_reference(J, p, length="projection"):
    """ConFIG (Liu et al.), the reference ConFIG_update: v = pinv(units) p, and the length
    models: d = (sum_i <g_i, v_hat>) v_hat (ProjectionLength), or every gradient rescaled to a
    tracked norm t first: d = t (sum_i <u_i, v_hat>) v_hat (TrackMinimum, ..., TrackSpecific)."""
    nrm = J.norm(dim=1, keepdim=True)
    units = torch.where(nrm > 0, J / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), torch.zeros_like(J))
    v = torch.linalg.pinv(units) @ p
    vh = v / v.norm()
    if length == "projection":
        return (J @ vh).sum() * vh
    n = nrm[:, 0]
    t = n[length] if isinstance(length, int) else {
        "min": n.min(), "max": n.max(), "arithmetic": n.mean(), "harmonic": len(n) / (1 / n).sum(),
        "geometric": n.prod() ** (1 / len(n))}[length]
    return t * (units @ vh).sum() * vh


def combine(W, J):
    return W.to(torch.float64) @ J


# ---------------------------------------------------------------- the references' own checks

def test_mgda_reference_matches_two_task_closed_form():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        J = gradients(2, "conflict", gen)
        assert torch.allclose(mgda_reference(J), mgda_two(J), atol=1e-9)
        assert mgda_violation(J, mgda_two(J)) < 1e-12


def test_cone_projection_reference_is_a_projection():
    gen = torch.Generator().manual_seed(1)
    J = gradients(4, "conflict", gen)
    x = J.sum(0)
    y = cone_projection_reference(J, x)
    assert (J @ y).min() > -1e-10 * J.norm() * y.norm()
    # nothing in the cone is closer: random feasible points are farther from x
    for _ in range(200):
        z = y + 0.1 * torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
        if (J @ z).min() >= 0:
            assert (z - x).norm() >= (y - x).norm() - 1e-12


def test_imtlg_reference_has_equal_projections():
    gen = torch.Generator().manual_seed(2)
    J = gradients(4, "random", gen, spread=1)
    d = imtlg_reference(J)
    proj = J @ d / J.norm(dim=1)
    assert torch.allclose(proj, proj[0].expand_as(proj), rtol=1e-10)


def test_aligned_mtl_reference_gradients_are_orthogonal_with_equal_norms():
    gen = torch.Generator().manual_seed(3)
    J = gradients(3, "random", gen, spread=1)
    rows = torch.stack([aligned_mtl_reference(J, torch.eye(3, dtype=torch.float64)[i]) for i in range(3)])
    Gr = rows @ rows.T
    assert torch.allclose(Gr, Gr[0, 0] * torch.eye(3, dtype=torch.float64), atol=1e-10 * Gr[0, 0])


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_reference_two_has_zero_duality_gap(c):
    gen = torch.Generator().manual_seed(4)
    for kind in ("conflict", "random", "aligned"):
        J = gradients(2, kind, gen)
        d, Fstar = cagrad_reference_two(J, c)
        g0 = J.mean(0)
        assert abs((d - g0).norm() - c * g0.norm()) < 1e-12 * g0.norm()
        # golden section is accurate to ~1e-8 in the argument, so the value to ~1e-12
        assert abs(float((J @ d).min()) - Fstar) < 1e-7 * float(J.norm() * g0.norm())
