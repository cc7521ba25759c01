"""Exact solvers for the small convex programs behind MGDA, CAGrad, UPGrad and DualProj.

All work on the scale-free cosine matrix ``C`` (see :func:`base.scaled`); K is small.

Two ways to reach the optimum, both verified by the problem's KKT conditions:

* **Support enumeration** (``enumerate``): the optimum has a support (the set of free
  coordinates) on which the KKT conditions are a linear system — for CAGrad a linear
  system plus one quadratic equation in a scalar. Every support is solved at once as one
  batched LU factorisation (one refinement step), each candidate's scaled KKT violation is
  computed, and the best candidate wins. Singular systems (duplicated or rank-deficient
  gradients) give non-finite or violating candidates and simply lose: a minimal optimal
  support always has a non-singular system. Pure tensor code, fixed shapes: on CUDA it
  runs without a host synchronisation. Cost O(2^K K^3): the default for K <= 10.
* **Active set** (``active_set``): Lawson-Hanson non-negative least squares on the Gram
  form (MGDA via the classic NNLS reformulation, UPGrad/DualProj directly) and, for CAGrad,
  bisection on the multiplier of the simplex constraint with an exact solve on the support
  it identifies. Finite, any K; host loops (one sync on CUDA). Used for K > 10, and its
  answer is checked and, if it ever misses the tolerance, compared against enumeration when
  that is affordable.

Violations are scale-free: every residual is divided by the size of the quantities it is
made of, so "exact" means the KKT conditions hold to a few units of float64 rounding.
"""
import functools

import torch

ENUMERATE_MAX = 10  # auto: enumerate supports up to this K (1024 supports), else active set
ACCEPT = 1e-12      # a candidate this close to KKT ends the active-set searches early
CHUNK = 4096        # supports solved per batch
SOLVERS = ("auto", "enumerate", "active_set")


