"""RoGA: robust gradient alignment (Qiu, Jiang, Tan 2025) on fused multi-tensor ops.

Per training domain ``d``: ``g = grad L(theta; D_d)``, a SAM-like ascent to
``theta + eps_d`` with ``eps_d = rho g / ||g||``, the gradient ``h`` there, and the
alignment term ``-alpha <h, g>``. First-order alignment (the default) folds the alignment
into the ascent, because ``grad L(theta + eps - alpha g) ~ h - alpha H g``: ascend to
``theta + (rho / ||g|| - alpha) g`` and take the gradient there. ``alignment="hvp"``
computes ``h - alpha H(theta + eps) g`` exactly with one double-backward Hessian-vector
product per domain (the perturbed backward needs ``create_graph=True``: roughly one more
backward pass of cost and the autograd graph kept alive for it).

The base optimizer steps on the mean over domains of these gradients::

    opt = RoGA(model.parameters(), torch.optim.SGD, lr=0.005, rho=0.1, alpha=2e-4, momentum=0.9)
    opt.zero_grad()
    for x, y in domain_batches:                 # one batch per training domain
        loss_fn(model(x), y).backward()
        opt.perturb()
        with freeze_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.accumulate()
    opt.step()

or ``opt.step(closure, num_domains=K)`` with ``closure(d)`` doing forward + backward of
domain ``d`` and returning its loss. With AMP: ``scaler.scale(loss).backward()`` for both
passes, ``opt.perturb(scaler=scaler)``, and ``opt.step(scaler=scaler); scaler.update()``.

``interval=k``: RoGA every k-th step (the first included), the base optimizer on the mean
domain gradient in between (one backward per domain): ``perturb()`` returns False then and
leaves ``.grad`` for ``accumulate()``, so skip the perturbed backward::

    for x, y in domain_batches:
        loss_fn(model(x), y).backward()
        if opt.perturb():
            with freeze_bn_stats(model):
                loss_fn(model(x), y).backward()
        opt.accumulate()
    opt.step()

``capturable=True`` keeps every tensor of a step in place, so the step can be captured in
CUDA graphs and replayed (docs/optimizers.md, "CUDA graphs"): ``.grad`` keeps its tensors
(``perturb()`` and ``accumulate()`` zero them in place; the user zeroes them in place at
the start of a step, ``zero_grad(set_to_none=False)``) and the accumulators live between
steps. It needs ``num_domains``, the copy strategy and first-order alignment.

Passes per domain: norm, perturb, restore + accumulate (3). With ``num_domains`` known,
no clipping, no AMP and no cross-process sync, the last domain's restore and accumulation
are folded into the base update: that domain costs norm, perturb, update (DESIGN.md).
"""
import contextlib
import inspect
import itertools
import operator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import ops
from . import _utils
from .base import WrapperOptimizer
from .fused import UpdatePart
from .perturb import Move, Perturber
from .sam import check_hyper, check_interval


@dataclass
class _Pending:
    """Between perturb() and accumulate(): what moved, and AMP's inverse scale."""
    moves: list
    inv_scale: object
    plain: bool = False  # a step of `interval` without perturbation: .grad is accumulated as it is


@dataclass
class _Final:
    """The last domain, left for step() to fold into the base update: its moves (still
    perturbed) and gradients at the perturbed point."""
    moves: list
    hs: list  # per move
    accs: list  # per move: the accumulator positions (None for K = 1)


