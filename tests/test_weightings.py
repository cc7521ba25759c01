"""roga_cuda.optim.weightings: the interface, input checks, non-finite and zero gradients,
scale equivariance, state, and every method against a float64 reference written from its
paper in vector space (the exact QP solvers have their own file, test_weightings_exact.py)."""
import itertools

import pytest
import torch
import torch.utils._python_dispatch

from roga_cuda.optim import weightings as W
from roga_cuda.optim.weightings import base as wbase

from test_weightings_refs import (KINDS, aligned_mtl_reference, combine, config_reference, gradients, gram,
                                  gradvac_reference, imtlg_reference, orders_reference, pcgrad_reference)

NAMES = ("sum", "pcgrad", "gradvac", "mgda", "cagrad", "upgrad", "dualproj", "imtl_g", "aligned_mtl",
         "nash_mtl", "random", "config")
STATEFUL = ("pcgrad", "gradvac", "nash_mtl", "random")
F64 = torch.float64


def make(name, **kw):
    if name in ("pcgrad", "gradvac", "random"):
        kw.setdefault("seed", 0)
    return W.make_weighting(name, **kw)


def case(k=4, kind="conflict", seed=0, **kw):
    return gradients(k, kind, torch.Generator().manual_seed(seed), **kw)


# ------------------------------------------------------------------------- interface

def test_registry_names_and_aliases():
    names = set(W.available())
    assert set(NAMES) <= names
    assert {"rlw", "nash", "imtlg", "alignedmtl"} <= names
    assert isinstance(W.make_weighting("RLW"), W.RandomWeighting)
    assert isinstance(W.make_weighting("Nash-MTL"), W.NashMTLWeighting)
    assert W.make_weighting("cagrad", c=0.3).c == 0.3
    assert isinstance(W.make_weighting(W.UPGradWeighting, solver="active_set"), W.UPGradWeighting)
    inst = W.MGDAWeighting()
    assert W.make_weighting(inst) is inst
    with pytest.raises(ValueError, match="unknown weighting"):
        W.make_weighting("pcgradd")
    with pytest.raises(TypeError, match="options"):
        W.make_weighting(inst, solver="enumerate")
    with pytest.raises(TypeError):
        W.make_weighting(3)
    with pytest.raises(ValueError, match="already registered"):
        W.register("mgda")(type("Dup", (W.Weighting,), {}))


@pytest.fixture
def custom_weighting():
    @W.register("test_last_task")
    class LastTask(W.Weighting):
        """A user weighting: all the weight on the last task, a counter as state."""

        def __init__(self, scale=1.0):
            super().__init__()
            self.scale, self.calls = scale, 0

        def weights(self, G):
            self.calls += 1
            w = torch.zeros(G.shape[0], dtype=G.dtype, device=G.device)
            w[-1] = self.scale
            return w

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    yield LastTask
    del wbase._REGISTRY["test_last_task"]


def test_user_weighting_by_name(custom_weighting):
    w = W.make_weighting("test_last_task", scale=2.0)
    assert isinstance(w, custom_weighting)
    out = w(torch.eye(3, dtype=torch.float32))
    assert out.dtype == F64 and out.tolist() == [0.0, 0.0, 2.0]
    assert w.state_dict() == {"calls": 1}
    assert "test_last_task" in W.available()


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(name):
    J = case(5, "random", seed=1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, F64):
        G = gram(J / J.norm()).to(dtype)
        w = make(name)(G)
        assert w.shape == (5,) and w.dtype == F64 and w.device == G.device
        assert torch.isfinite(w).all()


