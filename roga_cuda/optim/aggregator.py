"""Gradient aggregation in Gram space over K losses: PCGrad, GradVac, CAGrad, MGDA, UPGrad,
DualProj, IMTL-G, Aligned-MTL, Nash-MTL, random weighting, ConFIG, the plain sum, or your own
:class:`~roga_cuda.optim.weightings.Weighting`.

Every method only needs the inner products between the K task gradients: the aggregated
gradient is a combination ``sum_k w_k g_k`` whose weights follow from the Gram matrix ``G``.
So a step is one fused ``gram`` pass over the K gradients, a K x K computation (the
weighting, :mod:`.weightings`), and one fused ``combine_`` pass into ``.grad`` — or, with
``step(closure)``, straight into the fused base update. No flattening copies, no
per-parameter loops; the cosines, conflicts and weights come with the statistics.

    opt = PCGrad(model.parameters(), torch.optim.AdamW, lr=1e-4)          # method="pcgrad"
    opt = GradientAggregator(model.parameters(), torch.optim.SGD, method="upgrad", lr=0.1,
                             shared=model.trunk)                            # heads keep their task's gradient
    opt.zero_grad()
    opt.backward([loss_clean, loss_augmented])    # may share one graph
    opt.step()
    opt.stats["weights"], opt.stats["cosine"][0, 1], opt.conflict_rate

Reductions: ``"sum"`` (default) applies the weighting's sum-form weights (K equal gradients
``g`` give ``K g``, the DPDA paper's PCGrad sum, except for CAGrad and Nash-MTL, which keep
their papers' scale; each weighting's docstring relates its paper's and torchjd's convention
to it, docs/optimizers.md tabulates them); ``"mean"`` divides them by K (torchjd's mean-form
aggregators, e.g. UPGrad's mean of projections). Task-specific
parameters (``shared=`` given: every parameter not in it) are not aligned: their gradient is
the plain sum of the task gradients, i.e. their own task's gradient for an exclusive head,
whatever the reduction (torchjd's ``mtl_backward``).
"""
import contextlib
import functools
import inspect
import itertools
import math
import operator
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import ops
from . import _utils
from .base import WrapperOptimizer
from .fused import UpdatePart
from .weightings import Weighting, available, make_weighting

METHODS = tuple(available())


@dataclass
class _Unit:
    """Parameters of one optimizer group on one device, aligned as one weighting group
    (``wgroup`` an index; None: task-specific, summed), by positions in the layout."""
    group: dict
    params: list
    span: tuple = None  # (a, b) when the positions are a contiguous slice of the layout
    index: list = None  # else the positions
    wgroup: int = 0

    def take(self, seq):
        return seq[self.span[0]:self.span[1]] if self.span is not None else [seq[i] for i in self.index]


class _TaskGrads:
    """One task's gradient buffers, kept from step to step and reset before autograd adds
    into them (``persistent_grads`` on small tensors, where a hook per parameter costs more).

    Per (dtype, device) one flat buffer, and per parameter a tensor on its storage with the
    parameter's strides (those autograd gives a gradient of its own). Not a view: each has its
    own version counter, which autograd's in-place accumulation bumps — that tells which
    parameters a loss reached, as ``p.grad is None`` does when autograd allocates."""

    reusable = True  # a missing gradient is its buffer, zeroed (unless the user holds it: private())

    def __init__(self, params):
        groups = {}
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, p.device), []).append(i)
        self.grads = [None] * len(params)
        self.flats = []
        for (dt, dev), idx in groups.items():
            flat = torch.empty(sum(params[i].numel() for i in idx), dtype=dt, device=dev)
            storage, off = flat.untyped_storage(), 0
            for i in idx:
                p = params[i]
                self.grads[i] = torch.empty(0, dtype=dt, device=dev).set_(storage, off, p.shape, _utils.grad_strides(p))
                off += p.numel()
            del storage
            self.flats.append(flat)
        self.versions = None
        # What holding them ourselves counts, to tell later whether anyone else does.
        self._refs = max(map(sys.getrefcount, self.grads))
        self._uses = [_storage_uses(f) for f in self.flats] if _use_count is not None else None

    def reset(self):
        """Every gradient to -0.0 (x + -0.0 is x bit for bit, -0.0 included, so accumulating
        into it gives autograd's own gradient exactly; +0.0 would turn -0.0 into +0.0)."""
        for f in self.flats:
            f.fill_(complex(-0.0, -0.0) if f.is_complex() else -0.0)
        self.begin()

    def begin(self):
        """The version each buffer has now tells later whether a pass reached it."""
        self.versions = list(map(_version, self.grads))

    def reached(self, params):
        """After a backward pass: per parameter its gradient (None where no pass of this
        accumulation reached it), and how many are None."""
        return _reached(params, self.grads, list(map(operator.ne, map(_version, self.grads), self.versions)))

    def private(self):
        """Is nothing but this object holding the buffers? Not when the user kept a
        ``p.grad`` of an earlier step (or a view of one): then those stay theirs."""
        if _use_count is None:
            return False
        return (max(map(sys.getrefcount, self.grads)) <= self._refs
                and all(_storage_uses(f) <= n for f, n in zip(self.flats, self._uses)))


