"""The exact solvers (MGDA, CAGrad, UPGrad, DualProj) meet their optimality conditions to
float precision, checked in vector space on the gradients themselves (never through the
library's own formulation): K = 2..8 and 16, conflicting, aligned, duplicated,
rank-deficient, zero and opposite gradients, 0 inside the hull, norms spread over up to
12 decades, global scales 1e-6..1e6, both solvers (support enumeration and active set)."""
import itertools

import pytest
import torch

from roga_cuda.optim.weightings import CAGradWeighting, DualProjWeighting, MGDAWeighting, UPGradWeighting

from test_weightings_refs import (KINDS, TOL, cagrad_certificate, cagrad_reference_two, combine,
                                  cone_projection_reference, cone_violation, gradients, gram, mgda_reference,
                                  mgda_two, mgda_violation)

SOLVERS = ("enumerate", "active_set")


def cases(seed, ks=range(2, 9), kinds=KINDS):
    """One case per (K, kind): random spread of the norms (0, 3 or 6 decades either way) and
    global scale (1e-6..1e6)."""
    gen = torch.Generator().manual_seed(seed)
    for k, kind in itertools.product(ks, kinds):
        spread = [0.0, 3.0, 6.0][int(torch.randint(3, (1,), generator=gen))]
        scale = 10.0 ** int(torch.randint(-6, 7, (1,), generator=gen))
        n = int(torch.randint(1, 2 * k + 1, (1,), generator=gen)) if kind == "random" and k % 2 else None
        yield k, kind, gradients(k, kind, gen, spread, scale, n)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_mgda_kkt(solver, seed):
    for k, kind, J in cases(seed):
        W = MGDAWeighting(solver=solver)
        w = W(gram(J))
        assert torch.isfinite(w).all()
        assert abs(float(w.sum()) - k) < 1e-12 * k
        v = mgda_violation(J, w / k)
        assert v < TOL, (k, kind, v, w)
        assert float(W.info["kkt"]) < TOL


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_upgrad_kkt_of_every_projection(solver, seed):
    gen = torch.Generator().manual_seed(200 + seed)
    for k, kind, J in cases(seed):
        G = gram(J)
        W = UPGradWeighting(solver=solver)
        V = W.projections(G)
        eye = torch.eye(k, dtype=torch.float64)
        for i in range(k):
            assert cone_violation(J, eye[i], V[i]) < TOL, (k, kind, i, cone_violation(J, eye[i], V[i]))
        p = torch.rand(k, generator=gen, dtype=torch.float64)
        assert torch.allclose(UPGradWeighting(pref_vector=p, solver=solver)(G), p @ V, rtol=1e-13, atol=0)
        assert torch.allclose(W(G), V.sum(0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_dualproj_kkt(solver, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for k, kind, J in cases(seed):
        p = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1 if k % 2 else torch.ones(k, dtype=torch.float64)
        v = DualProjWeighting(pref_vector=p, solver=solver)(gram(J))
        assert cone_violation(J, p, v) < TOL, (k, kind, cone_violation(J, p, v))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("c,seed", [(0.2, 0), (0.5, 1), (0.9, 2), (1.5, 3)])
def test_cagrad_primal_dual_certificate(solver, seed, c):
    for k, kind, J in cases(seed):
        W = CAGradWeighting(c=c, rescale=0, solver=solver)
        w = W(gram(J))
        assert torch.isfinite(w).all()
        ball, gap = cagrad_certificate(J, w, c, [MGDAWeighting()(gram(J)) / k])
        assert ball < TOL and abs(gap) < TOL, (k, kind, ball, gap, W.info)


# ------------------------------------------------------------- independent references

@pytest.mark.parametrize("seed", range(4))
def test_mgda_matches_references(seed):
    gen = torch.Generator().manual_seed(seed)
    for k in range(2, 9):
        for kind in ("random", "conflict", "aligned", "hull0"):
            J = gradients(k, kind, gen, spread=1.0)
            w = MGDAWeighting()(gram(J)) / k
            ref = mgda_two(J) if k == 2 else mgda_reference(J)
            d, dref = w @ J, ref @ J
            assert (d - dref).norm() <= 1e-9 * J.norm(dim=1).max(), (k, kind)
            if k == 2:
                assert torch.allclose(w, ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_dual_cone_projections_match_nnls_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    for k in range(2, 9):
        for kind in ("random", "conflict", "duplicate", "rank2"):
            J = gradients(k, kind, gen, spread=1.0)
            G = gram(J)
            tol = 1e-10 * float(J.norm(dim=1).max()) * k
            d = combine(DualProjWeighting()(G), J)
            assert (d - cone_projection_reference(J, J.sum(0))).norm() <= tol
            d = combine(UPGradWeighting()(G), J)
            ref = sum(cone_projection_reference(J, J[i]) for i in range(k))
            assert (d - ref).norm() <= tol


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9])
def test_cagrad_two_tasks_matches_scalar_minimisation(c):
    gen = torch.Generator().manual_seed(5)
    for kind in ("conflict", "random", "aligned"):
        for _ in range(5):
            J = gradients(2, kind, gen, spread=1.0)
            d = combine(CAGradWeighting(c=c, rescale=0)(gram(J)), J) / 2
            dref, _ = cagrad_reference_two(J, c)
            assert (d - dref).norm() <= 1e-6 * J.norm(dim=1).max()


@pytest.mark.parametrize("rescale,factor", [(0, lambda c: 1.0), (1, lambda c: 1 + c * c), (2, lambda c: 1 + c)])
def test_cagrad_rescale_options(rescale, factor):
    gen = torch.Generator().manual_seed(6)
    G = gram(gradients(4, "conflict", gen))
    base = CAGradWeighting(c=0.4, rescale=0)(G)
    assert torch.allclose(CAGradWeighting(c=0.4, rescale=rescale)(G) * factor(0.4), base, rtol=1e-14)


def test_cagrad_degenerate_radius_gives_the_mean():
    gen = torch.Generator().manual_seed(7)
    J = gradients(3, "conflict", gen)
    assert torch.equal(CAGradWeighting(c=0.0, rescale=0)(gram(J)), torch.ones(3, dtype=torch.float64))
    J = torch.cat([J[:1], -J[:1]])                     # g0 = 0: no ball
    assert torch.equal(CAGradWeighting(c=0.5)(gram(J)), torch.ones(2, dtype=torch.float64) / 1.25)


# ------------------------------------------------------------- solvers agree, K = 16

def test_enumeration_and_active_set_agree():
    for k, kind, J in cases(10, kinds=("conflict", "aligned", "rank2", "hull0")):
        G = gram(J)
        rho = J.norm(dim=1).max()
        for make in (MGDAWeighting, UPGradWeighting, DualProjWeighting, lambda solver: CAGradWeighting(solver=solver)):
            a, b = make(solver="enumerate")(G), make(solver="active_set")(G)
            assert (combine(a - b, J)).norm() <= 1e-10 * rho * (a.abs().sum() + 1), (k, kind, make)


@pytest.mark.parametrize("kind", ["random", "conflict", "rank2", "hull0", "duplicate"])
def test_sixteen_tasks(kind):
    gen = torch.Generator().manual_seed(16)
    J = gradients(16, kind, gen, spread=3.0, n=40)
    G = gram(J)
    assert mgda_violation(J, MGDAWeighting()(G) / 16) < TOL
    assert cone_violation(J, torch.ones(16, dtype=torch.float64), DualProjWeighting()(G)) < TOL
    e = torch.zeros(16, dtype=torch.float64)
    e[3] = 1
    assert cone_violation(J, e, UPGradWeighting(pref_vector=e)(G)) < TOL
    ball, gap = cagrad_certificate(J, CAGradWeighting(c=0.5, rescale=0)(G), 0.5)
    assert ball < TOL and abs(gap) < TOL


def test_auto_is_enumeration_up_to_ten_tasks():
    gen = torch.Generator().manual_seed(8)
    G = gram(gradients(6, "conflict", gen, spread=2.0))
    for make in (MGDAWeighting, UPGradWeighting, DualProjWeighting, lambda solver: CAGradWeighting(solver=solver)):
        assert torch.equal(make(solver="auto")(G), make(solver="enumerate")(G))
