"""Agreement with torchjd's weightings on the same Gram matrices, wherever torchjd is exact.

torchjd is an optional test peer (``pip install "torchjd[quadprog-projector,cagrad]"``, in the
``test`` extra; CAGrad's cross-check needs the cvxpy of ``[cagrad]``). Each test skips on its
own when a peer is missing. torchjd returns mean-form weights for MGDA-like methods (ours
are K times theirs, see each class). Not compared: torchjd's MGDA (Frank-Wolfe, stops at a 1e-3 step) and Nash-MTL (cvxpy rounds
stopping at a 1e-3 residual) are not exact; its PCGrad draws a permutation of all K tasks
from the global RNG, so only K = 2 matches draw for draw.
"""
import pytest
import torch

from roga_cuda.optim import weightings as W

from test_weightings_refs import TOL, cagrad_certificate, combine, gradients, gram

F64 = torch.float64


def well_conditioned(k, seed, kind="conflict"):
    """Independent gradients (G positive definite, as torchjd's quadprog projector needs)."""
    J = gradients(k, kind, torch.Generator().manual_seed(seed), spread=1.0)
    return J, gram(J)


def tjd():
    return pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("k", range(2, 9))
def test_upgrad_and_dualproj(k):
    A = tjd()
    pytest.importorskip("quadprog")
    from torchjd.linalg import QuadprogProjector
    exact = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)   # no normalisation floor, no ridge
    for seed in range(3):
        J, G = well_conditioned(k, seed)
        p = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
        assert torch.allclose(W.UPGradWeighting()(G), k * A.UPGradWeighting(projector=exact)(G), rtol=1e-8, atol=1e-10)
        assert torch.allclose(W.DualProjWeighting()(G), k * A.DualProjWeighting(projector=exact)(G), rtol=1e-8, atol=1e-10)
        assert torch.allclose(W.UPGradWeighting(pref_vector=p)(G), A.UPGradWeighting(pref_vector=p, projector=exact)(G),
                              rtol=1e-8, atol=1e-10)
        assert torch.allclose(W.DualProjWeighting(pref_vector=p)(G), A.DualProjWeighting(pref_vector=p, projector=exact)(G),
                              rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", range(2, 9))
def test_imtlg(k):
    A = tjd()
    for seed in range(3):
        J, G = well_conditioned(k, seed, kind="random")
        assert torch.allclose(W.IMTLGWeighting()(G), k * A.IMTLGWeighting()(G), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_aligned_mtl(k, mode):
    A = tjd()
    for seed in range(3):
        J, G = well_conditioned(k, seed)
        p = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64)
        ours = W.AlignedMTLWeighting(scale_mode=mode)(G)
        assert torch.allclose(ours, k * A.AlignedMTLWeighting(scale_mode=mode)(G), rtol=1e-8, atol=1e-10)
        ours = W.AlignedMTLWeighting(pref_vector=p, scale_mode=mode)(G)
        assert torch.allclose(ours, A.AlignedMTLWeighting(pref_vector=p, scale_mode=mode)(G), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", range(2, 9))
def test_config_aggregator(k):
    """torchjd's ConFIG is an aggregator of the matrix: compare the aggregated vectors."""
    A = tjd()
    for seed in range(3):
        J, G = well_conditioned(k, seed, kind="random")
        p = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5
        assert torch.allclose(combine(W.ConFIGWeighting()(G), J), A.ConFIG()(J), rtol=1e-8, atol=1e-10)
        assert torch.allclose(combine(W.ConFIGWeighting(pref_vector=p)(G), J), A.ConFIG(pref_vector=p)(J),
                              rtol=1e-8, atol=1e-10)


def test_random_same_seed_same_draws():
    A = tjd()
    for k in (2, 5):
        ours = W.RandomWeighting(seed=123)
        torch.manual_seed(123)
        theirs = A.RandomWeighting()
        for _ in range(5):
            J = torch.randn(k, 7, dtype=F64, generator=torch.Generator().manual_seed(k))
            assert torch.allclose(ours(gram(J)), k * theirs(J), rtol=1e-14)


def test_pcgrad_two_tasks():
    A = tjd()
    for seed in range(5):
        J, G = well_conditioned(2, seed)
        assert torch.allclose(W.PCGradWeighting()(G), A.PCGradWeighting()(G), rtol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_gradvac_same_seed_over_steps(k):
    """torchjd draws one randperm(K - 1) per task from the global RNG, as ours from its own
    generator: seeded alike, the orders match; eps=0 makes torchjd's cosine exact."""
    A = tjd()
    gen = torch.Generator().manual_seed(k)
    ours = W.GradVacWeighting(beta=0.3, seed=7)
    torch.manual_seed(7)
    theirs = A.GradVacWeighting(beta=0.3, eps=0.0)
    for step in range(5):
        J = gradients(k, ["conflict", "random"][step % 2], gen, spread=1.0)
        G = gram(J)
        if k == 2:
            torch.randperm(1)  # torchjd draws for K = 2 as well (keep the RNG streams aligned)
            torch.randperm(1)
        assert torch.allclose(ours(G), theirs(G), rtol=1e-10, atol=1e-12), step


@pytest.mark.parametrize("c", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_cagrad_against_clarabel(k, c):
    """torchjd solves CAGrad's SOCP with Clarabel (an interior-point method, ~1e-6 here):
    the updates agree to its accuracy, and ours closes the duality gap where its leaves
    ~1e-6 (ours without rescale, divided by K: torchjd's mean form)."""
    A = tjd()
    pytest.importorskip("cvxpy")
    for seed in range(3):
        J, G = well_conditioned(k, seed)
        J = J / J.norm()
        G = gram(J)                          # torchjd normalises with an absolute 1e-4 floor
        theirs = A.CAGradWeighting(c=c, norm_eps=0.0)(G)
        ours = W.CAGradWeighting(c=c, rescale=0)(G)
        assert (combine(ours / k - theirs, J)).norm() < 1e-4
        ball, gap = cagrad_certificate(J, ours, c)
        their_ball, their_gap = cagrad_certificate(J, k * theirs, c)
        assert ball < TOL and abs(gap) < TOL
        assert abs(gap) <= abs(their_gap) + TOL