def _reached(params, grads, marks):
    """After a backward pass into a kept set: per parameter its gradient (None where no pass
    of this accumulation reached it, marks[i] False), and how many are None."""
    gs, _ = _utils.grads_of(params)
    if all(map(operator.is_, gs, grads)):  # (builtins only: no Python work per parameter)
        out = list(map(operator.getitem, zip(itertools.repeat(None), grads), marks))
    else:  # None: this pass did not reach p (an earlier micro-batch may have);
        # another tensor: a hook replaced p.grad, take what autograd left
        out = [(mine if mark else None) if g is None or g is mine else g for g, mine, mark in zip(gs, grads, marks)]
    # by identity: list.count(None) would call Tensor.__eq__ on every gradient (~25 us each)
    return out, sum(map(operator.is_, out, itertools.repeat(None)))


# glibc's default mmap threshold: blocks this large come straight from the operating system
# and go back to it when freed, so every step page-faults them in again.
_MMAP_BYTES = 128 * 1024


def _worth_keeping(params):
    """persistent_grads=None: keep the K sets when every parameter is on the CPU and the
    tensors average at least _MMAP_BYTES. Below that, freed gradients stay in the
    allocator's heap (no page faults), and adding into kept sets costs autograd one
    in-place add per parameter per pass where it takes a fresh gradient over for free
    (measured on 400 one-element parameters: 13.3 -> 15.2 ms per PCGrad step)."""
    if not params or any(p.device.type != "cpu" for p in params):
        return False
    return sum(p.numel() * p.element_size() for p in params) >= _MMAP_BYTES * len(params)


class _TakenGrads:
    """One task's gradients as autograd made them, taken by the hooks below and kept until
    the next step's pass replaces them, one parameter at a time (``persistent_grads`` on
    large CPU tensors). Replacing the last step's tensor just after autograd made its
    successor frees memory the heap hands to the next fresh gradient, so no step grows the
    heap (glibc would return a freed top to the OS, and the next step page-fault it in
    again), and nothing is copied: the kept set costs autograd's own 8 bytes per float32
    element per pass. Old tensors are only dropped, never written: one you hold stays yours."""

    reusable = False  # a missing gradient is a fresh zero tensor, not an old one zeroed

    def __init__(self, n):
        self.grads = [None] * n
        self.filled = None  # per parameter: did a pass of this accumulation reach it

    def begin(self):
        self.filled = [False] * len(self.grads)

    def reached(self, params):
        """As _TaskGrads.reached."""
        return _reached(params, self.grads, self.filled)


class _TakeHooks:
    """Post-accumulate-grad hooks that take each fresh gradient into the task's
    :class:`_TakenGrads` (added to it when an earlier micro-batch already reached the
    parameter), active only while the aggregator's ``backward`` runs a pass. One Python call
    per parameter per pass: only tensors averaging _MMAP_BYTES get them (as the kept sets by
    default)."""

    def __init__(self, params):
        self.target = None  # the _TakenGrads of the pass in progress
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(_take, ref, i))
                         for i, p in enumerate(params)]
        weakref.finalize(self, _remove_all, self._handles)  # the parameters may outlive the optimizer

    def remove(self):
        _remove_all(self._handles)


def _remove_all(handles):
    for h in handles:
        h.remove()


def _take(ref, i, p):
    hooks = ref()
    kept = hooks.target if hooks is not None else None
    if kept is None:
        return
    g = p.grad
    if g is None:
        return
    if kept.filled[i]:  # a later micro-batch
        mine = kept.grads[i]
        if g is not mine:
            mine.add_(g)
            p.grad = mine
        return
    if g.layout != torch.strided:  # a sparse gradient: the fused passes take dense ones
        g = p.grad = g.to_dense()
    kept.grads[i] = g  # the last step's tensor of this task is freed here
    kept.filled[i] = True


_version = operator.attrgetter("_version")
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private in torch: without it, never reuse


def _storage_uses(t):
    """How many tensors (and storage objects) share t's storage."""
    return _use_count(t.untyped_storage()._cdata)