@pytest.mark.parametrize("name", NAMES)
def test_uses_the_symmetric_part(name):
    G = gram(case(4, "conflict", seed=2))
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.1
    assert torch.equal(make(name)(G + A - A.T), make(name)(G))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name):
    w = make(name)
    with pytest.raises(TypeError, match="torch.Tensor"):
        w([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match="floating"):
        w(torch.eye(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        w(torch.eye(2, dtype=torch.complex64))
    for bad in (torch.ones(3), torch.ones(2, 3), torch.ones(0, 0), torch.ones(1, 2, 3)):
        with pytest.raises(ValueError, match="shape"):
            w(bad)
    if name != "gradvac":
        with pytest.raises(ValueError, match="shape"):
            w(torch.ones(2, 3, 3))


@pytest.mark.parametrize("ctor,kw,match", [
    (W.CAGradWeighting, {"c": -0.1}, "c must"), (W.CAGradWeighting, {"c": float("nan")}, "c must"),
    (W.CAGradWeighting, {"rescale": 3}, "rescale"), (W.MGDAWeighting, {"solver": "qp"}, "solver"),
    (W.UPGradWeighting, {"pref_vector": [1.0, -1.0]}, "pref_vector"),
    (W.DualProjWeighting, {"pref_vector": [[1.0]]}, "pref_vector"),
    (W.GradVacWeighting, {"beta": 0.0}, "beta"), (W.GradVacWeighting, {"update": "sometimes"}, "update"),
    (W.NashMTLWeighting, {"max_norm": -1.0}, "max_norm"), (W.NashMTLWeighting, {"update_weights_every": 0}, "update_weights_every"),
    (W.NashMTLWeighting, {"max_iter": 0}, "max_iter"), (W.NashMTLWeighting, {"device_iter": 1.5}, "device_iter"),
    (W.RandomWeighting, {"distribution": "cauchy"}, "distribution"),
    (W.AlignedMTLWeighting, {"scale_mode": "max"}, "scale_mode"), (W.IMTLGWeighting, {"rtol": 1.0}, "rtol"),
    (W.ConFIGWeighting, {"rtol": -1e-3}, "rtol"), (W.ConFIGWeighting, {"length": "median"}, "length"),
])
def test_bad_options(ctor, kw, match):
    with pytest.raises(ValueError, match=match):
        ctor(**kw)


def test_pref_vector_length_is_checked_at_call():
    G = gram(case(3))
    for ctor in (W.UPGradWeighting, W.DualProjWeighting, W.AlignedMTLWeighting, W.ConFIGWeighting):
        with pytest.raises(ValueError, match="pref_vector"):
            ctor(pref_vector=[1.0, 1.0])(G)


# ------------------------------------------------------------------ non-finite and zero

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gram_gives_nan(name, bad):
    for k in (1, 2, 5):
        G = gram(case(k, "random", seed=k)).clone()
        G[k - 1, 0] = bad
        assert torch.isnan(make(name)(G)).all()


def test_non_finite_gram_keeps_state():
    G = gram(case(4, "conflict", seed=4))
    gv = W.GradVacWeighting(beta=0.5, seed=1)
    gv(G)
    before = gv.targets.clone()
    bad = G.clone()
    bad[1, 2] = float("nan")
    assert torch.isnan(gv(bad)).all()
    assert torch.equal(gv.targets, before)
    nash = W.NashMTLWeighting(max_norm=0, update_weights_every=1)
    good = nash(G)
    assert torch.isnan(nash(bad)).all()
    nash.update_weights_every = 2  # the next call reuses the stored weights
    nash.step = 1
    assert torch.equal(nash(G), good)


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nash_overflow_before_any_good_step_is_not_kept(monkeypatch, host, bad):
    """update_weights_every=3 and the first G overflows (AMP): that call gives NaN, and the
    next finite G gets fresh weights although they are not due (they used to be the NaN
    call's: zeros, no update, until the next due call). Then the schedule holds them.
    host=False: the CUDA path (no host branching), run on the CPU."""
    monkeypatch.setattr(W.base, "can_branch", lambda t: host)
    G = gram(case(4, "conflict", seed=4))
    G2 = gram(case(4, "random", seed=5))
    bad_G = G.clone()
    bad_G[1, 2] = bad_G[2, 1] = bad
    want, want2 = W.NashMTLWeighting(max_norm=0)(G), W.NashMTLWeighting(max_norm=0)(G2)
    nash = W.NashMTLWeighting(max_norm=0, update_weights_every=3)
    with _HostReads() as spy:
        got = [nash(g) for g in (bad_G, bad_G, G, bad_G, G2, G2, G2)]
    assert host or spy.seen == [], spy.seen
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all()  # calls 1, 2: none good yet
    torch.testing.assert_close(got[2], want, rtol=1e-12, atol=0)  # 3: not due, none good: fresh
    assert torch.isnan(got[3]).all()  # 4: due, but not finite: the kept ones stay
    torch.testing.assert_close(got[4], want, rtol=1e-12, atol=0)  # 5: not due: the kept ones
    torch.testing.assert_close(got[5], want, rtol=1e-12, atol=0)  # 6
    torch.testing.assert_close(got[6], want2, rtol=1e-12, atol=0)  # 7: due


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_all_zero_gradients(name, k):
    w = make(name)(torch.zeros(k, k))
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name", NAMES)
def test_one_zero_gradient(name):
    J = case(4, "conflict", seed=5)
    J[2] = 0
    w = make(name)(gram(J))
    assert torch.isfinite(w).all()


def test_zero_gradient_weights():
    J = case(4, "conflict", seed=6)
    J[1] = 0
    G = gram(J)
    assert W.MGDAWeighting()(G).tolist() == [0.0, 4.0, 0.0, 0.0]
    p = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=F64)
    assert W.UPGradWeighting(pref_vector=p)(G)[1] == 2.0
    assert W.DualProjWeighting(pref_vector=p)(G)[1] == 2.0
    for name in ("nash_mtl", "config", "imtl_g"):
        assert make(name)(G)[1] == 0.0


# ------------------------------------------------------------------------ scale

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["conflict", "random", "duplicate", "rank2"])
def test_scale_equivariance(name, kind):
    """Every method gives the same weights (the same update direction) at any global scale
    of the gradients; Nash-MTL's weights scale as 1/|g| (its |d| is fixed)."""
    J = case(5, kind, seed=7, spread=2.0)
    opts = {"max_norm": 0.0} if name == "nash_mtl" else {}
    ref = make(name, **opts)(gram(J))
    size = float(ref.abs() @ J.norm(dim=1))
    for s in (1e-6, 1e-3, 1e3, 1e6):
        w = make(name, **opts)(gram(J * s))
        if name == "nash_mtl":
            w = w * s
        # dependent gradients leave the weights of the exact solvers free along null
        # directions of G: compare the update itself; unique weights must agree as well
        assert (combine(w - ref, J)).norm() <= 1e-10 * size, (s, w, ref)
        if kind in ("conflict", "random"):
            assert torch.allclose(w, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max())), (s, w, ref)


