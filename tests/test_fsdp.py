"""The optimizers and the DTensor rules of the ops on FSDP2 (``fully_shard``) models: gloo,
2 processes on CPU.

One pair of processes runs everything (the start-up, imports and rendezvous are most of the
cost), each scenario caught on its own so that one failure does not hide the others; the
tests below check what the workers wrote. Rendezvous goes through a file in a temporary
directory (no TCP port to clash), and the run has a deadline (a collective that hangs fails
the tests instead of the CI job).

Per optimizer (SAM with clipping, RoGA with K=3 domains, PCGrad's pcgrad and its MGDA solver
with clipping, GradientAggregator's UPGrad solver), on a small BatchNorm-free model whose parameters shard unevenly (one shard is
empty on rank 1):

* parameters after 4 steps equal a single-process float64 run of the same math, written out
  below, on the concatenated batch, on both ranks;
* the optimizer's buffers (backups, accumulators, stashed task gradients, base state) are
  DTensors whose local storage is the local shard: about half of the replicated size;
* a sharded checkpoint (torch.distributed.checkpoint) saved after step 2 and loaded into a
  fresh model and optimizer gives bit for bit the same step 4;
* the same checkpoint loaded by ONE process (a one-rank mesh: DCP reshards it), which then
  trains on the whole batch, also ends at the single-process run's step 4;
* the optimizers add only their reductions' all-reduces to what FSDP does (no DDP-style
  all-reduce of gradients FSDP already reduce-scattered);
* AMP (GradScaler) with an inf/nan in one rank's shard only: both ranks skip that step and
  keep the same scale.

Every other weighting (GradientAggregator, K = 3) is checked against its own single-process
run on the whole batch (weights and parameters after two steps).
"""
import copy
import math
import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from util import run_scenarios, spawn_and_wait

WORLD = 2
STEPS = 4
SAVE_AFTER = 2  # checkpoint after this many steps, resume for the rest
K_ROGA = 3
KINDS = ("sam", "roga", "pcgrad", "mgda", "upgrad")
AGGREGATORS = ("pcgrad", "mgda", "upgrad")
HYPER = dict(rho=0.1, alpha=0.01, max_norm=0.4)
DEADLINE_S = 240


# ------------------------------------------------------------------ model and data

class _Poison(torch.autograd.Function):
    """Identity whose backward writes inf into column 0 of the gradient: the gradients of
    row 0 of the first layer become non-finite, which lands in rank 0's shard only."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[:, 0] = math.inf
        return g


class Net(nn.Module):
    """Linear-Tanh-Linear times a per-class gain: no BatchNorm. Sharded over 2 ranks, the
    (3, 12) weight and the (3,) bias split 2/1 rows and the (1, 3) gain 1/0 (empty on rank 1)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 12)
        self.l2 = nn.Linear(12, 3)
        self.gain = nn.Parameter(torch.ones(1, 3))
        self.poison = False

    def forward(self, x):
        h = self.l1(x)
        if self.poison:
            h = _Poison.apply(h)
        return self.l2(torch.tanh(h)) * self.gain


def net():
    torch.manual_seed(0)
    return Net().double()


def data(step, domain=0, n=8):
    """The global batch of a step (and domain)."""
    g = torch.Generator().manual_seed(1000 * step + domain)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def task_losses(out, y):
    """The aggregators' two tasks on one forward: the second (another label) conflicts with the
    first at every step of these runs, so PCGrad's and UPGrad's projections change the sum."""
    return [F.cross_entropy(out, y), 0.5 * F.cross_entropy(out, (y + 1) % 3)]


# ------------------------------------------------------------------ the sharded run (workers)

def _optimizer(kind, params):
    from roga_cuda import GradientAggregator, PCGrad, RoGA, SAM
    if kind == "sam":
        return SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho=HYPER["rho"], max_grad_norm=HYPER["max_norm"])
    if kind == "roga":
        return RoGA(params, torch.optim.AdamW, lr=0.01, weight_decay=0.01, rho=HYPER["rho"], alpha=HYPER["alpha"],
                    num_domains=K_ROGA)
    if kind == "pcgrad":
        return PCGrad(params, torch.optim.SGD, lr=0.1, momentum=0.9, method="pcgrad")
    if kind == "mgda":
        return PCGrad(params, torch.optim.Adam, lr=0.01, method="mgda", max_grad_norm=HYPER["max_norm"])
    return GradientAggregator(params, torch.optim.SGD, lr=0.1, momentum=0.5, method="upgrad")


def _sharded_net():
    from torch.distributed.fsdp import fully_shard
    model = net()
    fully_shard(model.l1)
    fully_shard(model.l2)
    fully_shard(model)
    return model