@dataclass
class _Last:
    """The last aggregation, as the statistics are made from it when read."""
    G: torch.Tensor
    w: torch.Tensor
    finite: torch.Tensor
    counts: torch.Tensor  # the running counts after it
    steps: int
    info: dict  # the weighting's own statistics

    def statistics(self):
        G = self.G
        d = G.diagonal().clamp_min(torch.finfo(G.dtype).tiny).sqrt()  # a zero gradient: cosine 0
        conflict = (G < 0) & ~torch.eye(G.shape[0], dtype=torch.bool, device=G.device)
        return {"gram": G, "cosine": G / (d[:, None] * d[None, :]), "conflict": conflict,
                "any_conflict": conflict.any(), "finite": self.finite, "weights": self.w,
                "conflict_rate": (self.counts[0] / self.counts[1].clamp_min(1)).float(), "steps": self.steps,
                **self.info}


@dataclass
class _Aligned:
    """What align(fold=True) leaves for step(): per unit, its K gradient lists and weights."""
    units: list
    lists: list
    weights: list


class GradientAggregator(WrapperOptimizer):
    """Aggregates the gradients of K losses in Gram space, then the base optimizer steps.

    Args:
        params, base_optimizer, **base_kwargs: as for :class:`SAM`.
        method: a weighting name (``roga_cuda.optim.weightings.available()``: "pcgrad",
            "gradvac", "cagrad", "mgda", "upgrad", "dualproj", "imtl_g", "aligned_mtl",
            "nash_mtl", "random", "config", "sum"), a Weighting subclass, or an instance.
        method_options: options of the weighting (e.g. ``{"pref_vector": [...]}``).
        reduction: "sum" (default) or "mean" (see the module docstring).
        shared: the shared parameters (parameters or modules); the others are task-specific
            and keep the plain sum of their task gradients. Default: all are aligned.
        groups: per-group weightings (GradVac, as LibMTL's group types): a list of parameter
            lists (``weightings.gradvac_groups(model, "layer")``); each group gets its own
            Gram matrix and weights. Parameters in no group are task-specific.
        beta, c, cagrad_rescale: shortcuts for GradVac's ``beta`` and CAGrad's ``c``/``rescale``.
        max_grad_norm: clip the final gradient (free: its norm follows from G).
        seed: seeds the random methods (projection orders, random weights); saved in state_dict.
            Under torch.distributed every rank must draw the same: give every rank the same
            seed, or leave it None and rank 0's generator is broadcast before the first draw.
        ddp_sync: all-reduce the K task gradients across processes before the aggregation
            (default: when torch.distributed runs with more than one process); pass the
            DDP model to backward(model=...) so the K backward passes skip DDP's own sync.
            Never on sharded (FSDP2 ``fully_shard``) parameters: FSDP reduce-scatters each
            backward pass itself (ddp_sync=True there is an error).
        fused: run the base update (SGD, Adam, AdamW) as a fused primitive.
        persistent_grads: keep the K task gradient sets from step to step instead of freeing
            them at its end. None (default): when every parameter is on the CPU and the
            tensors average at least 128 KiB, where freed sets go back to the operating system
            and the next step page-faults them in again (CUDA's caching allocator reuses its
            memory anyway; small CPU tensors stay in the heap). Such large tensors are taken by
            a post-accumulate-grad hook per parameter, active only inside ``backward``: each
            fresh gradient becomes its task's kept tensor, and that task's tensor of the last
            step is dropped at that moment, so the heap hands its memory to the next fresh
            gradient (no page faults, nothing copied). Smaller ones (``persistent_grads=True``)
            are reset to -0.0 and autograd adds into them, not reused while you hold one (or a
            view of it). Holds the K sets between steps (what a step holds at its peak anyway);
            ``p.grad`` after the step is the first set (docs/optimizers.md).

    ``step(closure)`` with a closure that returns the K losses runs backward, the aggregation
    and the base update, the combination folded into the update (one pass over the K
    gradients). Models under ``torch.compile``: the K backward passes share one compiled
    graph, retained between passes, which AOTAutograd refuses for a backward compiled with
    donated buffers (a memory optimisation); the retained passes run with donated buffers
    off (``torch._functorch.config.donated_buffer``, scoped to those calls).
    """

    _step_supports_amp_scaling = True  # GradScaler.step(): unscale and skip inside the update
    default_method = None

    def __init__(self, params, base_optimizer, method=None, reduction="sum", backend="auto", *, method_options=None,
                 shared=None, groups=None, beta=None, c=None, cagrad_rescale=None, max_grad_norm=None, seed=None,
                 ddp_sync=None, fused=True, persistent_grads=None, **base_kwargs):
        name = type(self).__name__
        method = method if method is not None else (self.default_method or "pcgrad")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"{name}: reduction must be 'sum' or 'mean', got {reduction!r}")
        options = dict(method_options or {})
        legacy = {"beta": beta, "c": c, "rescale": cagrad_rescale}  # shortcuts, for the methods that take them
        for key, value in legacy.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name}: {'cagrad_rescale' if key == 'rescale' else key} must be a finite "
                                 f"number, got {value!r}")
        self.weighting = _weighting(name, method, options, seed, {k: v for k, v in legacy.items() if v is not None})
        self.method = getattr(self.weighting, "name", None) or type(self.weighting).__name__
        if persistent_grads not in (None, True, False):
            raise TypeError(f"{name}: persistent_grads must be None, True or False, got {persistent_grads!r}")
        if groups is not None and not self.weighting.batched:
            raise ValueError(f"{name}: groups= needs a per-group weighting (gradvac); {self.method} takes one G")
        super().__init__(params, base_optimizer, {}, backend, max_grad_norm, fused, **base_kwargs)
        self.reduction = reduction
        self.ddp_sync = ddp_sync
        self.persistent_grads = persistent_grads
        self._sync()  # a clear error now for ddp_sync=True on sharded (FSDP) parameters
        # Random weightings draw from a host generator: ranks drawing differently would give
        # DDP replicas / FSDP shards different weights. None: rank 0's state is broadcast once.
        self._t.draws_shared = seed is not None
        self._shared = None if shared is None else _param_ids(shared, "shared")
        self._groups = None if groups is None else [_param_ids(g, f"groups[{i}]") for i, g in enumerate(groups)]
        # Kept in the layout's memo: "units" [_Unit]; "task_flat" per task (_utils.FlatViews, views
        # as a list aligned with the layout's params) when syncing across processes; "kept"
        # [_TaskGrads or _TakenGrads] with persistent_grads; "worth_keeping" (persistent_grads=None).
        self._t.stash = None  # per task: gradients aligned with the layout's params (None: no gradient)
        self._t.aligned = None  # _Aligned between a folding align() and step()
        self._t.take_hooks = None  # _TakeHooks on the layout's params, when the kept sets are taken ones
        self._t.spare = None  # per task, the kept set behind the stash (for the zeros of missing gradients)
        self._t.inv_scale = None
        self._t.k = None  # number of losses seen (fixed once aligned)
        self._t.n_steps = 0
        self._t.counts = None  # (2,) device tensor: steps with a conflicting pair, steps with a finite G
        self._t.last = None  # _Last: what the statistics of the last aggregation are made from
        self._t.stats = {}

    # -- the parameters, as aligned units ------------------------------------------------
    def _units(self):
        lay = self._layout()
        hit = lay.memo.get("units")
        if hit is not None:
            return hit
        units = []
        wg_of = {}
        if self._groups is not None:
            for gi, ids in enumerate(self._groups):
                for i in ids:
                    wg_of.setdefault(i, gi)
        for (group, ps), (a, b) in zip(lay.parts, lay.bounds):
            if self._shared is None and self._groups is None:
                units.append(_Unit(group, ps, span=(a, b)))
                continue
            buckets = {}
            for i, p in zip(range(a, b), ps):
                if self._groups is not None:
                    key = wg_of.get(id(p))
                else:
                    key = 0 if id(p) in self._shared else None
                if key is not None and self._shared is not None and id(p) not in self._shared:
                    key = None
                buckets.setdefault(key, []).append(i)
            for key, idx in buckets.items():
                units.append(_Unit(group, [lay.params[i] for i in idx], index=idx, wgroup=key))
        if not any(u.wgroup is not None for u in units):
            raise ValueError(f"{type(self).__name__}: no parameter is shared/in a group: nothing to align")
        lay.memo["units"] = units
        return units

    def _task_views(self, k):
        """Per task, gradients as views of one flat buffer per dtype/device (one all-reduce
        each), as lists aligned with the layout's params."""
        lay = self._layout()
        tasks = lay.memo.get("task_flat")
        if tasks is None or len(tasks) < k:
            tasks = []
            for _ in range(k):
                bufs, views = _utils.flat_views(lay.params, zero=True)
                tasks.append(_utils.FlatViews(bufs, [views[id(p)] for p in lay.params]))
            lay.memo["task_flat"] = tasks
        return tasks[:k]

    def _kept(self, k):
        """The K kept gradient sets, reset for a new accumulation (None: autograd allocates).
        Sets beyond K are dropped (never more memory than the K sets of a step); a set the
        user still holds part of is left to them and replaced."""
        lay = self._layout()
        worth = lay.memo.get("worth_keeping")  # on the CPU, for large tensors
        if worth is None:  # once per layout
            worth = lay.memo["worth_keeping"] = _worth_keeping(lay.params)
            if self._t.take_hooks is not None:
                self._t.take_hooks.remove()
            self._t.take_hooks = None
        keep = worth if self.persistent_grads is None else self.persistent_grads
        if not keep or lay.sharded:
            lay.memo.pop("kept", None)
            return None
        old = lay.memo.get("kept", [])
        if worth:  # taken by hooks: old tensors are only replaced, never written
            sets = old[:k] + [_TakenGrads(len(lay.params)) for _ in range(k - len(old))]
            if self._t.take_hooks is None:
                self._t.take_hooks = _TakeHooks(lay.params)
        else:
            sets = [s if s.private() else _TaskGrads(lay.params) for s in old[:k]]
            lay.memo.pop("kept", None)
            del old
            sets += [_TaskGrads(lay.params) for _ in range(k - len(sets))]
        for s in sets:
            s.begin() if worth else s.reset()
        lay.memo["kept"] = sets
        return sets

    # -- the K gradients -------------------------------------------------------------------
    def backward(self, losses, *, align=True, scaler=None, model=None, retain_graph=False):
        """Compute the K task gradients and, with ``align=True``, combine them into ``.grad``.

        losses: K scalar losses (they may share one graph). align=False keeps adding the
        task gradients to pending sums (gradient accumulation over micro-batches: the
        aggregation runs once, on the accumulated gradients, at align()). scaler: a
        GradScaler: the losses are scaled here, and clipping uses the unscaled norm. model:
        a DistributedDataParallel model, whose own gradient sync is skipped (see ddp_sync), or
        an FSDP2 (fully_shard) model, whose parameters then stay gathered from one pass to
        the next (they do not change in between) and are resharded after the last: no
        re-gathering in passes 2..K, at the memory cost of the whole parameters meanwhile.
        """
        losses = self._check_losses(losses)
        k = len(losses)
        if scaler is not None and scaler.is_enabled():
            losses = [scaler.scale(l) for l in losses]
            self._t.inv_scale = _utils.inv_scale_of(scaler)
        else:
            self._t.inv_scale = None
        params = self._params()
        _utils.set_grads(params, None)  # a p.grad left from before is not accumulated into
        flat = self._task_views(k) if self._sync() else None
        kept = None
        if flat is not None and self._t.stash is None:
            for bufs, _ in flat:
                for b in bufs:
                    b.zero_()
        elif flat is None:
            kept = self._kept(k) if self._t.stash is None else self._t.spare
        hooks = self._t.take_hooks if kept is not None else None  # (made only where worth_keeping holds)
        ctx = model.no_sync() if model is not None and hasattr(model, "no_sync") else contextlib.nullcontext()
        keep_gathered = model is not None and hasattr(model, "set_reshard_after_backward")  # FSDP2
        stash, missing = [], 0
        with ctx, _resharded_at_exit(model if keep_gathered else None):
            for t, loss in enumerate(losses):
                if keep_gathered:
                    model.set_reshard_after_backward(t == k - 1)
                # accumulate into the flat views / the pending sums, or let autograd allocate
                if flat is not None:
                    _utils.set_grads(params, flat[t][1])
                elif kept is not None:
                    _utils.set_grads(params, None if hooks is not None else kept[t].grads)
                elif self._t.stash is not None:
                    _utils.set_grads(params, self._t.stash[t])
                # (else .grad is None: cleared above, and taken after each pass)
                keep = retain_graph or t < k - 1
                with _keep_graph_ok() if keep else contextlib.nullcontext(), _filling(hooks, kept, t):
                    torch.autograd.backward(loss, retain_graph=keep)
                gs, miss = kept[t].reached(params) if kept is not None else _utils.take_grads(params)
                stash.append(gs)
                missing += miss
        if kept is not None:  # (take_grads cleared .grad on the other paths)
            _utils.set_grads(params, None)
        self._t.stash = stash
        self._t.spare = kept
        self._t.stash_complete = missing == 0
        if align:
            self.align()

    def _check_losses(self, losses):
        name = type(self).__name__
        if isinstance(losses, torch.Tensor):
            if losses.dim() == 0:
                raise ValueError(f"{name}.backward: got one 0-d loss; give the K task losses as a list "
                                 "(or a 1-d tensor of K losses)")
            losses = list(losses.unbind())
        else:
            losses = list(losses)
        k = len(losses)
        if k < 1:
            raise ValueError(f"{name}.backward: give at least one loss")
        if self._t.stash is not None and len(self._t.stash) != k:
            raise ValueError(f"{name}.backward: got {k} losses but the pending accumulation has {len(self._t.stash)}")
        if self._t.k is not None and self._t.k != k and _keeps_k(self.weighting):
            raise ValueError(f"{name}.backward: got {k} losses but this optimizer has aligned {self._t.k} tasks so far "
                             f"({self.method} keeps per-task state)")
        for i, l in enumerate(losses):
            if not isinstance(l, torch.Tensor) or l.numel() != 1:
                raise ValueError(f"{name}.backward: losses[{i}] must be a scalar tensor")
            if not l.requires_grad:
                raise ValueError(f"{name}.backward: losses[{i}] does not require grad (was it computed under "
                                 "no_grad?)")
        return losses

    # -- the aggregation -------------------------------------------------------------------
    @torch.no_grad()
    def align(self, fold=False):
        """Gram matrix, weights, and the combined gradient into ``.grad``. ``fold``: leave the
        combination to the next step(), inside the fused base update (one pass)."""
        if self._t.stash is None:
            raise RuntimeError(f"{type(self).__name__}.align() without backward(losses)")
        stash, self._t.stash = self._t.stash, None
        spare, self._t.spare = self._t.spare, None
        k = len(stash)
        flat = self._layout().memo.get("task_flat")
        if self._sync() and flat is not None:
            world = dist.get_world_size()
            for bufs, _ in flat[:k]:
                for b in bufs:
                    dist.all_reduce(b)
                    b.div_(world)
        units, lists = [], []
        complete = self._t.stash_complete
        for u in self._units():
            ls = [u.take(s) for s in stash]
            if not complete:
                present = [i for i in range(len(u.params)) if any(l[i] is not None for l in ls)]
                if not present:
                    continue
                # a task that did not reach a parameter contributes zeros (its kept buffer zeroed, or new)
                zs = ([u.take(s.grads) for s in spare] if spare is not None and spare[0].reusable
                      else [[None] * len(u.params)] * k)
                if len(present) < len(u.params):
                    u = _Unit(u.group, [u.params[i] for i in present], index=present, wgroup=u.wgroup)
                    ls = [[l[i] for i in present] for l in ls]
                    zs = [[z[i] for i in present] for z in zs]
                ls = [[g if g is not None else (z.zero_() if z is not None else torch.zeros_like(p))
                       for g, z, p in zip(l, zl, u.params)] for l, zl in zip(ls, zs)]
            units.append(u)
            lists.append(ls)
        if not units:
            raise RuntimeError(f"{type(self).__name__}: no parameter received a gradient from the losses")
        self._t.k = k
        weights = self._weights(units, lists, k)
        if fold and self.fused:
            self._t.aligned = _Aligned(units, lists, weights)
            return
        for u, ls, w in zip(units, lists, weights):
            ops.combine_(ls[0], ls, w, backend=self.backend)
            _utils.set_grads(u.params, ls[0])

    def _weights(self, units, lists, k):
        """Per unit, the K weights (a device tensor, or floats for task-specific units)."""
        ngroups = 1 + max((u.wgroup for u in units if u.wgroup is not None), default=0)
        grams = [None] * ngroups
        for u, ls in zip(units, lists):
            if u.wgroup is None:
                continue
            G = _utils.local_value(ops.gram(ls, backend=self.backend))  # sharded: replicated, all-reduced once
            g0 = grams[u.wgroup]
            grams[u.wgroup] = G if g0 is None else g0 + G.to(g0.device)
        dev = next(g.device for g in grams if g is not None)
        grams = [g.to(dev) if g is not None else torch.zeros(k, k, device=dev) for g in grams]
        G = torch.stack(grams) if self._groups is not None else grams[0]
        inv2 = None
        if self._t.inv_scale is not None:
            # backward(scaler=...): weigh the true gradients' Gram matrix. Most weightings are
            # scale-invariant, but Nash-MTL's weights go as 1 / |g| (and its max_norm is absolute),
            # so on the scaled G its step would come out 1 / scale too small.
            inv2 = self._t.inv_scale.to(G.device, torch.float64).square()
            G = G.double() * inv2
        if not self._t.draws_shared:
            self._share_draws(G.device)
        w = self.weighting(G).to(G.dtype if G.dtype == torch.float64 else torch.float64)
        if self.reduction == "mean":
            w = w / k
        head = None
        if self.max_grad_norm is not None:  # the final norm follows from G (heads: from their own G)
            sq = (w.unsqueeze(-2) @ G.double() @ w.unsqueeze(-1)).sum()
            heads = [ls for u, ls in zip(units, lists) if u.wgroup is None]
            for ls in heads:
                h = _utils.local_value(ops.gram(ls, backend=self.backend)).double().sum().to(sq.device)
                sq = sq + (h if inv2 is None else h * inv2.to(sq.device))
            dnorm = sq.clamp_min(0).sqrt()  # (of the unscaled gradient)
            clip = (self.max_grad_norm / (dnorm + 1e-6)).clamp(max=1.0)
            w = w * clip
            head = clip
        self._record(G if self._groups is None else G.sum(0), w)
        out = []
        for u in units:
            dev_u = u.params[0].device
            if u.wgroup is None:
                out.append([1.0] * k if head is None else head.to(dev_u).float().expand(k).contiguous())
            else:
                wu = w[u.wgroup] if self._groups is not None else w
                out.append(wu.to(dev_u))
        return out

    def _share_draws(self, device):
        """Rank 0's generator state for every rank (once, before the first draw)."""
        self._t.draws_shared = True
        state = self.weighting.state_dict()
        gen = state.get("generator")
        if gen is None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        buf = gen.to(device)  # NCCL broadcasts device tensors only
        dist.broadcast(buf, src=0)
        state["generator"] = buf.cpu()
        self.weighting.load_state_dict(state)

    def _record(self, G, w):
        """Per step only the running counts (a few ops on G); the other statistics are made from
        G and w when read (``stats``), not paid for by every step."""
        # Steps whose Gram matrix is not finite (an AMP overflow the scaler will skip) count
        # neither as conflicts nor in the denominator: the rate stays unbiased under fp16.
        finite = torch.isfinite(G).all()
        # G's diagonal (squared norms) is >= 0: a negative entry is a conflicting pair
        hit = torch.stack(((G < 0).any() & finite, finite)).double()
        self._t.counts = hit if self._t.counts is None else self._t.counts + hit
        self._t.n_steps += 1
        self._t.last = _Last(G, w, finite, self._t.counts, self._t.n_steps,
                             {f"{self.method}_{key}": v for key, v in self.weighting.info.items()})
        self._t.stats = None

    @property
    def stats(self):
        """The last aggregation's statistics (device tensors): gram, cosine, conflict,
        any_conflict, finite, weights, conflict_rate, steps, and the weighting's own."""
        if self._t.stats is None:
            self._t.stats = self._t.last.statistics()
        return self._t.stats

    @property
    def conflict_rate(self):
        """Fraction of aligned steps (with a finite Gram matrix) that had at least one
        conflicting pair; a Python float (synchronises with the device)."""
        if self._t.counts is None:
            return float("nan")
        n_conflict, n_finite = self._t.counts.tolist()
        return n_conflict / n_finite if n_finite else float("nan")

    def reset_stats(self):
        self._t.n_steps, self._t.counts, self._t.last, self._t.stats = 0, None, None, {}

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """The base optimizer's update on the aggregated gradient in ``.grad``.

        closure: either torch's kind (forward, backward, returns the loss) or one that
        returns the K task losses (a list or tuple): then backward, the aggregation and the
        base update run here, the combination folded into the update."""
        if self._t.stash is not None:
            raise RuntimeError(f"{type(self).__name__}.step(): backward(..., align=False) left task gradients "
                               "pending; call align() first (before GradScaler.step with AMP)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, (list, tuple)):
                with torch.enable_grad():
                    self.backward(loss, align=False)
                self.align(fold=True)
        # Set by GradScaler.step() (we declare _step_supports_amp_scaling): the scale still in
        # .grad and whether it overflowed, both on the device.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        coef = None if grad_scale is None else grad_scale.double().reciprocal().float()
        if self._t.aligned is not None:
            al, self._t.aligned = self._t.aligned, None
            updates = []
            for u, ls, w in zip(al.units, al.lists, al.weights):
                if coef is not None:
                    w = _scaled(w, coef, len(ls), u.params[0].device)
                updates.append(UpdatePart(u.group, u.params, ls, w, grad_out=ls[0]))
                _utils.set_grads(u.params, ls[0])
        else:
            updates = [UpdatePart(p.group, p.params, [p.grads], None if coef is None else
                                  coef.to(p.params[0].device).reshape(1)) for p in self._gather()]
        self._base_step(updates, found_inf)
        return loss

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self):
        return {"method": self.method, "weighting": self.weighting.state_dict(), "k": self._t.k,
                "n_steps": self._t.n_steps,
                "n_conflict": None if self._t.counts is None else self._t.counts[0].float().cpu(),
                "n_finite": None if self._t.counts is None else self._t.counts[1].float().cpu()}

    def _mid_step(self):
        if self._t.stash is not None or self._t.aligned is not None:
            return "between backward() and step()"
        return None

    def _transient_to_copy(self):
        t = super()._transient_to_copy()
        # made again for the copy's parameters: kept sets (and their hooks), flat views, units
        t.spare = t.take_hooks = None  # (the layout's memo is made again for the copy)
        return t

    def __getstate__(self):
        state = super().__getstate__()
        # shared= and groups= are sets of parameter ids: a copy's parameters are new objects,
        # so they travel as positions in param-group order
        pos = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state["_shared"] = None if self._shared is None else [pos[i] for i in self._shared if i in pos]
        state["_groups"] = None if self._groups is None else [[pos[i] for i in g if i in pos] for g in self._groups]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        params = [p for g in self.param_groups for p in g["params"]]
        if self._shared is not None:
            self._shared = {id(params[i]) for i in self._shared}
        if self._groups is not None:
            self._groups = [{id(params[i]) for i in g} for g in self._groups]

    def _check_extra_state(self, state):
        if state and state.get("method", self.method) != self.method:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state is for method {state['method']!r}, "
                             f"not {self.method!r}")

    def _load_extra_state(self, state):
        if not state:
            return
        dev = next((p.device for p in self._params()), torch.device("cpu"))
        ws = state.get("weighting")
        if ws is None:  # written before weightings existed: the same fields, flat
            ws = {key: state[key] for key in ("targets", "generator") if state.get(key) is not None}
        self.weighting.load_state_dict(ws)
        if ws.get("generator") is not None:
            self._t.draws_shared = True  # the same saved state on every rank
        self._t.k = state.get("k")
        self._t.n_steps = state.get("n_steps", 0)
        n, f = state.get("n_conflict"), state.get("n_finite")
        if n is None:
            self._t.counts = None
        else:
            f = f if f is not None else torch.tensor(float(self._t.n_steps))
            self._t.counts = torch.stack((n.reshape(()), f.reshape(()))).to(dev, torch.float64)
        self._t.last, self._t.stats = None, {}