# ------------------------------------------------------------------------ state

@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip(name):
    opts = {"update_weights_every": 3} if name == "nash_mtl" else {}
    gen = torch.Generator().manual_seed(8)
    Gs = [gram(gradients(5, "conflict", gen)) for _ in range(8)]
    a = make(name, **opts)
    for G in Gs[:3]:
        a(G)
    state = a.state_dict()
    b = make(name, **opts)
    b.load_state_dict(state)
    for G in Gs[3:]:
        assert torch.equal(a(G), b(G))


def test_reset_and_mismatched_state():
    G = gram(case(4))
    gv = W.GradVacWeighting()
    gv(G)
    with pytest.raises(ValueError, match="targets are for"):
        gv(gram(case(3)))
    gv.reset()
    assert gv.targets is None
    gv(gram(case(3)))
    nash = W.NashMTLWeighting()
    nash(G)
    with pytest.raises(ValueError, match="saved weights"):
        nash(gram(case(3)))
    nash.reset()
    assert nash.step == 0 and nash.alpha is None
    with pytest.raises(ValueError, match="keeps no state"):
        W.MGDAWeighting().load_state_dict({"x": 1})
    W.MGDAWeighting().load_state_dict({})


# -------------------------------------------------------------------- references

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", range(2, 9))
def test_pcgrad_matches_the_paper(k, seed):
    draw = orders_reference(k, seed=11 + seed)
    pc = W.PCGradWeighting(seed=11 + seed)
    gen = torch.Generator().manual_seed(k + 100 * seed)
    for kind, spread in itertools.product(KINDS, (0.0, 3.0, 6.0)):
        J = gradients(k, kind, gen, spread=spread)
        d = combine(pc(gram(J)), J)
        ref = pcgrad_reference(J, draw())
        assert (d - ref).norm() <= 1e-12 * J.norm(dim=1).sum(), (kind, spread)


