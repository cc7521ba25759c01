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
"""
import contextlib

import torch
import torch.distributed as dist

from .. import ops
from .base import WrapperOptimizer, by_device, choose_strategy, flat_views, freeze_bn_stats, inv_scale_of


class RoGA(WrapperOptimizer):
    """Robust gradient alignment over K training domains.

    Args:
        params, base_optimizer, **base_kwargs: as for :class:`SAM`.
        rho: ascent radius (per group). alpha: alignment weight (per group).
        alignment: "first_order" (no extra pass) or "hvp" (exact Hessian-vector product).
        strategy: "copy" / "swap" / "auto", as for :class:`SAM`.
        max_grad_norm: clip the final (mean) gradient to this global norm.
        num_domains: K, if known: the last accumulate() then also divides by K in the same
            pass (saves one pass over the gradient per step).
        ddp_sync: all-reduce the accumulated gradient once per step across processes
            (default: when torch.distributed is initialised with more than one process).
            Run every forward/backward under ``model.no_sync()`` (see :meth:`no_sync`).
    """

    _step_supports_amp_scaling = True  # so GradScaler.step(opt) reaches step() and gets a clear error

    def __init__(self, params, base_optimizer, rho=0.1, alpha=2e-4, alignment="first_order", backend="auto",
                 strategy="auto", max_grad_norm=None, num_domains=None, ddp_sync=None, **base_kwargs):
        if rho < 0:
            raise ValueError(f"RoGA: rho must be >= 0, got {rho}")
        if alignment not in ("first_order", "hvp"):
            raise ValueError(f"RoGA: alignment must be 'first_order' or 'hvp', got {alignment!r}")
        if num_domains is not None and int(num_domains) < 1:
            raise ValueError(f"RoGA: num_domains must be >= 1, got {num_domains}")
        super().__init__(params, base_optimizer, dict(rho=rho, alpha=alpha), backend, max_grad_norm, **base_kwargs)
        choose_strategy(strategy, [])
        self.strategy = strategy
        self.alignment = alignment
        self.num_domains = None if num_domains is None else int(num_domains)
        self.ddp_sync = ddp_sync
        self._pending = None  # between perturb() and accumulate()
        self._acc = {}  # id(param) -> (param, accumulated gradient); id keys: Tensor.__hash__ is slow
        self._count = 0  # accumulate() calls this step
        self._acc_is_mean = False  # the last accumulate() already divided by K
        self._flat = None  # (params, {dtype/device: flat buffer}, {param: view}) when syncing across processes

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
        """
        if self._pending is not None:
            raise RuntimeError("RoGA.perturb() called twice: call accumulate() after the backward pass at "
                               "the perturbed point")
        parts = [(g, ps, gs) for g, ps, gs in self._with_grads() if ps]
        if not parts:
            raise RuntimeError("RoGA.perturb(): no parameter has a gradient; call loss.backward() first")
        if self._count == 0 and self._flat is not None:
            views = self._flat[2]
            p0, g0 = parts[0][1][0], parts[0][2][0]
            if views.get(id(p0)) is g0:
                raise RuntimeError("RoGA: .grad still holds the previous step's gradient; call opt.zero_grad() "
                                   "before the first backward of a step")
        norm = self._norm([(ps, gs) for _, ps, gs in parts])
        inv = inv_scale_of(scaler)
        strategy = self._strategy([p for _, ps, _ in parts for p in ps])
        moves, stash = [], {}
        for group, ps, gs in parts:
            scale = group["rho"] / (norm + 1e-12)
            if self.alignment == "first_order":
                scale = scale - group["alpha"] * (1.0 if inv is None else inv)
            for dps, dgs in by_device(ps, gs):
                moves.append((group["alpha"], self._perturb_params(dps, dgs, scale.to(dps[0].device), strategy)))
            if self.alignment == "hvp":
                stash.update((id(p), g) for p, g in zip(ps, gs))
        for _, ps, _ in parts:
            for p in ps:
                p.grad = None
        self._pending = (moves, stash, inv)

    @torch.no_grad()
    def accumulate(self):
        """Add the gradient at the perturbed point (domain d's second backward), restore the
        parameters, and clear ``.grad`` for the next domain."""
        if self._pending is None:
            raise RuntimeError("RoGA.accumulate() without perturb(): for each domain call backward, perturb(), "
                               "backward at the perturbed point, then accumulate()")
        if self.num_domains is not None and self._count >= self.num_domains:
            raise RuntimeError(f"RoGA.accumulate() called more than num_domains={self.num_domains} times in one step")
        moves, stash, inv = self._pending
        self._pending = None
        k = self._count + 1
        last = self.num_domains is not None and k == self.num_domains and k > 1
        sync = self._sync()
        try:
            for alpha, (kind, ps, saved) in moves:
                hs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
                if self.alignment == "hvp":
                    hs = self._hvp(ps, hs, [stash[id(p)] for p in ps], alpha, inv)
                self._restore_accumulate(kind, ps, saved, hs, first=(k == 1), last=last, sync=sync)
        finally:
            for alpha, (kind, ps, saved) in moves:
                for p in ps:
                    p.grad = None
        self._count = k
        self._acc_is_mean = last

    def _hvp(self, ps, hs, gs, alpha, inv):
        if not all(h.requires_grad for h in hs):
            raise RuntimeError("RoGA(alignment='hvp') needs the backward pass at the perturbed point to keep its "
                               "graph: call loss.backward(create_graph=True) there (the closure form passes "
                               "create_graph=True to closure(d, create_graph=True))")
        with torch.enable_grad():
            hv = torch.autograd.grad(hs, ps, grad_outputs=gs, allow_unused=True)
        hs = [h.detach() for h in hs]
        # autograd may return H g in another (dense) memory layout than h: match it, the
        # fused kernels walk both in storage order
        hv = [torch.zeros_like(h) if v is None else (v.detach() if v.stride() == h.stride() else
              torch.empty_like(h).copy_(v)) for h, v in zip(hs, hv)]
        a = -alpha if inv is None else -alpha * inv  # scaled h and g: H g carries the scale twice
        ops.combine_(hs, [hs, hv], [1.0, a], backend=self.backend)
        return hs

    def _acc_tensors(self, ps, sync):
        if not sync:
            return [self._acc[id(p)][1] for p in ps]
        views = self._flat_views(ps)
        return [views[id(p)] for p in ps]

    def _flat_views(self, ps):
        """Accumulators as views of one flat buffer per dtype/device: one all-reduce per step."""
        if self._flat is None or any(id(p) not in self._flat[2] for p in ps):
            allp = self._params()
            self._flat = (allp, *flat_views(allp))
        return self._flat[2]

    def _restore_accumulate(self, kind, ps, saved, hs, first, last, sync):
        be = self.backend
        if first:
            self._restore_params([(kind, ps, saved)])
            if sync:  # copy into the flat buffer (zeros for parameters without a gradient this step)
                if len(self._acc) == 0:
                    self._flat_views(ps)
                    for buf in self._flat[1]:
                        buf.zero_()
                acc = self._acc_tensors(ps, sync)
                ops.combine_(acc, [hs], [1.0], backend=be)
                self._acc.update((id(p), (p, a)) for p, a in zip(ps, acc))
            else:
                self._acc.update((id(p), (p, h)) for p, h in zip(ps, hs))  # the gradients themselves: no copy
            return
        new = [p for p in ps if id(p) not in self._acc]
        for p in new:  # a parameter without a gradient in earlier domains
            self._acc[id(p)] = (p, torch.zeros_like(p) if not sync else self._flat_views([p])[id(p)])
        acc = self._acc_tensors(ps, sync)
        if last:  # acc = (acc + h) / K in the same pass
            self._restore_params([(kind, ps, saved)])
            w = 1.0 / self.num_domains
            ops.combine_(acc, [acc, hs], [w, w], backend=be)
        elif kind == "copy":
            ops.restore_accumulate_(ps, saved, acc, hs, 1.0, backend=be)
        else:
            self._restore_params([(kind, ps, saved)])
            ops.combine_(acc, [acc, hs], [1.0, 1.0], backend=be)

    @torch.no_grad()
    def abort(self):
        """Undo a pending perturbation and drop what was accumulated this step."""
        if self._pending is not None:
            moves = [m for _, m in self._pending[0]]
            self._restore_params(moves)
            for _, ps, _ in moves:
                for p in ps:
                    p.grad = None
            self._pending = None
        self._acc = {}
        self._count = 0
        self._acc_is_mean = False

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
        if self._pending is not None:
            raise RuntimeError("RoGA.step(): perturb() was called without accumulate(); run the backward pass at "
                               "the perturbed point and accumulate() first (or abort())")
        if self._count == 0:
            raise RuntimeError("RoGA.step() with nothing accumulated: for each domain call backward, perturb(), "
                               "backward, accumulate() first, or use step(closure, num_domains)")
        self._apply(scaler)
        return loss

    def _run_closure(self, closure, num_domains, scaler, bn_model):
        k = num_domains if num_domains is not None else self.num_domains
        if k is None or int(k) < 1:
            raise ValueError("RoGA.step(closure): give num_domains (the number of domains closure(d) accepts)")
        if self._pending is not None or self._count:
            raise RuntimeError("RoGA.step(closure): a manual perturb()/accumulate() cycle is in progress")
        saved_k, self.num_domains = self.num_domains, int(k)
        self.zero_grad(set_to_none=True)
        losses = []
        try:
            for d in range(int(k)):
                with torch.enable_grad():
                    loss = closure(d)
                if loss is None:
                    raise RuntimeError("RoGA.step(closure): closure(d) returned None; it must return the loss "
                                       "after calling loss.backward()")
                self.perturb(scaler=scaler)
                ctx = freeze_bn_stats(bn_model) if bn_model is not None else contextlib.nullcontext()
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
        sync = self._sync()
        if sync:  # every parameter gets its (all-reduced) gradient, zero where this rank had none
            self._acc = {id(p): (p, self._flat[2][id(p)]) for p in self._flat[0]}
        ps = [p for p, _ in self._acc.values()]
        accs = [a for _, a in self._acc.values()]
        for p, a in zip(ps, accs):
            p.grad = a
        coef = 1.0 if self._acc_is_mean else 1.0 / self._count
        self._acc, self._count, self._acc_is_mean = {}, 0, False
        if sync:
            world = dist.get_world_size()
            for buf in self._flat[1]:
                dist.all_reduce(buf)  # one collective per dtype/device: the whole step's gradient
            coef = coef / world
        amp = scaler is not None and scaler.is_enabled()
        if amp:
            scaler.unscale_(self.base_optimizer)  # .grad /= scale, and records inf/nan for step/update
        if self.max_grad_norm is not None:
            coef = coef * self._clip_coef([(ps, accs)], pre_scale=coef)
        if isinstance(coef, torch.Tensor) or coef != 1.0:
            self._scale_grads_([gs for (gs,) in by_device(accs)], coef)
        if amp:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True