class PCGrad(GradientAggregator):
    """:class:`GradientAggregator` with ``method="pcgrad"`` by default (Yu et al. 2020): the
    familiar entry point; any method name works here too."""

    default_method = "pcgrad"


def _weighting(who, method, options, seed, shortcuts):
    """The Weighting for ``method``: seed and the legacy shortcuts (beta, c, rescale) go to
    the methods whose constructor takes them; method_options are passed as given."""
    if isinstance(method, Weighting):
        if options or seed is not None:
            raise TypeError(f"{who}: method is a Weighting instance; configure it directly, not with "
                            f"{sorted(options) + (['seed'] if seed is not None else [])}")
        return method
    if isinstance(method, str) and method.strip().lower().replace("-", "_") not in available():
        raise ValueError(f"{who}: unknown method {method!r}; choose one of {list(available())} or give a Weighting")
    try:
        cls = method if isinstance(method, type) else type(make_weighting(method))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{who}: {e}") from None
    takes = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in dict(shortcuts, seed=seed).items() if v is not None and k in takes}
    try:
        return make_weighting(method, **{**extra, **options})
    except TypeError as e:
        raise TypeError(f"{who}: method {method!r} does not take these options ({e})") from None


def _keeps_k(weighting):
    """Does the weighting keep state shaped by K (GradVac's targets, Nash-MTL's weights)?"""
    return any(isinstance(v, torch.Tensor) for k, v in weighting.state_dict().items() if k != "generator")