class RoGA(WrapperOptimizer):
    """Robust gradient alignment over K training domains.

    Args:
        params, base_optimizer, **base_kwargs: as for :class:`SAM`.
        rho: ascent radius (per group). alpha: alignment weight (per group).
        alignment: "first_order" (no extra pass) or "hvp" (exact Hessian-vector product).
        strategy: "copy" / "swap" / "auto", as for :class:`SAM`.
        max_grad_norm: clip the final (mean) gradient to this global norm.
        num_domains: K, if known: the last accumulate() then divides by K in the same pass,
            or (fused update, no clipping/AMP/sync) is folded into the base update itself.
        ddp_sync: all-reduce the accumulated gradient once per step across processes
            (default: when torch.distributed is initialised with more than one process).
            Run every forward/backward under ``model.no_sync()`` (see :meth:`no_sync`).
        fused: run the base update (SGD, Adam, AdamW) as a fused primitive.
        interval: perturb every ``interval``-th step only, the plain mean domain gradient
            in between (see the module docstring); the step count is in ``state_dict()``.
        capturable: static tensors for CUDA-graph capture (see the module docstring): ``.grad``
            is zeroed in place instead of set to None (``zero_grad()`` too, by default), one
            accumulator per parameter is kept between steps, and after step() ``.grad`` holds
            the mean gradient, as in eager mode. A base optimizer class that takes
            ``capturable`` (torch's Adam) is built with it.
    """

    _step_supports_amp_scaling = True  # so GradScaler.step(opt) reaches step() and gets a clear error

    def __init__(self, params, base_optimizer, rho=0.1, alpha=2e-4, alignment="first_order", backend="auto",
                 strategy="auto", max_grad_norm=None, num_domains=None, ddp_sync=None, fused=True, interval=1,
                 capturable=False, **base_kwargs):
        check_hyper("RoGA", rho=rho, alpha=alpha)
        self.interval = check_interval("RoGA", interval)
        if alignment not in ("first_order", "hvp"):
            raise ValueError(f"RoGA: alignment must be 'first_order' or 'hvp', got {alignment!r}")
        if num_domains is not None and int(num_domains) < 1:
            raise ValueError(f"RoGA: num_domains must be >= 1, got {num_domains}")
        self.capturable = bool(capturable)
        if self.capturable:
            _check_capturable(alignment, strategy, num_domains, self.interval)
            strategy = "copy"
            if isinstance(base_optimizer, type) and "capturable" in inspect.signature(base_optimizer).parameters:
                base_kwargs.setdefault("capturable", True)  # (torch's Adam/AdamW when it steps: fused=False)
        super().__init__(params, base_optimizer, dict(rho=rho, alpha=alpha), backend, max_grad_norm, fused,
                         **base_kwargs)
        self._perturber = Perturber(backend, strategy)
        self._t.steps = 0  # completed steps: which ones perturb (interval); in state_dict()
        self.alignment = alignment
        self.num_domains = None if num_domains is None else int(num_domains)
        self.ddp_sync = ddp_sync
        self._sync()  # a clear error now for ddp_sync=True on sharded (FSDP) parameters
        if alignment == "hvp" and self._layout().sharded:
            raise ValueError("RoGA: alignment='hvp' differentiates through the gradient, but the gradients of sharded "
                             "(FSDP) parameters come out of FSDP's reduce-scatter without an autograd graph; use "
                             "alignment='first_order'")
        self._t.pending = None  # _Pending between perturb() and accumulate()
        self._t.final = None  # _Final: the last domain, folded into step()
        self._t.acc = {}  # id(layout part list) -> accumulated gradients of that list, this step
        # id(layout part list) -> None when a domain reached the whole list, else per position
        # whether some domain reached it, a tuple of flags (a head only one domain uses)
        self._t.reached = {}
        self._t.count = 0  # accumulate() calls this step
        self._t.acc_is_mean = False  # the last accumulate() already divided by K
        # Kept in the layout's memo: "roga_full" {id(move params): (params, layout list, flags)};
        # "roga_flat" the accumulators as _utils.FlatViews when syncing across processes;
        # "roga_kept" (capturable) {id(layout list): accumulators}, kept between steps.
        self._t.acc_zeroed = False  # the flat accumulators were zeroed this step

    @property
    def strategy(self):
        return self._perturber.strategy

    def zero_grad(self, set_to_none=None):
        """As torch.optim's; with ``capturable=True`` the default zeroes ``.grad`` in place
        (captured graphs keep reading those tensors)."""
        super().zero_grad(set_to_none=not self.capturable if set_to_none is None else set_to_none)

    # ---------------------------------------------------------------------------------
    @staticmethod
    def no_sync(model):
        """``model.no_sync()`` for a DistributedDataParallel model, else a no-op context."""
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    @torch.no_grad()
    def perturb(self, scaler=None):
        """Ascend from the current gradients (domain d's first backward) and clear ``.grad``.

        scaler: the GradScaler whose scale is in ``.grad``: the alignment term
        ``-alpha g`` is not scale-invariant, so it is divided by the scale (on device).
        Returns True when it perturbed; False on a plain step of ``interval`` (``.grad``
        is kept for ``accumulate()``: no backward at a perturbed point).
        """
        if self._t.pending is not None:
            raise RuntimeError("RoGA.perturb() called twice: call accumulate() after the backward pass at "
                               "the perturbed point")
        if self._t.final is not None:
            raise RuntimeError(f"RoGA.perturb(): all num_domains={self.num_domains} domains are accumulated; "
                               "call step() first")
        parts = self._gather()
        if not parts:
            raise RuntimeError("RoGA.perturb(): no parameter has a gradient; call loss.backward() first")
        flat = self._layout().memo.get("roga_flat")
        if self._t.count == 0 and flat is not None:
            if flat.views.get(id(parts[0].params[0])) is parts[0].grads[0]:
                raise RuntimeError("RoGA: .grad still holds the previous step's gradient; call opt.zero_grad() "
                                   "before the first backward of a step")
        inv = _utils.inv_scale_of(scaler)
        if self._t.steps % self.interval != 0:
            self._t.pending = _Pending([], inv, plain=True)
            return False
        norm = _utils.global_norm([(p.params, p.grads) for p in parts], self.backend)
        strategy = self._perturber.strategy_for([p.params for p in parts])
        # A CPU norm is read on the host (nothing to wait for) and the scale is plain float
        # math: on 0-d tensors its four ops took ~35 of ~240 us of a perturb() (400 tensors).
        if inv is None and norm.device.type == "cpu" and not torch.compiler.is_compiling():
            norm = float(norm)
        moves = []
        for part in parts:
            g = part.group
            scale = g["rho"] / (norm + 1e-12)
            if self.alignment == "first_order":
                scale = scale - g["alpha"] * (1.0 if inv is None else inv.to(scale.device))
            if isinstance(scale, torch.Tensor):
                scale = scale.to(part.params[0].device)
            moves.append(self._perturber.perturb(part.params, part.grads, scale, strategy, group=g))
        if self.capturable:  # the backward at the perturbed point writes into the same tensors
            for part in parts:
                torch._foreach_zero_(part.grads)
        else:
            _utils.set_grads(self._layout().params, None)  # the moves keep the gradients the hvp needs
        self._t.pending = _Pending(moves, inv)
        return True

    @torch.no_grad()
    def accumulate(self):
        """Add the gradient at the perturbed point (domain d's second backward), restore the
        parameters, and clear ``.grad`` for the next domain."""
        if self._t.pending is None:
            raise RuntimeError("RoGA.accumulate() without perturb(): for each domain call backward, perturb(), "
                               "backward at the perturbed point, then accumulate()")
        if self.num_domains is not None and self._t.count >= self.num_domains:
            raise RuntimeError(f"RoGA.accumulate() called more than num_domains={self.num_domains} times in one step")
        moves, inv, plain = self._t.pending.moves, self._t.pending.inv_scale, self._t.pending.plain
        if plain:  # the gradient at theta itself: "moves" that did not move
            moves = [Move("none", p.params, None, p.grads, p.group) for p in self._gather()]
        hs = [self._grads_at(m.params) for m in moves]
        if self.alignment == "hvp" and not plain:  # checked before anything changes: abort() can still restore
            if not all(h.requires_grad for hl in hs for h in hl):
                raise RuntimeError("RoGA(alignment='hvp') needs the backward pass at the perturbed point to keep its "
                                   "graph: call loss.backward(create_graph=True) there (the closure form passes "
                                   "create_graph=True to closure(d, create_graph=True))")
            hs = [self._hvp(m, h, inv) for m, h in zip(moves, hs)]
        self._t.pending = None
        k = self._t.count + 1
        last = self.num_domains is not None and k == self.num_domains
        sync = self._sync()
        # The last domain divides by K in its own pass (or folds it into the update) only where
        # it covers every position accumulated so far; else step() divides the whole sum.
        whole = self._reach(moves)
        fold = last and whole and self.fused and not sync and self.max_grad_norm is None and inv is None and not plain
        if self.capturable and not sync:
            self._accumulate_static(moves, hs, k, last, whole, fold)
            return
        # (across processes the accumulators are the flat buffers, in both modes)
        try:
            if fold:
                accs = [None if k == 1 else self._acc_positions(m, sync) for m in moves]
                self._t.final = _Final(moves, hs, accs)  # restore + accumulate + update: one pass, in step()
            else:
                mean = last and k > 1 and whole
                for m, h in zip(moves, hs):
                    self._restore_accumulate(m, h, first=(k == 1), mean=mean, sync=sync)
                self._t.acc_is_mean = mean
        except BaseException:  # (pending is gone: abort() could not restore the parameters)
            self._perturber.restore(moves)
            raise
        finally:
            if self.capturable:
                for h in hs:
                    torch._foreach_zero_(h)
            else:
                _utils.set_grads(self._layout().params, None)
        self._t.count = k

    def _reach(self, moves):
        """Records which positions of their layout lists these moves reach (for step(): a
        parameter no domain reached is not stepped); returns whether they reach every position
        an earlier domain reached (then the last domain can divide by K in its own pass)."""
        reached = self._t.reached  # id(list) -> None (every position) or a tuple of flags
        missing = set(reached)  # lists earlier domains reached
        whole = True
        for m in moves:
            full, keep = self._full(m)
            key = id(full)
            missing.discard(key)
            before = reached.get(key, ())
            if keep is None:
                reached[key] = None
            elif before is None:
                whole = False  # an earlier domain reached positions this one does not
            elif before == ():
                reached[key] = keep
            else:  # (builtins over the flags: no Python per parameter)
                whole = whole and all(map(operator.or_, keep, map(operator.not_, before)))
                reached[key] = tuple(map(operator.or_, before, keep))
        return whole and not missing

    def _grads_at(self, params):
        gs, missing = _utils.grads_of(params)
        if not missing:
            return gs
        gs = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, gs)]
        if self.capturable:  # they become .grad: the tensors a captured step reads
            _utils.set_grads(params, gs)
        return gs

    # -- capturable: static .grad, accumulators kept between steps --------------------------
    def _accumulate_static(self, moves, hs, k, last, whole, fold):
        """accumulate() with every tensor in place, on one process. Before the last domain:
        acc (+)= h, then .grad zeroed. The last domain leaves the sum or mean in .grad itself,
        or (fold) is left for step(), which writes the mean gradient into .grad as it updates.
        (Across processes accumulate() adds into the flat accumulators in both modes, and
        step() writes the mean into .grad after the all-reduce.)"""
        if last and not whole:
            self._perturber.restore(moves)
            raise RuntimeError("RoGA(capturable=True): the last domain reached fewer parameters than an earlier one, "
                               "so .grad cannot hold the step's gradient: within a step, zero gradients in place "
                               "(zero_grad(set_to_none=False)), never to None")
        try:
            if fold:
                accs = [None if k == 1 else self._static_acc(m, fill=False) for m in moves]
                self._t.final = _Final(moves, hs, accs)
                self._t.count = k
                return
            be = self.backend
            for m, h in zip(moves, hs):
                full, keep = self._full(m)
                fresh = id(full) not in self._t.acc  # no earlier domain reached this list
                if last:
                    self._undo(m)
                    if k > 1:  # .grad <- (acc + h) / K
                        w = 1.0 / k
                        ops.combine_(h, [h] if fresh else [self._static_acc(m, fill=False), h],
                                     [w] if fresh else [w, w], backend=be)
                    if keep is None:
                        self._t.acc[id(full)] = h
                    else:  # full length for step(); the positions no domain reached are dropped there
                        it = iter(h)
                        self._t.acc[id(full)] = [next(it) if f else None for f in keep]
                    continue
                acc = self._static_acc(m, fill=True)
                if fresh and keep is None:  # acc <- h
                    self._undo(m)
                    ops.combine_(acc, [h], [1.0], backend=be)
                elif m.kind == "copy":
                    ops.restore_accumulate_(m.params, m.saved, acc, h, 1.0, backend=be)
                else:
                    self._undo(m)
                    ops.combine_(acc, [acc, h], [1.0, 1.0], backend=be)
                torch._foreach_zero_(h)
            self._t.acc_is_mean = last and k > 1
        except BaseException:  # (pending is gone: abort() could not restore the parameters)
            self._perturber.restore(moves)
            for h in hs:
                torch._foreach_zero_(h)
            raise
        self._t.count = k

    def _static_acc(self, m, fill):
        """The kept accumulators at m's positions. The first time this step that a domain
        reaches their list they hold the last step's sum: zeroed here, unless ``fill`` (the
        caller overwrites every position, which it can when m covers the whole list)."""
        full, keep = self._full(m)
        store = self._layout().memo.setdefault("roga_kept", {})
        acc = store.get(id(full))
        if acc is None:
            acc = store[id(full)] = [torch.zeros_like(p) for p in full]
        if id(full) not in self._t.acc:
            self._t.acc[id(full)] = acc
            if not fill or keep is not None:
                torch._foreach_zero_(acc)
        return acc if keep is None else list(itertools.compress(acc, keep))

    def _hvp(self, m, hs, inv):
        with torch.enable_grad():
            hv = torch.autograd.grad(hs, m.params, grad_outputs=m.grads, allow_unused=True)
        hs = [h.detach() for h in hs]
        # autograd may return H g in another (dense) memory layout than h: match it, the
        # fused kernels walk both in storage order
        hv = [torch.zeros_like(h) if v is None else (v.detach() if v.stride() == h.stride() else
              torch.empty_like(h).copy_(v)) for h, v in zip(hs, hv)]
        alpha = m.group["alpha"]
        a = -alpha if inv is None else -alpha * inv  # scaled h and g: H g carries the scale twice
        ops.combine_(hs, [hs, hv], [1.0, a], backend=self.backend)
        return hs

    # -- accumulators --------------------------------------------------------------------
    def _full(self, m):
        """The layout part list (the group's parameters on the device) that holds m.params,
        and per position of it whether m.params has it (None when m.params is that very
        list). Cached per list: the base class hands out the same subset list step after step."""
        lay = self._layout()
        cache = lay.memo.setdefault("roga_full", {})
        hit = cache.get(id(m.params))
        if hit is not None and hit[0] is m.params:
            return hit[1], hit[2]
        if any(ps is m.params for _, ps in lay.parts):
            out = m.params, None
        else:
            ps = next((ps for group, ps in lay.parts
                       if group is m.group and ps and ps[0].device == m.params[0].device), None)
            if ps is None:
                raise RuntimeError("RoGA: the parameter groups changed in the middle of a step")
            mine = set(map(id, m.params))
            out = ps, tuple(id(p) in mine for p in ps)
        if len(cache) > 64:
            cache.clear()
        cache[id(m.params)] = (m.params, *out)
        return out

    def _acc_positions(self, m, sync):
        """The accumulator tensors at m's positions (allocating the part's accumulators)."""
        full, keep = self._full(m)
        acc = self._t.acc.get(id(full))
        if acc is None:
            if sync:
                views = self._flat_views()
                acc = [views[id(p)] for p in full]
            else:
                acc = [torch.zeros_like(p) for p in full]
            self._t.acc[id(full)] = acc
        return acc if keep is None else list(itertools.compress(acc, keep))

    def _restore_accumulate(self, m, hs, first, mean, sync):
        be = self.backend
        full, keep = self._full(m)
        if first and not sync and keep is None:  # the gradients themselves become the accumulator: no copy
            self._undo(m)
            self._t.acc[id(full)] = hs
            return
        acc = self._acc_positions(m, sync)
        if first and sync and not self._t.acc_zeroed:
            for buf in self._layout().memo["roga_flat"].buffers:
                buf.zero_()
            self._t.acc_zeroed = True
        if mean:  # acc = (acc + h) / K in the same pass
            self._undo(m)
            w = 1.0 / self.num_domains
            ops.combine_(acc, [acc, hs], [w, w], backend=be)
        elif m.kind == "copy":
            ops.restore_accumulate_(m.params, m.saved, acc, hs, 1.0, backend=be)
        else:
            self._undo(m)
            ops.combine_(acc, [acc, hs], [1.0, 1.0], backend=be)

    def _undo(self, m):
        """Restore a move's parameters (nothing to do on a plain step)."""
        if m.kind != "none":
            self._perturber.restore([m])

    def _flat_views(self):
        """Accumulators as views of one flat buffer per dtype/device: one all-reduce per step."""
        lay = self._layout()
        flat = lay.memo.get("roga_flat")
        if flat is None:
            flat = lay.memo["roga_flat"] = _utils.flat_views(lay.params)
            self._t.acc_zeroed = False
        return flat.views

    @torch.no_grad()
    def abort(self):
        """Undo a pending perturbation and drop what was accumulated this step."""
        for moves in (self._t.pending.moves if self._t.pending else [], self._t.final.moves if self._t.final else []):
            self._perturber.restore(moves)
        if self.capturable:  # keep the static tensors
            gs = [g for g in _utils.grads_of(self._layout().params)[0] if g is not None]
            if gs:
                torch._foreach_zero_(gs)
        else:
            _utils.set_grads(self._layout().params, None)
        self._t.pending = self._t.final = None
        self._reset_step()

    def _reset_step(self):
        self._t.acc, self._t.count, self._t.acc_is_mean, self._t.acc_zeroed = {}, 0, False, False
        self._t.reached = {}

    # ---------------------------------------------------------------------------------
    def step(self, closure=None, num_domains=None, *, scaler=None, bn_model=None):
        """Apply the base optimizer to the mean accumulated gradient.

        closure, num_domains: run the whole per-domain loop here: ``closure(d)`` does the
        forward and backward of domain ``d`` and returns its loss (with alignment="hvp" it is
        called as ``closure(d, create_graph=True)`` at the perturbed point). Returns the mean
        first-pass loss. bn_model: freeze its BatchNorm statistics on the perturbed passes.
        scaler: a GradScaler whose scale is in the gradients (then call scaler.update()).
        """
        if hasattr(self, "found_inf") or hasattr(self, "grad_scale"):
            raise RuntimeError("RoGA accumulates the domain gradients outside .grad until step(), so "
                               "GradScaler.step(optimizer) cannot check them: call optimizer.step(scaler=scaler), "
                               "then scaler.update()")
        loss = None
        if closure is not None:
            loss = self._run_closure(closure, num_domains, scaler, bn_model)
        if self._t.pending is not None:
            raise RuntimeError("RoGA.step(): perturb() was called without accumulate(); run the backward pass at "
                               "the perturbed point and accumulate() first (or abort())")
        if self._t.count == 0:
            raise RuntimeError("RoGA.step() with nothing accumulated: for each domain call backward, perturb(), "
                               "backward, accumulate() first, or use step(closure, num_domains)")
        self._apply(scaler)
        self._t.steps += 1
        return loss

    def _run_closure(self, closure, num_domains, scaler, bn_model):
        k = num_domains if num_domains is not None else self.num_domains
        if k is None or int(k) < 1:
            raise ValueError("RoGA.step(closure): give num_domains (the number of domains closure(d) accepts)")
        if self._t.pending is not None or self._t.count:
            raise RuntimeError("RoGA.step(closure): a manual perturb()/accumulate() cycle is in progress")
        if self.capturable and int(k) != self.num_domains:
            raise ValueError(f"RoGA(capturable=True, num_domains={self.num_domains}).step(closure): got num_domains={k}")
        saved_k, self.num_domains = self.num_domains, int(k)
        self.zero_grad(set_to_none=not self.capturable)
        losses = []
        try:
            for d in range(int(k)):
                with torch.enable_grad():
                    loss = closure(d)
                if loss is None:
                    raise RuntimeError("RoGA.step(closure): closure(d) returned None; it must return the loss "
                                       "after calling loss.backward()")
                if self.perturb(scaler=scaler):
                    ctx = _utils.freeze_bn_stats(bn_model) if bn_model is not None else contextlib.nullcontext()
                    with ctx, torch.enable_grad():
                        if self.alignment == "hvp":
                            closure(d, create_graph=True)
                        else:
                            closure(d)
                self.accumulate()
                losses.append(loss.detach())
        except BaseException:
            self.abort()
            raise
        finally:
            self.num_domains = saved_k
        return torch.stack(losses).float().mean()

    @torch.no_grad()
    def _apply(self, scaler):
        if self._t.final is not None:
            if scaler is None or not scaler.is_enabled():
                self._apply_final()
                return
            self._unfold()  # AMP must see the whole gradient before the update: no fold
        sync = self._sync()
        lay = self._layout()
        accs = [_reached_only(group, ps, self._t.acc[id(ps)], self._t.reached.get(id(ps)))
                for group, ps in lay.parts if id(ps) in self._t.acc]
        if sync:  # every parameter gets its (all-reduced) gradient, zero where this rank had none
            views = self._flat_views()
            bufs = lay.memo["roga_flat"].buffers
            if not self._t.acc_zeroed:  # a rank with no gradient at all this step still joins the collective
                for buf in bufs:
                    buf.zero_()
            accs = [(group, ps, [views[id(p)] for p in ps]) for group, ps in lay.parts]
        coef = 1.0 if self._t.acc_is_mean else 1.0 / self._t.count
        # capturable: the result goes into the kept .grad tensors; the last domain put it there
        # unless the all-reduce or a step short of num_domains left it in the accumulators
        into_grads = self.capturable and (sync or self._t.count != self.num_domains)
        self._reset_step()
        if sync:
            for buf in bufs:
                dist.all_reduce(buf)  # one collective per dtype/device: the whole step's gradient
            coef = coef / dist.get_world_size()
        if into_grads:  # the mean into the kept .grad tensors, which the update then reads
            static = []
            for group, ps, acc in accs:
                grads = self._grads_at(ps)  # (made once where missing)
                ops.combine_(grads, [acc], [coef], backend=self.backend)
                static.append((group, ps, grads))
            accs, coef = static, 1.0
        for _, ps, acc in accs:
            _utils.set_grads(ps, acc)
        found_inf = None
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self.base_optimizer)  # .grad /= scale, and records inf/nan for update()
            found_inf = _utils.scaler_found_inf(scaler, self.base_optimizer)
        if self.max_grad_norm is not None:
            n = _utils.global_norm([(ps, acc) for _, ps, acc in accs], self.backend) * coef
            coef = _utils.clip_coef(n, self.max_grad_norm) * coef
        parts = []
        for group, ps, acc in accs:
            # (isinstance first: comparing a device tensor with 1.0 would read it on the host)
            w = None if not isinstance(coef, torch.Tensor) and coef == 1.0 else _weight(coef, ps[0].device)
            parts.append(UpdatePart(group, ps, [acc], w, grad_out=acc if w is not None else None))
        self._base_step(parts, found_inf)

    def _unfold(self):
        """Turns a folded last domain back into its restore + accumulate (mean) passes."""
        fin, self._t.final = self._t.final, None
        if self.capturable:
            self._accumulate_static(fin.moves, fin.hs, self._t.count, last=True, whole=True, fold=False)
            return
        for m, hs in zip(fin.moves, fin.hs):
            self._restore_accumulate(m, hs, first=self._t.count == 1, mean=self._t.count > 1, sync=False)
        self._t.acc_is_mean = self._t.count > 1

    def _apply_final(self):
        """The last domain folded into the update: params <- update(backup, mean gradient)."""
        fin, self._t.final = self._t.final, None
        k = self._t.count
        parts = []
        for m, hs, acc in zip(fin.moves, fin.hs, fin.accs):
            source = None
            if m.kind == "copy":
                source = m.saved
            else:
                self._perturber.unswap(m)
            if acc is None:  # K = 1: the gradient is h itself
                parts.append(UpdatePart(m.group, m.params, [hs], None, source))
                _utils.set_grads(m.params, hs)
            elif self.capturable:  # the mean gradient into .grad (h), which it reads first
                parts.append(UpdatePart(m.group, m.params, [acc, hs], [1.0 / k, 1.0 / k], source, grad_out=hs))
            else:
                parts.append(UpdatePart(m.group, m.params, [acc, hs], [1.0 / k, 1.0 / k], source, grad_out=acc))
                _utils.set_grads(m.params, acc)
        self._reset_step()
        self._base_step(parts)

    def _extra_state(self):
        return {"steps": self._t.steps}

    def _check_extra_state(self, state):
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"RoGA.load_state_dict: 'steps' must be an integer >= 0, got {steps!r}")

    def _load_extra_state(self, state):
        self._t.steps = state.get("steps", 0)

    def _mid_step(self):
        if self._t.pending is not None or self._t.count or self._t.final is not None:
            return f"in the middle of a step ({self._t.count} domain(s) accumulated)"
        return None

    def _transient_to_copy(self):
        t = super()._transient_to_copy()
        t.acc_zeroed = False  # (the layout's memo, with the flat accumulators, is made again for the copy)
        return t

    def state_dict(self):
        if self._mid_step() is not None:
            raise RuntimeError(f"RoGA.state_dict() in the middle of a step ({self._t.count} domain(s) accumulated, "
                               "their gradients live only in this step): save before the first domain or after "
                               "step() (or call abort())")
        return super().state_dict()


def _check_capturable(alignment, strategy, num_domains, interval):
    why = None
    if num_domains is None:
        why = "give num_domains: a captured step runs a fixed number of domains"
    elif alignment != "first_order":
        why = "alignment='hvp' runs autograd inside accumulate(); use alignment='first_order'"
    elif strategy == "swap":
        why = "strategy='swap' moves parameter storage; use strategy='copy' (or 'auto')"
    elif interval != 1:
        why = "interval > 1 alternates two different steps, which one replayed graph cannot tell apart"
    if why:
        raise ValueError(f"RoGA(capturable=True): {why}")


def _reached_only(group, ps, acc, marks):
    """(group, params, accumulators) of a layout list, less the parameters no domain reached
    this step (marks: None when all were): like torch.optim, a parameter without a gradient is
    not stepped (no weight decay, no momentum)."""
    if marks is None or all(marks):
        return group, ps, acc
    return group, list(itertools.compress(ps, marks)), list(itertools.compress(acc, marks))


def _weight(coef, device):
    if isinstance(coef, torch.Tensor):
        return coef.to(device).reshape(1).float()
    return [float(coef)]