def _local(x, y, rank):
    """This rank's share of the global batch (all of it on a one-process group)."""
    w = dist.get_world_size()
    return x[rank::w], y[rank::w]


def _step(kind, model, opt, s, rank, scaler=None, poison=False, probe=None):
    """One training step on this rank's half of the batch. ``poison``: an inf in the
    gradient of the step's last backward pass (this rank only). ``probe(opt)`` is called
    in the middle of the step, where the optimizer holds its per-step buffers."""
    sc = (lambda l: scaler.scale(l)) if scaler is not None else (lambda l: l)
    if kind == "sam":
        x, y = _local(*data(s), rank)
        sc(F.cross_entropy(model(x), y)).backward()
        opt.first_step(zero_grad=True)
        if probe:
            probe(opt)
        model.poison = poison
        sc(F.cross_entropy(model(x), y)).backward()
        model.poison = False
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.second_step()
        opt.zero_grad()
    elif kind == "roga":
        opt.zero_grad()
        for d in range(K_ROGA):
            x, y = _local(*data(s, d), rank)
            sc(F.cross_entropy(model(x), y)).backward()
            opt.perturb(scaler=scaler)
            model.poison = poison and d == K_ROGA - 1
            sc(F.cross_entropy(model(x), y)).backward()
            model.poison = False
            opt.accumulate()
            if probe and d == 1:
                probe(opt)
        opt.step(scaler=scaler)
        if scaler is not None:
            scaler.update()
    else:
        x, y = _local(*data(s), rank)
        model.poison = poison
        out = model(x)
        model.poison = False
        opt.zero_grad()
        # pcgrad: with model=, FSDP keeps the parameters gathered between the two passes
        opt.backward(task_losses(out, y), align=False, scaler=scaler, model=model if kind == "pcgrad" else None)
        if probe:
            probe(opt)
        opt.align()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def _full(model):
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def _buffers(opt):
    """The optimizer's per-parameter buffers at the probe point, by kind."""
    out = {}
    store = getattr(getattr(opt, "_perturber", None), "_store", {})
    for kind, entries in store.items():
        out[kind] = [(p, buf) for p, buf in entries.values()]
    lay = opt._layout()
    t = opt._t  # the per-step state
    if getattr(t, "acc", None):
        out["acc"] = [(p, a) for (_, ps) in lay.parts for p, a in zip(ps, t.acc.get(id(ps), []))]
    if getattr(t, "stash", None):
        out["stash"] = [(p, g) for task in t.stash for p, g in zip(lay.params, task)]
    return out


def _memory(pairs):
    """(bytes of the distinct local storages behind the buffers, bytes of the parameters'
    padded local shards, bytes of the whole replicated parameters); each buffer checked to
    be sharded exactly like its parameter."""
    from torch.distributed.tensor import DTensor
    storages, local, full = {}, 0, 0
    for p, b in pairs:
        assert isinstance(b, DTensor), f"a buffer is a {type(b).__name__}, not a DTensor"
        assert b.placements == p.placements and b._local_tensor.shape == p._local_tensor.shape, (b, p)
        st = b._local_tensor.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        rows = -(-p.shape[0] // WORLD) if p.dim() else 1  # FSDP pads dim 0 to a multiple of the world
        local += rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) * p.element_size()
        full += p.numel() * p.element_size()
    return sum(storages.values()), local, full