def _param_ids(spec, what):
    if isinstance(spec, torch.nn.Module):
        params = list(spec.parameters())
    elif isinstance(spec, torch.Tensor):
        params = [spec]
    else:
        params = []
        for x in spec:
            params.extend(x.parameters() if isinstance(x, torch.nn.Module) else [x])
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what} must hold parameters or modules, got {type(p).__name__}")
    return {id(p) for p in params}


def _scaled(w, coef, k, device):
    """Weights times AMP's 1/scale (a device tensor), without a host-to-device copy."""
    if isinstance(w, torch.Tensor):
        return w * coef.to(w.device)
    c = coef.to(device).float().reshape(1)
    return torch.cat([c * x for x in w]) if any(x != 1.0 for x in w) else c.repeat(k)


@contextlib.contextmanager
def _filling(hooks, kept, t):
    """The hooks fill task t's kept set during its pass (and nothing outside it)."""
    if hooks is None:
        yield
        return
    hooks.target = kept[t]
    try:
        yield
    finally:
        hooks.target = None


@contextlib.contextmanager
def _resharded_at_exit(model):
    """FSDP2's default (reshard after backward) back on model at exit, also on an error."""
    try:
        yield
    finally:
        if model is not None:
            model.set_reshard_after_backward(True)


@contextlib.contextmanager
def _keep_graph_ok():
    """A context in which a retained backward through a graph AOTAutograd compiled with donated
    buffers is allowed: it then compiles a backward that keeps its saved tensors (checked in
    tests/test_compile_optim.py: the gradients equal the eager model's). Set and put back by
    hand: the config's patch() builds a class per call (56 us against 26 us here, per retained
    pass: a tenth of PCGrad's host work on a 400-parameter model)."""
    try:
        import torch._functorch.config as fconfig
        prev = fconfig.donated_buffer
    except (ImportError, AttributeError):
        yield
        return
    fconfig.donated_buffer = False
    try:
        yield
    finally:
        fconfig.donated_buffer = prev