def test_pcgrad_projects_at_any_scale():
    """No absolute epsilon: gradients of norm 1e-12 are projected like those of norm 1."""
    J = case(3, "conflict", seed=12)
    a = W.PCGradWeighting(seed=1)(gram(J))
    b = W.PCGradWeighting(seed=1)(gram(J * 1e-12))
    assert torch.allclose(a, b, rtol=1e-12)
    assert not torch.equal(a, torch.ones(3, dtype=F64))


def test_pcgrad_never_projects_on_a_zero_norm(monkeypatch):
    """A G whose diagonal entry is 0 next to a negative entry (not a Gram matrix of real
    vectors: rounding, or a user's G): no projection on that task, on the host path (CPU) and
    the device path alike, instead of a division by zero."""
    G = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 0.0, -0.1], [0.2, -0.1, 2.0]], dtype=F64)
    out = {}
    for host in (True, False):
        monkeypatch.setattr(wbase, "can_branch", lambda t, host=host: host)
        out[host] = W.PCGradWeighting(seed=3)(G)
    assert torch.isfinite(out[True]).all() and torch.allclose(out[True], out[False], rtol=1e-14, atol=0)


@pytest.mark.parametrize("spread", [2.0, 6.0])
@pytest.mark.parametrize("update", ["always", "violated"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_gradvac_matches_the_paper_over_steps_and_groups(k, update, spread):
    """Steps through the kinds of case (duplicated, rank-deficient and zero gradients
    included) with EMA targets, one group and three groups (blocks of coordinates, LibMTL's
    layer groups), against the vector-space reference with the same orders. (Exactly
    opposite gradients have their own test: there the update's sqrt(1 - cos^2) turns a
    rounding of cos into sqrt(eps), which the targets would carry to later steps.)"""
    kinds = [kd for kd in KINDS if kd not in ("opposite", "hull0")]
    gen = torch.Generator().manual_seed(20 + k)
    n = 30
    for blocks in ([(0, n)], [(0, 7), (7, 19), (19, n)]):
        draw = orders_reference(k, seed=5)
        gv = W.GradVacWeighting(beta=0.3, update=update, seed=5)
        targets = torch.zeros(len(blocks), k, k, dtype=F64)
        for step in range(2 * len(kinds)):
            J = gradients(k, kinds[step % len(kinds)], gen, spread=spread, n=n)
            Gs = torch.stack([gram(J[:, lo:hi]) for lo, hi in blocks])
            w = gv(Gs if len(blocks) > 1 else Gs[0])
            if len(blocks) == 1:
                w = w.unsqueeze(0)
            d = torch.cat([w[b] @ J[:, lo:hi] for b, (lo, hi) in enumerate(blocks)])
            ref = gradvac_reference(J, targets, 0.3, draw(), blocks, update)
            assert (d - ref).norm() <= 1e-11 * J.norm(dim=1).sum(), (step, blocks)
            assert torch.allclose(gv.targets, targets, atol=1e-13)


@pytest.mark.parametrize("kind", ["opposite", "hull0"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_gradvac_with_exactly_opposite_gradients(k, kind):
    """cos = -1 (and, for K = 2, hull0's -0.7 multiple): the update's sqrt(1 - cos^2) has an
    infinite slope there, so a rounding of cos (1e-16) moves the result by sqrt(eps)
    relative; Gram space and vector space agree to that, on a first step from zero targets."""
    gen = torch.Generator().manual_seed(70 + k)
    for spread in (0.0, 3.0, 6.0):
        J = gradients(k, kind, gen, spread=spread, n=30)
        draw = orders_reference(k, seed=6)
        w = W.GradVacWeighting(beta=0.3, seed=6)(gram(J))
        ref = gradvac_reference(J, torch.zeros(1, k, k, dtype=F64), 0.3, draw(), [(0, 30)], "always")
        assert torch.isfinite(w).all()
        assert (combine(w, J) - ref).norm() <= 1e-7 * J.norm(dim=1).sum(), spread


def test_gradvac_cosine_is_right_at_tiny_scales():
    """The old 1e-20 clamp on |g_i|^2|g_j|^2 broke the cosine below |g| ~ 1e-5; now the
    weights (and the targets) do not depend on the scale at all."""
    J = case(3, "conflict", seed=13)
    for s in (1e-8, 1e-150):
        a, b = W.GradVacWeighting(beta=0.5, seed=2), W.GradVacWeighting(beta=0.5, seed=2)
        for _ in range(3):
            wa, wb = a(gram(J)), b(gram(J * s))
            assert torch.allclose(wa, wb, rtol=1e-12)
        assert torch.allclose(a.targets, b.targets, atol=1e-14)


def test_gradvac_skips_pairs_without_a_cosine():
    J = case(3, "conflict", seed=14)
    J[1] = 0
    gv = W.GradVacWeighting(beta=0.5, seed=3)
    gv(gram(J))
    assert gv.targets[0, :, 1].abs().max() == 0 and gv.targets[0, 1, :].abs().max() == 0
    assert gv.targets[0, 0, 2] != 0


def test_gradvac_groups_helper():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            self.scale = torch.nn.Parameter(torch.ones(2))   # owned by a non-leaf module
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    net = Net()
    layer = W.gradvac_groups(net, "layer")
    assert [len(g) for g in layer] == [2, 2, 2, 1]
    assert layer[-1][0] is net.scale
    every = [p for p in net.parameters() if p.requires_grad]
    assert sorted(map(id, itertools.chain(*layer))) == sorted(map(id, every))
    assert [len(g) for g in W.gradvac_groups(net, "matrix")] == [1] * len(every)
    assert len(W.gradvac_groups(net, "model")) == 1
    with pytest.raises(ValueError, match="kind"):
        W.gradvac_groups(net, "block")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", range(2, 9))
def test_imtlg_matches_the_paper(k, seed):
    gen = torch.Generator().manual_seed(30 + k + 100 * seed)
    for kind, spread in itertools.product(("random", "conflict", "aligned"), (0.0, 1.0, 3.0, 6.0)):
        J = gradients(k, kind, gen, spread=spread)
        w = W.IMTLGWeighting()(gram(J))
        assert abs(float(w.sum()) - k) < 1e-10 * k
        d = combine(w, J) / k
        # The defining conditions, in vector space: equal projections onto every u_i (with
        # sum w = K above; unique for independent gradients).
        p = J @ d / J.norm(dim=1)
        assert float(p.max() - p.min()) <= 1e-12 * float(d.norm()), (kind, spread)
        if spread <= 1.0:  # the paper's closed form, D U' inverted in vector space, loses all
            # its digits at larger spreads (its projections then differ by up to 2 |d|)
            ref = imtlg_reference(J)
            assert (d - ref).norm() <= 1e-8 * ref.norm(), kind


def test_imtlg_equal_projections_with_dependent_gradients():
    J = case(5, "duplicate", seed=15)
    d = combine(W.IMTLGWeighting()(gram(J)), J)
    proj = J @ d / J.norm(dim=1)
    assert torch.allclose(proj, proj[0].expand(5), rtol=1e-9)
    opposite = torch.stack([J[0], -3 * J[0]])   # no direction has equal projections
    assert W.IMTLGWeighting()(gram(opposite)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("kind", ["random", "conflict", "aligned", "rank2", "duplicate"])
def test_aligned_mtl_matches_the_paper(mode, kind, seed):
    gen = torch.Generator().manual_seed(40 + seed)
    for k, spread in itertools.product(range(2, 9), (0.0, 3.0, 6.0)):
        J = gradients(k, kind, gen, spread=spread)
        for p in (torch.ones(k, dtype=F64), torch.rand(k, generator=gen, dtype=F64)):
            w = W.AlignedMTLWeighting(pref_vector=p, scale_mode=mode)(gram(J))
            ref = aligned_mtl_reference(J, p, mode)
            assert (combine(w, J) - ref).norm() <= 1e-9 * ref.norm(), (k, p)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", range(2, 9))
def test_config_matches_the_paper(k, seed):
    gen = torch.Generator().manual_seed(50 + k + 100 * seed)
    for kind, spread in itertools.product(("random", "conflict", "aligned", "duplicate", "zero"), (0.0, 3.0, 6.0)):
        J = gradients(k, kind, gen, spread=spread)
        for p in (torch.ones(k, dtype=F64), torch.rand(k, generator=gen, dtype=F64) + 0.5):
            d = combine(W.ConFIGWeighting(pref_vector=p)(gram(J)), J)
            ref = config_reference(J, p)
            assert (d - ref).norm() <= 1e-8 * ref.norm(), (kind, p)


@pytest.mark.parametrize("length", ["min", "max", "harmonic", "arithmetic", "geometric", 2])
def test_config_length_models(length):
    gen = torch.Generator().manual_seed(55)
    for kind in ("random", "conflict"):
        J = gradients(4, kind, gen, spread=1.0)
        d = combine(W.ConFIGWeighting(length=length)(gram(J)), J)
        ref = config_reference(J, torch.ones(4, dtype=F64), length)
        assert (d - ref).norm() <= 1e-8 * ref.norm(), kind
    with pytest.raises(ValueError, match="task index"):
        W.ConFIGWeighting(length=7)(gram(J))


def test_config_direction_has_equal_cosines():
    J = case(4, "conflict", seed=16, spread=2.0)
    d = combine(W.ConFIGWeighting()(gram(J)), J)
    cos = J @ d / (J.norm(dim=1) * d.norm())
    assert torch.allclose(cos, cos[0].expand(4), rtol=1e-10) and cos[0] > 0


@pytest.mark.parametrize("k", range(1, 9))
def test_nash_mtl_solves_the_bargaining_equation(k):
    """alpha_i <g_i, d> = 1 for every task, alpha > 0 (the paper's Eq. 4), in vector space."""
    gen = torch.Generator().manual_seed(60 + k)
    for kind, spread in itertools.product(("random", "conflict", "aligned", "duplicate"), (0.0, 3.0, 6.0)):
        J = gradients(k, kind, gen, spread=spread)
        m = W.MGDAWeighting()(gram(J)) / k
        if float(m @ gram(J) @ m) < 1e-16 * float(gram(J).diagonal().max()):
            continue  # (nearly) Pareto-stationary: no bargaining solution
        nash = W.NashMTLWeighting(max_norm=0.0)
        a = nash(gram(J))
        assert (a > 0).all() and bool(nash.info["converged"])
        res = a * (J @ combine(a, J)) - 1
        assert res.abs().max() < 1e-12, (kind, spread, res)


def test_nash_mtl_options():
    J = case(4, "random", seed=17)
    G = gram(J)
    free = W.NashMTLWeighting(max_norm=0.0)(G)
    assert abs(float(free @ G @ free) - 4) < 1e-12          # |d|^2 = K at the solution
    clipped = W.NashMTLWeighting(max_norm=1.0)(G)
    assert torch.allclose(clipped, free / 2, rtol=1e-14)
    assert torch.equal(W.NashMTLWeighting(max_norm=5.0)(G), free)
    every = W.NashMTLWeighting(max_norm=0.0, update_weights_every=3)
    first = every(G)
    G2 = gram(case(4, "conflict", seed=18))
    assert torch.equal(every(G2), first) and torch.equal(every(G2), first)
    assert not torch.equal(every(G2), first)                 # 4th call: recomputed
    assert every.step == 4


def test_nash_mtl_without_a_solution_does_not_move():
    J = case(4, "hull0", seed=19)                             # 0 inside the hull: no bargaining solution
    nash = W.NashMTLWeighting(max_norm=0.0)
    assert nash(gram(J)).abs().max() == 0 and not bool(nash.info["converged"])
    J = case(3, "random", seed=19)
    J[0] = 0                                                  # a zero task is left out
    a = W.NashMTLWeighting(max_norm=0.0)(gram(J))
    assert a[0] == 0 and ((a[1:] * (J[1:] @ combine(a, J)) - 1).abs().max() < 1e-12)


@pytest.mark.parametrize("dist", ["normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli"])
def test_random_weighting_draws(dist):
    k = 5
    rw = W.RandomWeighting(distribution=dist, seed=21)
    gen = torch.Generator().manual_seed(21)
    for _ in range(20):
        w = rw(torch.eye(k))
        if dist == "normal":
            ref = torch.softmax(torch.randn(k, generator=gen, dtype=F64), 0)
        elif dist == "uniform":
            ref = torch.softmax(torch.rand(k, generator=gen, dtype=F64), 0)
        elif dist == "dirichlet":
            e = -torch.log(1 - torch.rand(k, generator=gen, dtype=F64))
            ref = e / e.sum()
        elif dist == "bernoulli":
            b = torch.zeros(k, dtype=torch.bool)
            while not b.any():
                b = torch.rand(k, generator=gen, dtype=F64) < 0.5
            ref = b.to(F64) / b.sum()
        else:
            ref = torch.zeros(k, dtype=F64)
            ref[int(torch.randint(k, (1,), generator=gen))] = 1.0
        assert torch.allclose(w, k * ref, rtol=1e-14)
        assert (w >= 0).all() and abs(float(w.sum()) - k) < 1e-12


@pytest.mark.parametrize("dist", ["bernoulli", "constrained_bernoulli"])
def test_random_subsets_are_equally_likely(dist):
    """K = 2: "bernoulli" gives each of the three non-empty subsets 1/3 of the draws (filling
    an empty draw with one task instead made singletons 3/8 each); "constrained_bernoulli"
    one task, each 1/2. 6000 draws: a frequency's standard error is about 0.006."""
    rw = W.RandomWeighting(distribution=dist, seed=3)
    draws = [tuple((rw(torch.eye(2)) > 0).tolist()) for _ in range(6000)]
    subsets = [(True, False), (False, True)] + ([(True, True)] if dist == "bernoulli" else [])
    assert set(draws) == set(subsets)
    for sub in subsets:
        assert abs(draws.count(sub) / len(draws) - 1 / len(subsets)) < 0.03, (sub, draws.count(sub))


def test_sum_weighting():
    assert W.SumWeighting()(gram(case(3))).tolist() == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------- devices

SYNC_FREE = ("sum", "pcgrad", "gradvac", "mgda", "cagrad", "upgrad", "dualproj", "nash_mtl", "random")


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a tensor value on the host (a sync on CUDA) or have
    data-dependent output shapes."""
    FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.FORBIDDEN:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", SYNC_FREE)
@pytest.mark.parametrize("k", [2, 5, 10])
def test_device_path_reads_no_host_values(name, k, monkeypatch):
    """The code path taken for CUDA tensors (every branch computed, selected with
    torch.where), run on CPU under a dispatch spy: no .item()/bool()/nonzero anywhere.
    Complements the CUDA test below, which needs a GPU."""
    J = case(k, "conflict", seed=23, spread=2.0)
    Jz = J.clone()
    Jz[k - 1] = 0  # the zero-gradient branches too
    for G in (gram(J), gram(Jz)):
        monkeypatch.setattr(wbase, "can_branch", lambda t: True)
        host = make(name)(G)
        monkeypatch.setattr(wbase, "can_branch", lambda t: False)
        w = make(name)
        with _HostReads() as spy:
            dev = w(G)
        assert spy.seen == [], spy.seen
        assert torch.allclose(dev, host, rtol=1e-12, atol=1e-14), (dev, host)


def test_host_read_spy_sees_the_active_set():
    """The spy works: K > 10 exact solvers run host loops (documented: one sync on CUDA)."""
    with _HostReads() as spy:
        W.MGDAWeighting()(gram(case(12, "conflict", seed=24)))
    assert spy.seen



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu_and_syncs_only_where_documented(name):
    host_sync = {"imtl_g", "aligned_mtl", "config"}                 # eigh
    J = case(6, "conflict", seed=22, spread=2.0)
    G = gram(J).float()
    ref = make(name)(G)
    dev = make(name)
    Gc = G.cuda()
    dev(Gc)                                                          # warm-up: caches, lazy init
    dev = make(name)
    torch.cuda.synchronize()
    if name not in host_sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        w = dev(Gc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert w.device.type == "cuda"
    assert torch.allclose(w.cpu(), ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max() + 1))