def check_solver(solver, who):
    if solver not in SOLVERS:
        raise ValueError(f"{who}: solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def use_enumeration(solver, k):
    return solver == "enumerate" or (solver == "auto" and k <= ENUMERATE_MAX)


@functools.lru_cache(maxsize=64)
def _masks(k, device, nonempty):
    n = torch.arange(1 if nonempty else 0, 2 ** k, device=device)
    return ((n.unsqueeze(1) >> torch.arange(k, device=device)) & 1).bool()


def masks(k, device, nonempty=False):
    """All subsets of range(k) as a (2^k [- 1], k) bool tensor."""
    return _masks(k, torch.device(device), nonempty)


def _inf_nan(v):
    return torch.nan_to_num(v, nan=float("inf"), posinf=float("inf"))


def _solve(A, R):
    """Batched LU solve with one step of iterative refinement; no error checks (singular
    systems give non-finite results, which the KKT selection discards)."""
    LU, piv, _ = torch.linalg.lu_factor_ex(A)
    X = torch.linalg.lu_solve(LU, piv, R)
    return X + torch.linalg.lu_solve(LU, piv, R - A @ X)


def _take(x, i):
    """x[i] for a 0-d index tensor without converting it to a Python int (no host sync)."""
    return x.index_select(0, i.reshape(1)).squeeze(0)


def _safe_div(v, s):
    return torch.where(s > 0, v / torch.where(s > 0, s, torch.ones_like(s)), v)


# ----------------------------------------------------------------- KKT violations
# Each returns a scale-free violation (0 at an exact optimum); batched over leading dims.

def box_violation(C, L, X, F):
    """min x'Cx s.t. x >= L. Free coordinates F: x >= L and (Cx)_F = 0; bound: (Cx) >= 0.
    Residuals are measured against the data (|L|_1), not the candidate: a singular system's
    huge solution along a null direction of C cannot hide its rounding behind its size."""
    CX = X @ C
    primal = torch.where(F, (L - X).clamp_min(0), torch.zeros_like(X))
    dual = torch.where(F, CX.abs(), (-CX).clamp_min(0))
    return _inf_nan(_safe_div(torch.maximum(primal, dual).amax(-1), L.abs().sum(-1)))


def simplex_violation(C, a, w, mu, S):
    """min w'Cw s.t. w >= 0, a'w = 1 (multiplier mu = w'Cw): (Cw)_i >= mu a_i, equal on S."""
    r = mu.unsqueeze(-1) * a - w @ C
    primal = torch.where(S, (-w).clamp_min(0), torch.zeros_like(w))
    dual = torch.where(S, r.abs(), r.clamp_min(0))
    v = _safe_div(torch.maximum(primal, dual).amax(-1), w.abs().sum(-1) + mu.abs())
    return _inf_nan(torch.maximum(v, (w @ a - 1).abs()))


def cagrad_violation(C, beta, a, c2, u, mu, S):
    """CAGrad stationarity with u = (c'/||g_w||) w: u >= 0, (C(beta + u))_i >= mu a_i with
    equality on the support S, and u'Cu = c'^2 (c2). Measured against the data |beta|_1 + c'."""
    r = mu.unsqueeze(-1) * a - (beta + u) @ C
    primal = torch.where(S, (-u).clamp_min(0), torch.zeros_like(u))
    dual = torch.where(S, r.abs(), r.clamp_min(0))
    v = _safe_div(torch.maximum(primal, dual).amax(-1), beta.abs().sum() + c2.sqrt())
    q = ((u @ C) * u).sum(-1)
    return _inf_nan(torch.maximum(v, _safe_div((q - c2).abs(), q + c2)))


# ----------------------------------------------------------------- enumeration

def _chunked(solve, k, device, nonempty):
    """Run ``solve(masks)`` on the subsets in chunks of CHUNK and keep the best answer
    (bounded memory for K up to 16; still no host sync: the merge is a torch.where)."""
    S = masks(k, device, nonempty)
    best = None
    for start in range(0, S.shape[0], CHUNK):
        x, v = solve(S[start:start + CHUNK])
        if best is None:
            best = (x, v)
        else:
            take = v < best[1]
            best = (torch.where(take.unsqueeze(-1), x, best[0]), torch.where(take, v, best[1]))
    return best


def box_qp_enumerate(C, L):
    """For each row l of L (B, K): argmin_x x'Cx s.t. x >= l. Returns (X (B, K), violation (B,))."""
    k, B = C.shape[0], L.shape[0]
    eye = torch.eye(k, dtype=C.dtype, device=C.device)
    cols = torch.arange(B, device=C.device)

    def solve(F):                                            # free sets, (S, k)
        A = torch.where(F.unsqueeze(-1), C, eye)             # free rows: (Cx)_i = 0; bound rows: x_i = l_i
        R = torch.where(F.unsqueeze(-1), torch.zeros((), dtype=C.dtype, device=C.device), L.T.unsqueeze(0))
        X = _solve(A, R).transpose(1, 2)                     # (S, B, k)
        Fb = F.unsqueeze(1)
        X = torch.where(Fb, X, L.unsqueeze(0))
        viol = box_violation(C, L.unsqueeze(0), X, Fb)       # (S, B)
        best = viol.argmin(0)
        return X[best, cols], viol[best, cols]

    X, v = _chunked(solve, k, C.device, nonempty=False)
    return torch.maximum(X, L), v


def _bordered(C, a, S):
    """(S, k+1, k+1): rows i in S: (Cx)_i - a_i m; rows not in S: x_i; last row: a'x."""
    k = C.shape[0]
    n = S.shape[0]
    eye = torch.eye(k, dtype=C.dtype, device=C.device)
    A = torch.zeros(n, k + 1, k + 1, dtype=C.dtype, device=C.device)
    A[:, :k, :k] = torch.where(S.unsqueeze(-1), C, eye)
    A[:, :k, k] = torch.where(S, -a, torch.zeros_like(a))
    A[:, k, :k] = a
    return A


def simplex_qp_enumerate(C, a):
    """argmin_w w'Cw s.t. w >= 0, a'w = 1 (a > 0). Returns (w, violation)."""
    k = C.shape[0]

    def solve(S):
        A = _bordered(C, a, S)
        rhs = torch.zeros(S.shape[0], k + 1, 1, dtype=C.dtype, device=C.device)
        rhs[:, k] = 1
        Z = _solve(A, rhs)[..., 0]
        w = torch.where(S, Z[:, :k], torch.zeros_like(Z[:, :k]))
        viol = simplex_violation(C, a, w, Z[:, k], S)
        best = viol.argmin()
        return _take(w, best), _take(viol, best)

    w, v = _chunked(solve, k, C.device, nonempty=True)
    w = w.clamp_min(0)  # rounding-level negatives off the support
    return w / (w @ a), v


def _cagrad_roots(C, u0, u1, c2):
    """t > 0 with (u0 + t u1)' C (u0 + t u1) = c2, both roots, cancellation-free."""
    Cu1 = u1 @ C
    al = (u1 * Cu1).sum(-1)
    be = (u0 * Cu1).sum(-1)
    ga = ((u0 @ C) * u0).sum(-1) - c2
    sq = (be * be - al * ga).sqrt()          # NaN when no real root: the candidate loses
    q = -(be + torch.copysign(sq, be))
    return torch.stack([q / al, ga / q], -1)  # q/al is inf when al == 0: the linear root is ga/q


def cagrad_enumerate(C, beta, a, c2, live):
    """CAGrad's stationary points over all supports of live tasks. Returns (u, violation)."""
    k = C.shape[0]
    zero = torch.zeros((), dtype=C.dtype, device=C.device)

    def solve(S):
        A = _bordered(C, a, S)
        n = S.shape[0]
        rhs = torch.zeros(n, k + 1, 2, dtype=C.dtype, device=C.device)
        rhs[:, :k, 0] = torch.where(S, -(beta @ C), zero)
        rhs[:, k, 1] = 1
        Z = _solve(A, rhs)                                    # (n, k+1, 2): z0 = (u0, m0), z1 = (u1, m1)
        u0 = torch.where(S, Z[:, :k, 0], zero)
        u1 = torch.where(S, Z[:, :k, 1], zero)
        t = _cagrad_roots(C, u0, u1, c2)                      # (n, 2)
        u = u0.unsqueeze(1) + t.unsqueeze(-1) * u1.unsqueeze(1)   # (n, 2, k)
        mu = Z[:, k, 0].unsqueeze(1) + t * Z[:, k, 1].unsqueeze(1)
        viol = cagrad_violation(C, beta, a, c2, u, mu, S.unsqueeze(1))
        ok = (t > 0) & ~(S & ~live).any(-1, keepdim=True)
        viol = torch.where(ok, viol, torch.full_like(viol, float("inf")))
        flat = viol.reshape(-1).argmin()
        return _take(u.reshape(-1, k), flat), _take(viol.reshape(-1), flat)

    u, v = _chunked(solve, k, C.device, nonempty=True)
    return u.clamp_min(0), v


# ----------------------------------------------------------------- active set (host)

def nnls_gram(H, f, max_iter=None):
    """Lawson-Hanson: argmin_{x >= 0} x'Hx/2 - f'x on host float64 tensors (H PSD).
    Returns x. Entering test and step are scale-free; finite in exact arithmetic."""
    k = f.shape[0]
    x = torch.zeros_like(f)
    P = torch.zeros(k, dtype=torch.bool)
    absH = H.abs()
    eps = torch.finfo(torch.float64).eps
    banned = torch.zeros(k, dtype=torch.bool)
    for _ in range(max_iter or 30 * k + 30):
        w = f - H @ x
        tol = 8 * k * eps * (f.abs() + absH @ x.abs())
        cand = ~P & ~banned & (w > tol)
        if not bool(cand.any()):
            break
        j = int(torch.where(cand, w, torch.full_like(w, -float("inf"))).argmax())
        P[j] = True
        first = True
        while True:
            idx = P.nonzero().flatten()
            z = torch.zeros_like(f)
            z[idx] = _sub_solve(H[idx][:, idx], f[idx])
            if bool((z[idx] > 0).all()):
                x = z
                banned.zero_()
                break
            if first and not bool(z[j] > 0):  # rounding: j cannot enter after all
                P[j] = False
                banned[j] = True
                break
            first = False
            neg = idx[z[idx] <= 0]
            ratio = x[neg] / (x[neg] - z[neg])
            m = int(ratio.argmin())
            x = x + ratio[m] * (z - x)
            x[neg[m]] = 0
            P &= x > 0
            if not bool(P.any()):
                break
    return x


def _sub_solve(H, f):
    sol, info = torch.linalg.solve_ex(H, f)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        sol = torch.linalg.lstsq(H, f.unsqueeze(-1), driver="gelsd").solution[:, 0]
    return sol


def box_qp_active_set(C, L):
    """As :func:`box_qp_enumerate`, by Lawson-Hanson on x - l >= 0 (host)."""
    Ch = C.cpu()
    out = []
    for l in L.cpu():
        out.append(l + nnls_gram(Ch, -(Ch @ l)))
    X = torch.stack(out).to(C.device)
    return X, box_violation(C, L, X, X > L)


def simplex_qp_active_set(C, a):
    """As :func:`simplex_qp_enumerate`: NNLS on H = C + aa', f = a, then w = x / a'x
    (min ||[J; a'] x - e||^2 over x >= 0 has x proportional to the min-norm point)."""
    Ch, ah = C.cpu(), a.cpu()
    x = nnls_gram(Ch + torch.outer(ah, ah), ah)
    w = (x / (ah @ x)).to(C.device)
    mu = w @ C @ w
    return w, simplex_violation(C, a, w, mu, w > 0)


def _cagrad_on_support(C, beta, a, c2, S):
    """Exact CAGrad candidate on one support (host): the bordered system and the quadratic."""
    k = C.shape[0]
    A = _bordered(C, a, S.unsqueeze(0))[0]
    rhs = torch.zeros(k + 1, 2, dtype=C.dtype)
    rhs[:k, 0] = torch.where(S, -(beta @ C), torch.zeros_like(a))
    rhs[k, 1] = 1
    Z, info = torch.linalg.solve_ex(A, rhs)
    if int(info) != 0:
        Z = torch.linalg.lstsq(A, rhs, driver="gelsd").solution
    zero = torch.zeros((), dtype=C.dtype)
    u0, u1 = torch.where(S, Z[:k, 0], zero), torch.where(S, Z[:k, 1], zero)
    best = (None, float("inf"))
    for t in _cagrad_roots(C, u0, u1, c2).tolist():
        if not t > 0:
            continue
        u, mu = u0 + t * u1, Z[k, 0] + t * Z[k, 1]
        v = float(cagrad_violation(C, beta, a, c2, u, mu, S))
        if v < best[1]:
            best = (u, v)
    return best


def cagrad_active_set(C, beta, a, c2, live):
    """CAGrad on the host, any K. For a multiplier m, u(m) = argmin_{u >= 0, u_dead = 0}
    u'Cu/2 + u'(C beta - m a) (Lawson-Hanson) is CAGrad's u exactly when u(m)'Cu(m) = c2;
    bisection on m finds that crossing, and the support of u(m) there gives the exact
    candidate. Returns (u, violation); u is None when no stationary point exists."""
    Ch, bh, ah, lv, c2 = C.cpu(), beta.cpu(), a.cpu(), live.cpu(), c2.cpu()
    idx = lv.nonzero().flatten()
    Cl = Ch[idx][:, idx]
    Cb = (bh @ Ch)[idx]
    al = ah[idx]

    def u_at(m):
        u = torch.zeros_like(bh)
        u[idx] = nnls_gram(Cl, m * al - Cb)
        return u

    best = (None, float("inf"))

    def consider(u):
        nonlocal best
        cand = _cagrad_on_support(Ch, bh, ah, c2, (u > 0) & lv)
        if cand[1] < best[1]:
            best = cand
        return best[1] <= ACCEPT

    lo = float((Cb / al).min())          # u(lo) = 0, so u'Cu = 0 < c2
    # If 0 is in the hull of the live gradients, C has a null vector n >= 0 with a'n > 0 and
    # the program is unbounded for m > 0: the crossing is at m <= 0, and at m = 0 (u(0)'Cu(0)
    # <= c2) there is none: the optimum has g_w = 0.
    om, _ = simplex_qp_active_set(Cl, al)
    if float(om @ Cl @ om) <= 16 * len(idx) * torch.finfo(torch.float64).eps * float(om.abs().sum()) ** 2:
        if lo >= 0:
            return best
        u = u_at(0.0)
        if consider(u) or float(u @ Ch @ u) <= c2:
            return best
        hi = 0.0
    else:
        step, hi = 1.0, None
        for _ in range(1100):                # bracket: u(hi)'Cu(hi) > c2 (doubling reaches any float)
            u = u_at(lo + step)
            if consider(u):
                return best
            if float(u @ Ch @ u) > c2:
                hi = lo + step
                break
            step *= 2
        if hi is None:
            return best
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        u = u_at(mid)
        if consider(u):
            break
        if float(u @ Ch @ u) > c2:
            hi = mid
        else:
            lo = mid
    return best


# ----------------------------------------------------------------- dispatch

_FALLBACK_ENUMERATE = 12  # auto: an active-set answer that misses ACCEPT is re-solved by enumeration up to this K


def _host_ok(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _better(first, second):
    return first if float(first[1]) <= float(second[1]) else second


def box_qp(C, L, solver="auto"):
    """argmin_x x'Cx s.t. x >= l for each row l of L. Returns (X, violation)."""
    k = C.shape[0]
    if use_enumeration(solver, k):
        return box_qp_enumerate(C, L)
    if not _host_ok(C, L):
        return torch.full_like(L, float("nan")), torch.full(L.shape[:1], float("inf"), dtype=C.dtype, device=C.device)
    X, v = box_qp_active_set(C, L)
    if solver == "auto" and k <= _FALLBACK_ENUMERATE and float(v.max()) > ACCEPT:
        Xe, ve = box_qp_enumerate(C, L)
        pick = ve < v
        X, v = torch.where(pick.unsqueeze(-1), Xe, X), torch.where(pick, ve, v)
    return X, v


def simplex_qp(C, a, solver="auto"):
    """argmin_w w'Cw s.t. w >= 0, a'w = 1. Returns (w, violation)."""
    k = C.shape[0]
    if use_enumeration(solver, k):
        return simplex_qp_enumerate(C, a)
    if not _host_ok(C, a):
        return torch.full_like(a, float("nan")), torch.tensor(float("inf"), dtype=C.dtype, device=C.device)
    best = simplex_qp_active_set(C, a)
    if solver == "auto" and k <= _FALLBACK_ENUMERATE and float(best[1]) > ACCEPT:
        best = _better(best, simplex_qp_enumerate(C, a))
    return best


def cagrad_qp(C, beta, a, c2, live, solver="auto"):
    """CAGrad's stationary point u (see :func:`cagrad_violation`). Returns (u, violation);
    the violation is inf (and u NaN) when there is none (the optimum has g_w = 0)."""
    k = C.shape[0]
    if use_enumeration(solver, k):
        return cagrad_enumerate(C, beta, a, c2, live)
    nan = (torch.full_like(beta, float("nan")), torch.tensor(float("inf"), dtype=C.dtype, device=C.device))
    if not _host_ok(C, beta, a, c2):
        return nan
    u, v = cagrad_active_set(C, beta, a, c2, live)
    best = nan if u is None else (u.clamp_min(0).to(C.device), torch.tensor(v, dtype=C.dtype, device=C.device))
    if solver == "auto" and k <= _FALLBACK_ENUMERATE and float(best[1]) > ACCEPT:
        best = _better(best, cagrad_enumerate(C, beta, a, c2, live))
    return best