class _AllReduces:
    """Counts torch.distributed.all_reduce calls (the only collective the optimizers use)."""

    def __init__(self):
        self.n = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(*a, **k):
            self.n += 1
            return self._orig(*a, **k)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _run_kind(kind, rank, tmp):
    import torch.distributed.checkpoint as dcp

    from roga_cuda.optim.checkpoint import get_state_dict, set_state_dict
    res = {}
    model = _sharded_net()
    opt = _optimizer(kind, model.parameters())
    mem = {}

    def probe(o):
        for name, pairs in _buffers(o).items():
            mem[name] = _memory(pairs)

    ckpt = os.path.join(tmp, f"ckpt-{kind}")
    per_step = []
    for s in range(STEPS):
        with _AllReduces() as c:
            _step(kind, model, opt, s, rank, probe=probe if s == 0 else None)
        per_step.append(c.n)
        if s + 1 == SAVE_AFTER:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    state = opt.base_optimizer.state
    mem["base state"] = _memory([(p, t) for p in opt._params() for k, t in state[p].items() if k != "step"])
    res.update(final=_full(model), memory=mem, all_reduces=per_step)
    if kind in AGGREGATORS:
        res["stats"] = (opt.stats["steps"], float(opt.conflict_rate))

    # resume: a fresh model and optimizer, loaded from the checkpoint
    model2 = _sharded_net()
    opt2 = _optimizer(kind, model2.parameters())
    msd, osd = get_state_dict(model2, opt2)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, loaded["model"], loaded["optim"])
    for s in range(SAVE_AFTER, STEPS):
        _step(kind, model2, opt2, s, rank)
    res["resumed"] = _full(model2)
    if kind in AGGREGATORS:
        res["resumed_stats"] = (opt2.stats["steps"], float(opt2.conflict_rate))

    # AMP: the last backward of step 1 overflows on rank 0's shard only
    model3 = _sharded_net()
    opt3 = _optimizer(kind, model3.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    snaps = []
    for s in range(3):
        _step(kind, model3, opt3, s, rank, scaler=scaler, poison=(s == 1 and rank == 0))
        snaps.append(_full(model3))
    res["amp"] = dict(snaps=snaps, scale=float(scaler.get_scale()))
    return res


def _check_rules(rank):
    """The DTensor rules of the ops, against the whole tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from roga_cuda import ops
    out = {}
    g = torch.Generator().manual_seed(7)  # the same whole tensors on both ranks
    shapes = [(6, 4), (5,), (1, 3), (3,), (0, 2)]
    lists = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(3)]
    rep = [torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3)]  # replicated: counted once
    mesh = init_device_mesh("cpu", (WORLD,))
    for name, shape, place in [("1d", (WORLD,), [Shard(0)]), ("2d-shard-rep", (WORLD, 1), [Shard(0), Replicate()]),
                               ("2d-rep-shard", (1, WORLD), [Replicate(), Shard(0)]),
                               ("2d-hsdp", (WORLD, 1), [Replicate(), Shard(0)])]:
        m = mesh if shape == (WORLD,) else init_device_mesh("cpu", shape)
        dl = [[distribute_tensor(t, m, place) for t in ls] + [distribute_tensor(r, m, [Replicate()] * m.ndim)]
              for ls, r in zip(lists, rep)]
        with _AllReduces() as c:
            n, per = ops.norm(dl[0], per_tensor=True)
            an = ops.norm(dl[0], params=dl[1], eta=0.3)
            G = ops.gram(dl)
        assert all(isinstance(v, DTensor) and all(isinstance(p, Replicate) for p in v.placements) for v in (n, per, G))
        out[name] = dict(norm=n.to_local(), per=per.to_local(), asam=an.to_local(), gram=G.to_local(), calls=c.n)

    # fused updates on shards: steps plain or replicated, found_inf/lr tensors
    p = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in lists[0]]
    gr = [[distribute_tensor(t, mesh, [Shard(0)]) for t in ls] for ls in lists[1:]]
    buf = [distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for t in lists[0]]
    steps = [torch.zeros((), dtype=torch.float32) for _ in lists[0]]
    found = distribute_tensor(torch.zeros(1), mesh, [Replicate()])
    ops.sgd_(p, gr, lr=torch.tensor(0.1, dtype=torch.float64), momentum_buffers=buf, steps=steps, momentum=0.9,
             weight_decay=0.01, grad_weights=[1.0, -0.5], found_inf=found)
    ops.sgd_(p, gr, lr=0.1, momentum_buffers=buf, steps=steps, momentum=0.9, weight_decay=0.01,
             grad_weights=[1.0, -0.5])
    m1 = [distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for t in lists[0]]
    m2 = [distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for t in lists[0]]
    asteps = [distribute_tensor(torch.zeros(()), mesh, [Replicate()]) for _ in lists[0]]
    pa = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in lists[0]]
    ops.adam_(pa, gr[0], m1, m2, asteps, lr=0.01, weight_decay=0.1, decoupled=True)
    out["sgd"] = [t.full_tensor() for t in p]
    out["adam"] = [t.full_tensor() for t in pa]
    out["counts"] = ([float(t) for t in steps], [float(t.to_local()) for t in asteps])

    # bad input: a clear error, never a crash or a silent answer
    errors = {}

    def expect(name, exc, fn):
        try:
            fn()
        except exc as e:
            errors[name] = str(e)
        else:
            errors[name] = "no error"
    expect("mixed", TypeError, lambda: ops.norm([p[0], torch.ones(3)]))
    expect("mixed-perturb", TypeError, lambda: ops.perturb_(p, [gr[0][0], *lists[1][1:]], buf, 0.1))
    expect("partial", ValueError, lambda: ops.norm([DTensor.from_local(torch.ones(2), mesh, [Partial()])]))
    sharded_steps = [distribute_tensor(torch.zeros(2), mesh, [Shard(0)]) for _ in lists[0]]
    expect("sharded-steps", ValueError, lambda: ops.sgd_(p, gr[0], lr=0.1, momentum_buffers=buf,
                                                         steps=sharded_steps, momentum=0.9))
    partly = net()
    from torch.distributed.fsdp import fully_shard
    fully_shard(partly.l1)
    fully_shard(partly.l2)  # not the root: its `gain` stays a plain tensor
    from roga_cuda import PCGrad, RoGA, SAM
    sam = SAM(partly.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _local(*data(0), rank)
    F.cross_entropy(partly(x), y).backward()
    expect("mixed-model", TypeError, lambda: sam.first_step())
    model = _sharded_net()
    F.cross_entropy(model(x), y).backward()
    expect("swap", ValueError, lambda: SAM(model.parameters(), torch.optim.SGD, lr=0.1, strategy="swap").first_step())
    expect("ddp_sync", ValueError, lambda: RoGA(model.parameters(), torch.optim.SGD, lr=0.1, ddp_sync=True))
    expect("hvp", ValueError, lambda: RoGA(model.parameters(), torch.optim.SGD, lr=0.1, alignment="hvp"))
    expect("python-backend", TypeError, lambda: ops.norm(p, backend="foreach"))
    out["errors"] = errors

    # PCGrad's random projection order (K = 3) on ranks seeded differently: rank 0's seed
    # is shared, else the ranks would update their shards with different coefficients
    torch.manual_seed(100 + rank)
    out["initial_seed"] = torch.initial_seed()
    opt = PCGrad(model.parameters(), torch.optim.SGD, lr=0.1)
    for s in range(2):
        x, y = _local(*data(s), rank)
        out3 = model(x)
        opt.zero_grad()
        opt.backward(task_losses(out3, y) + [F.mse_loss(out3, torch.zeros_like(out3))])
        opt.step()
    out["generator"] = opt.weighting.state_dict()["generator"]

    # PCGrad's gradient accumulation: two half micro-batches add up in the stashed shards
    acc_model = _sharded_net()
    opt = PCGrad(acc_model.parameters(), torch.optim.SGD, lr=0.1, method="sum")
    x, y = _local(*data(0), rank)
    for mb in range(2):
        o = acc_model(x[mb::2])
        opt.backward([loss / 2 for loss in task_losses(o, y[mb::2])], align=False)
    out["accumulated"] = [[g.full_tensor() for g in task] for task in opt._t.stash]

    # FSDP's mixed precision (bfloat16 compute, float32 shards): every optimizer steps
    from torch.distributed.fsdp import MixedPrecisionPolicy
    mp_ok = {}
    for kind in KINDS:
        model = net()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in (model.l1, model.l2, model):
            fully_shard(m, mp_policy=policy)
        before = _full(model)
        opt = _optimizer(kind, model.parameters())
        _step(kind, model, opt, 0, rank)
        after = _full(model)
        mp_ok[kind] = all(torch.isfinite(v).all() for v in after.values()) and any(
            not torch.equal(after[k], v) for k, v in before.items())
    out["mixed_precision"] = mp_ok
    out["every_method"] = {m: _every_method_run(m, rank) for m in _methods()}
    return out


def _methods():
    from roga_cuda.optim.weightings import available
    return available()


def _three_tasks(out, y):
    """K = 3 (random projection orders for pcgrad/gradvac): the two tasks and a norm penalty."""
    return task_losses(out, y) + [0.1 * out.pow(2).mean()]


def _every_method_run(method, rank=None):
    """Two GradientAggregator steps with ``method`` (seeded), K = 3; sharded when ``rank`` is
    given (this rank's half of the batch), else one process on the whole batch. Returns the
    weights per step and the final whole parameters."""
    from roga_cuda import GradientAggregator
    model = _sharded_net() if rank is not None else net()
    opt = GradientAggregator(model.parameters(), torch.optim.SGD, lr=0.1, method=method, seed=3)
    weights = []
    for s in range(2):
        x, y = data(s) if rank is None else _local(*data(s), rank)
        opt.zero_grad()
        opt.backward(_three_tasks(model(x), y))
        opt.step()
        weights.append(opt.stats["weights"].detach().clone())
    return dict(weights=weights, final=_full(model) if rank is not None else
                {k: v.detach().clone() for k, v in model.state_dict().items()})


def _worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    run_scenarios([("rules", lambda: _check_rules(rank))] + [(k, lambda k=k: _run_kind(k, rank, tmp)) for k in KINDS],
                  rank, tmp)
    sys.stdout.flush()
    # No gloo teardown (see tests/test_ddp.py: it aborts a rank now and then at exit).
    os._exit(0)


def _resume_on_one_process(kind, tmp):
    """The checkpoint the two ranks wrote after step 2, loaded by one process into a model
    sharded over a one-rank mesh; the remaining steps on the whole batch."""
    import torch.distributed.checkpoint as dcp

    from roga_cuda.optim.checkpoint import get_state_dict, set_state_dict
    model = _sharded_net()
    opt = _optimizer(kind, model.parameters())
    msd, osd = get_state_dict(model, opt)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=os.path.join(tmp, f"ckpt-{kind}"))
    set_state_dict(model, opt, loaded["model"], loaded["optim"])
    local = [p.to_local().numel() == p.numel() for p in model.parameters()]
    for s in range(SAVE_AFTER, STEPS):
        _step(kind, model, opt, s, 0)
    res = {"final": _full(model), "whole_shards": all(local)}
    if kind in AGGREGATORS:
        res["stats"] = (opt.stats["steps"], float(opt.conflict_rate))
    return res


def _one_worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous-one')}", rank=0,
                            world_size=1)
    torch.set_num_threads(1)
    for kind in KINDS:
        try:
            res = _resume_on_one_process(kind, tmp)
        except BaseException:
            res = {"error": traceback.format_exc()}
        torch.save(res, os.path.join(tmp, f"one-{kind}.0.pt"))
    sys.stdout.flush()
    os._exit(0)


def _spawn(fn, nprocs, tmp):
    spawn_and_wait(fn, nprocs, (tmp,), DEADLINE_S, f"the {nprocs}-process FSDP run")


@pytest.fixture(scope="module")
def sharded():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_worker, WORLD, tmp)
        _spawn(_one_worker, 1, tmp)  # then one process resumes the two ranks' checkpoints
        out = {name: [torch.load(os.path.join(tmp, f"{name}.{r}.pt"), weights_only=False) for r in range(WORLD)]
               for name in ("rules",) + KINDS}
        out.update({f"one-{k}": [torch.load(os.path.join(tmp, f"one-{k}.0.pt"), weights_only=False)] for k in KINDS})
        return out


def _ok(results, name):
    for r, res in enumerate(results[name]):
        assert "error" not in res, f"rank {r}, {name}:\n{res['error']}"
    return results[name]


# ------------------------------------------------------------------ the single-process reference

def _grads(loss, ps):
    return torch.autograd.grad(loss, ps)


def _norm(gs):
    return torch.sqrt(sum((g * g).sum() for g in gs))


def _base(kind, ps):
    if kind == "sam":
        return torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    if kind == "roga":
        return torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)
    if kind == "pcgrad":
        return torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    if kind == "upgrad":
        return torch.optim.SGD(ps, lr=0.1, momentum=0.5)
    return torch.optim.Adam(ps, lr=0.01)


def _ascent(ps, gs, scale):
    """Moves ps along gs; returns the original values."""
    old = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, g in zip(ps, gs):
            p.add_(scale * g)
    return old


def _restore(ps, old):
    with torch.no_grad():
        for p, o in zip(ps, old):
            p.copy_(o)


def _clip(gs, max_norm):
    c = min(1.0, max_norm / (float(_norm(gs)) + 1e-6))
    return [g * c for g in gs]


def _project_dual_cone(v, a, b):
    """Projection of v onto {x : a.x >= 0, b.x >= 0}: the nearest feasible point among the
    projections onto the faces (no constraint, a.x = 0, b.x = 0, both), float64."""
    cands = [v, v - (a @ v) / (a @ a) * a, v - (b @ v) / (b @ b) * b]
    A = torch.stack([a, b])
    cands.append(v - A.T @ torch.linalg.solve(A @ A.T, A @ v))
    tol = 1e-12 * (a.norm() + b.norm()) * v.norm()
    feasible = [c for c in cands if a @ c >= -tol and b @ c >= -tol]
    return min(feasible, key=lambda c: float((c - v).norm()))


def reference(kind, steps):
    """The single-process run on the whole batch: the math written out, float64."""
    model = net()
    ps = list(model.parameters())
    base = _base(kind, ps)
    for s in steps:
        if kind == "sam":
            x, y = data(s)
            g = _grads(F.cross_entropy(model(x), y), ps)
            old = _ascent(ps, g, HYPER["rho"] / (float(_norm(g)) + 1e-12))
            h = _grads(F.cross_entropy(model(x), y), ps)
            _restore(ps, old)
            final = _clip(h, HYPER["max_norm"])
        elif kind == "roga":
            final = [torch.zeros_like(p) for p in ps]
            for d in range(K_ROGA):
                x, y = data(s, d)
                g = _grads(F.cross_entropy(model(x), y), ps)
                old = _ascent(ps, g, HYPER["rho"] / (float(_norm(g)) + 1e-12) - HYPER["alpha"])
                h = _grads(F.cross_entropy(model(x), y), ps)
                _restore(ps, old)
                final = [a + t / K_ROGA for a, t in zip(final, h)]
        else:
            x, y = data(s)
            l1, l2 = task_losses(model(x), y)
            a = torch.cat([t.reshape(-1) for t in torch.autograd.grad(l1, ps, retain_graph=True)])
            b = torch.cat([t.reshape(-1) for t in torch.autograd.grad(l2, ps)])
            if kind == "pcgrad":
                d = a @ b
                if d < 0:
                    a, b = a - d / (b @ b) * b, b - d / (a @ a) * a
                flat = a + b
            elif kind == "upgrad":  # UPGrad, sum form: each gradient projected onto the dual cone
                flat = _project_dual_cone(a, a, b) + _project_dual_cone(b, a, b)
            else:  # MGDA: twice the min-norm point of the segment [a, b] (reduction "sum"), clipped
                gamma = min(1.0, max(0.0, float((b - a) @ b / ((a - b) @ (a - b)))))
                flat = 2 * (gamma * a + (1 - gamma) * b)
                flat = _clip([flat], HYPER["max_norm"])[0]
            final = list(flat.split([p.numel() for p in ps]))
            final = [t.view_as(p) for t, p in zip(final, ps)]
        for p, t in zip(ps, final):
            p.grad = t.clone()
        base.step()
        base.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ tests

def _assert_close(got, want, what):
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}, {k}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_equals_single_process_on_the_whole_batch(sharded, kind):
    res = _ok(sharded, kind)
    want = reference(kind, range(STEPS))
    for r in range(WORLD):
        _assert_close(res[r]["final"], want, f"{kind}, rank {r}")
    moved = max((want[k] - v).abs().max().item() for k, v in net().state_dict().items())
    assert moved > 1e-3, "the reference run barely moved: the comparison would prove little"
    if kind in AGGREGATORS:  # the tasks conflicted at every step: the projections were not idle
        assert all(r["stats"] == (STEPS, 1.0) for r in res), [r["stats"] for r in res]


@pytest.mark.parametrize("kind", KINDS)
def test_buffers_are_local_shards(sharded, kind):
    res = _ok(sharded, kind)
    expected = {"sam": {"backup", "base state"}, "roga": {"backup", "acc", "base state"},
                "pcgrad": {"stash", "base state"}, "mgda": {"stash", "base state"},
                "upgrad": {"stash", "base state"}}[kind]
    for r in range(WORLD):
        mem = res[r]["memory"]
        assert expected <= set(mem), (r, sorted(mem))
        for name, (held, local, full) in mem.items():
            # held: what the buffers occupy; local: the parameters' (padded) local shards;
            # full: the replicated size (71 of 126 elements here, FSDP pads uneven shards)
            assert 0 < held <= local < 0.6 * full, (kind, r, name, held, local, full)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_checkpoint_resumes_exactly(sharded, kind):
    res = _ok(sharded, kind)
    for r in range(WORLD):
        for k, v in res[r]["final"].items():
            assert torch.equal(res[r]["resumed"][k], v), f"{kind}, rank {r}: resumed run differs in {k}"
        if "stats" in res[r]:
            assert res[r]["resumed_stats"] == res[r]["stats"]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_of_two_ranks_resumes_on_one(sharded, kind):
    """DCP reshards: one process loads what two wrote and continues like the single-process
    run on the whole batch (float tolerance: the reductions are summed in another order)."""
    one = _ok(sharded, f"one-{kind}")[0]
    assert one["whole_shards"], "on a one-rank mesh every local shard is the whole parameter"
    _assert_close(one["final"], reference(kind, range(STEPS)), f"{kind}, resumed on one process")
    if kind in AGGREGATORS:
        assert one["stats"] == (STEPS, 1.0), one["stats"]


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_reductions_add_collectives(sharded, kind):
    """FSDP reduce-scatters the gradients; the optimizer adds one all-reduce per norm/Gram
    matrix (SAM: the perturbation's norm and the clipping norm; RoGA: one norm per domain;
    PCGrad: the Gram matrix, whose clipping needs nothing more) and no gradient all-reduce."""
    res = _ok(sharded, kind)
    want = {"sam": 2, "roga": K_ROGA, "pcgrad": 1, "mgda": 1, "upgrad": 1}[kind]
    for r in range(WORLD):
        assert res[r]["all_reduces"] == [want] * STEPS, (kind, r, res[r]["all_reduces"])


@pytest.mark.parametrize("kind", KINDS)
def test_amp_overflow_on_one_shard_skips_on_every_rank(sharded, kind):
    res = _ok(sharded, kind)
    for r in range(WORLD):
        amp = res[r]["amp"]
        for k, v in amp["snaps"][0].items():
            assert torch.equal(amp["snaps"][1][k], v), f"{kind}, rank {r}: the overflowing step changed {k}"
        assert amp["scale"] == 2.0**7, (kind, r, amp["scale"])
        _assert_close(amp["snaps"][2], reference(kind, [0, 2]), f"{kind} AMP, rank {r}")


def test_dtensor_rules_equal_whole_tensors(sharded):
    res = _ok(sharded, "rules")
    g = torch.Generator().manual_seed(7)
    shapes = [(6, 4), (5,), (1, 3), (3,), (0, 2)]
    lists = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(3)]
    rep = [torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    whole = [ls + [r] for ls, r in zip(lists, rep)]
    flat = [torch.cat([t.reshape(-1) for t in ls]) for ls in whole]
    norm = flat[0].norm()
    per = torch.stack([t.norm() for t in whole[0]])
    asam = torch.cat([((t1.abs() + 0.3) * t0).reshape(-1) for t0, t1 in zip(whole[0], whole[1])]).norm()
    gram = torch.stack([torch.stack([a @ b for b in flat]) for a in flat])
    for r in range(WORLD):
        for mesh in ("1d", "2d-shard-rep", "2d-rep-shard", "2d-hsdp"):
            got = res[r][mesh]
            torch.testing.assert_close(got["norm"], norm, rtol=1e-13, atol=0, msg=lambda m: f"{mesh} norm: {m}")
            torch.testing.assert_close(got["per"], per, rtol=1e-13, atol=0, msg=lambda m: f"{mesh} per: {m}")
            torch.testing.assert_close(got["asam"], asam, rtol=1e-13, atol=0, msg=lambda m: f"{mesh} asam: {m}")
            torch.testing.assert_close(got["gram"], gram, rtol=1e-13, atol=1e-14, msg=lambda m: f"{mesh} gram: {m}")
            assert got["calls"] == 3, f"{mesh}: {got['calls']} all-reduces for 3 reductions"


def test_dtensor_fused_updates_equal_whole_tensors(sharded):
    res = _ok(sharded, "rules")
    g = torch.Generator().manual_seed(7)
    shapes = [(6, 4), (5,), (1, 3), (3,), (0, 2)]
    lists = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(3)]
    ps = [t.clone().requires_grad_() for t in lists[0]]
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)
    adam_ps = [t.clone().requires_grad_() for t in lists[0]]
    adam = torch.optim.AdamW(adam_ps, lr=0.01, weight_decay=0.1)
    for _ in range(2):
        for p, a, b in zip(ps, lists[1], lists[2]):
            p.grad = a - 0.5 * b
        sgd.step()
    for p, a in zip(adam_ps, lists[1]):
        p.grad = a.clone()
    adam.step()
    for r in range(WORLD):
        got = res[r]
        for i, (a, b) in enumerate(zip(got["sgd"], ps)):
            torch.testing.assert_close(a, b.detach(), rtol=1e-14, atol=1e-15, msg=lambda m: f"sgd_[{i}]: {m}")
        for i, (a, b) in enumerate(zip(got["adam"], adam_ps)):
            torch.testing.assert_close(a, b.detach(), rtol=1e-14, atol=1e-15, msg=lambda m: f"adam_[{i}]: {m}")
        assert got["counts"] == ([2.0] * len(shapes), [1.0] * len(shapes))


def test_bad_input_gets_a_clear_error(sharded):
    res = _ok(sharded, "rules")
    want = {
        "mixed": "ts[1] is a plain tensor but other tensors of the call are DTensors",
        "mixed-perturb": "grads[1] is a plain tensor but other tensors of the call are DTensors",
        "partial": "has a Partial placement",
        "sharded-steps": "must be a plain tensor or a replicated DTensor",
        "mixed-model": "is a plain tensor but other tensors of the call are DTensors",
        "swap": "strategy='swap' is unsafe here",
        "ddp_sync": "FSDP already reduce-scatters the gradients",
        "hvp": "use alignment='first_order'",
        "python-backend": "DTensor inputs run through the compiled operators",
    }
    for r in range(WORLD):
        errors = res[r]["errors"]
        for name, text in want.items():
            assert text in errors[name], f"rank {r}, {name}: {errors[name]!r}"


def test_pcgrad_random_order_is_shared_across_ranks(sharded):
    res = _ok(sharded, "rules")
    assert res[0]["initial_seed"] != res[1]["initial_seed"], "the ranks were meant to start from different seeds"
    assert torch.equal(res[0]["generator"], res[1]["generator"]), "the ranks drew different projection orders"


def test_pcgrad_accumulates_micro_batches_in_the_shards(sharded):
    res = _ok(sharded, "rules")
    model = net()
    ps = list(model.parameters())
    x, y = data(0)
    want = [torch.autograd.grad(loss, ps, retain_graph=True) for loss in task_losses(model(x), y)]
    for r in range(WORLD):
        for t, (got_t, want_t) in enumerate(zip(res[r]["accumulated"], want)):
            for i, (a, b) in enumerate(zip(got_t, want_t)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"rank {r} task {t}[{i}]: {m}")


def test_every_method_equals_its_single_process_run(sharded):
    """Every weighting of roga_cuda.optim.weightings on the sharded model: the same weights on
    both ranks (the Gram matrix is all-reduced, the random ones share their draws) as on one
    process on the whole batch, and the same parameters after two steps."""
    res = _ok(sharded, "rules")
    methods = _methods()
    assert set(res[0]["every_method"]) == set(methods)
    for m in methods:
        want = _every_method_run(m)
        for r in range(WORLD):
            got = res[r]["every_method"][m]
            for s, (a, b) in enumerate(zip(got["weights"], want["weights"])):
                assert torch.isfinite(a).all(), (m, r, s, a)
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda msg: f"{m} rank {r} step {s}: {msg}")
            for k, v in want["final"].items():
                torch.testing.assert_close(got["final"][k], v, rtol=1e-7, atol=1e-9,
                                           msg=lambda msg: f"{m} rank {r} {k}: {msg}")


def test_fsdp_mixed_precision_runs(sharded):
    """MixedPrecisionPolicy (bfloat16 compute, float32 shards and reductions): one step of
    each optimizer leaves finite parameters that moved."""
    res = _ok(sharded, "rules")
    for r in range(WORLD):
        assert res[r]["mixed_precision"] == {k: True for k in KINDS}, (r, res[r]["mixed_precision"])


def _sam_steps(model, opt, steps):
    """SAM steps on batches data(s), one per s in ``steps`` (one process)."""
    for s in steps:
        x, y = data(s)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def test_checkpoint_helpers_on_one_process():
    """roga_cuda.optim.checkpoint without torch.distributed: the state round-trips into a
    fresh optimizer (which then steps like the original), and another optimizer type is
    refused before anything is loaded."""
    from roga_cuda import RoGA, SAM
    from roga_cuda.optim.checkpoint import get_state_dict, set_state_dict


    model = net()
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=0.01, rho=0.1)
    _sam_steps(model, opt, range(2))
    msd, osd = get_state_dict(model, opt)
    msd, osd = copy.deepcopy(msd), copy.deepcopy(osd)  # as saved: the live state keeps changing
    model2 = net()
    opt2 = SAM(model2.parameters(), torch.optim.AdamW, lr=0.5, rho=0.1)  # lr comes from the checkpoint
    set_state_dict(model2, opt2, msd, osd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.param_groups[0]["lr"] == 0.01
    _sam_steps(model, opt, [2])
    _sam_steps(model2, opt2, [2])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    other = RoGA(net().parameters(), torch.optim.AdamW, lr=0.01)
    with pytest.raises(ValueError, match="saved by a SAM, not a RoGA"):
        set_state_dict(net(), other, msd, osd)
    with pytest.raises(ValueError, match="was not written by roga_cuda.optim.checkpoint.get_state_dict"):
        set_state_dict(model2, opt2, msd, opt2.base_optimizer.state_dict())
    plain = torch.optim.AdamW(net().parameters(), lr=0.01)
    with pytest.raises(ValueError, match="saved by a roga_cuda wrapper optimizer, not a plain AdamW"):
        set_state_dict(net(), plain, msd, osd)


def test_checkpoint_helpers_take_plain_torch_optimizers():
    """A plain torch.optim optimizer (the apps' ERM / baseline runs) goes through the same two
    functions: a fresh model and optimizer loaded from them step like the originals."""
    from roga_cuda.optim.checkpoint import get_state_dict, set_state_dict

    def run(model, opt, steps):
        for s in steps:
            x, y = data(s)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, opt, range(2))
    msd, osd = copy.deepcopy(get_state_dict(model, opt))
    assert "roga_cuda_wrapper" not in osd
    model2 = net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.7, momentum=0.9)
    set_state_dict(model2, opt2, msd, osd)
    assert opt2.param_groups[0]["lr"] == 0.1
    run(model, opt, [2])
    run(model2, opt2, [2])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_skips_parameters_without_optimizer_state(tmp_path):
    """A parameter that never had a gradient before the save has no optimizer state in the
    checkpoint: ``load`` cuts the template to what was saved (DCP would refuse the missing
    keys), and the resumed run steps like the original (one process, no process group)."""
    import torch.distributed.checkpoint as dcp

    from roga_cuda import SAM
    from roga_cuda.optim.checkpoint import get_state_dict, load

    def build():
        model = net()
        model.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))  # never in the graph
        return model, SAM(model.parameters(), torch.optim.Adam, lr=0.01, rho=0.1)


    model, opt = build()
    _sam_steps(model, opt, range(2))
    assert model.unused not in opt.base_optimizer.state
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    model2, opt2 = build()
    load(model2, opt2, str(tmp_path / "ckpt"))
    assert model2.unused not in opt2.base_optimizer.state
    _sam_steps(model, opt, [2])
    _sam_steps(model2, opt2, [2])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
