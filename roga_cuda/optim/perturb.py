"""Moving parameters to a perturbed point and back (SAM, RoGA), by copy or by swap.

* copy: ``backup <- p; p += s g`` in one pass (``perturb_``); restoring copies the backup
  back, or the base update reads the backup directly (SAM's second step: one pass).
* swap: write the perturbed point into a spare buffer (``combine_``) and point each
  parameter's storage at it; restoring points it back, free and trivially bit-exact. Fewer
  bytes, but data pointers change: not for CUDA graphs, views or tensor subclasses.

Buffers are allocated once per parameter and kept (scratch lists cached per parameter list).
"""
from dataclasses import dataclass

import torch

from .. import ops
from . import _utils


@dataclass
class Move:
    """One perturbed parameter list (one group, one device) and how to undo it."""
    kind: str  # "copy" or "swap"
    params: list
    saved: list  # copy: the backup buffers (the original values); swap: the original storage
    grads: list  # the gradients it moved along (RoGA's exact alignment needs them)
    group: dict = None


class Perturber:
    """Per-parameter scratch buffers and the copy/swap machinery."""

    def __init__(self, backend, strategy):
        _utils.choose_strategy(strategy, [])  # validates the name
        self.backend = backend
        self.strategy = strategy
        self._store = {}  # kind -> {id(p): (p, buffer)}; an entry keeps p, so its id is not reused
        self._lists = {}  # (kind, id(list)) -> (list, buffers): the latest truth (unswap replaces them)
        self._stale = set()  # kinds whose store lags behind a replaced list
        self._strategies = {}  # ids of the parts' lists -> (the lists, strategy)

    def __getstate__(self):  # a copy keeps the settings; the scratch buffers are rebuilt for its parameters
        return {"backend": self.backend, "strategy": self.strategy}

    def __setstate__(self, state):
        self.__init__(state["backend"], state["strategy"])

    def strategy_for(self, param_lists):
        """"copy" or "swap" for these parameter lists: choose_strategy, cached per layout (its
        checks walk every parameter); always "copy" while a CUDA graph is captured."""
        if torch.compiler.is_compiling():  # storage swaps are not traceable: copy inside a graph
            return "copy"
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if capturing and self.strategy != "swap":
            return "copy"
        key = tuple(map(id, param_lists))
        hit = self._strategies.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], param_lists)):
            if len(self._strategies) > 16:
                self._strategies.clear()
            hit = self._strategies[key] = (list(param_lists),
                                           _utils.choose_strategy(self.strategy, [p for ps in param_lists for p in ps]))
        return hit[1]

    def buffers(self, kind, params):
        """Persistent scratch tensors like each of ``params`` (callers must not modify the list)."""
        key = (kind, id(params))
        hit = self._lists.get(key)
        if hit is not None and hit[0] is params:
            return hit[1]
        store = self._store.setdefault(kind, {})
        if kind in self._stale:  # bring the per-parameter store up to date (a new list, rare)
            for (k, _), (ps, bufs) in self._lists.items():
                if k == kind:
                    store.update((id(p), (p, b)) for p, b in zip(ps, bufs))
            self._stale.discard(kind)
        out = []
        for p in params:
            e = store.get(id(p))
            if e is None or e[0] is not p or e[1].shape != p.shape or e[1].dtype != p.dtype or e[1].device != p.device:
                e = store[id(p)] = (p, torch.empty_like(p, memory_format=torch.preserve_format))
            out.append(e[1])
        if len(self._lists) > 64:  # parameter lists that come and go: keep the cache bounded
            self._lists.clear()  # (the store is current: refreshed above)
        self._lists[key] = (params, out)
        return out

    def _replace(self, kind, params, tensors):
        self._lists[(kind, id(params))] = (params, tensors)
        self._stale.add(kind)

    def perturb(self, params, grads, scale, strategy, adaptive=False, eta=0.0, group=None):
        """Moves ``params`` (one device) to ``p + scale * g`` (ASAM: ``p + scale (|p| + eta)^2 g``)."""
        if strategy == "copy":
            backup = self.buffers("backup", params)
            ops.perturb_(params, grads, backup, scale, adaptive=adaptive, eta=eta, backend=self.backend)
            return Move("copy", params, backup, grads, group)
        spare = self.buffers("spare", params)
        if adaptive:  # in place, the originals into the spare buffer: restoring points p at it
            ops.perturb_(params, grads, spare, scale, adaptive=True, eta=eta, backend=self.backend)
            return Move("swap", params, spare, grads, group)
        ops.combine_(spare, [params, grads], [1.0, scale], backend=self.backend)  # spare = p + s g
        orig = _utils.swap_data(params, spare)
        return Move("swap", params, orig, grads, group)

    def perturb_mix(self, params, lists, along, out, out_weights, scale, strategy, skip, group=None):
        """Moves ``params`` to ``p + scale * sum_k along[k] lists[k]`` and writes
        ``out <- sum_k out_weights[k] lists[k]`` (``out`` may be one of ``lists``) in the same
        pass; neither happens when the one-element device flag ``skip`` is nonzero.
        (Friendly-SAM: the ascent along ``g - sigma m`` and the average's update read ``g``
        and ``m`` once.) Weights: floats or 0-d tensors on the lists' device. The pass is the
        fused SGD update with ``out_weights`` as its gradient (``grad_out`` writes it), and
        ``maximize`` and a direct row making up the rest."""
        direct = [b - a for a, b in zip(along, out_weights)]
        if all([isinstance(d, (int, float)) and d == 0 for d in direct]):  # a list: Dynamo traces it
            direct = None
        kw = dict(lr=scale, maximize=True, grad_weights=out_weights, direct_weights=direct, grad_out=out,
                  found_inf=skip, backend=self.backend)
        if strategy == "copy":
            backup = self.buffers("backup", params)
            ops.restore_(backup, params, backend=self.backend)  # backup <- p
            ops.sgd_(params, lists, **kw)
            return Move("copy", params, backup, lists[0], group)
        spare = self.buffers("spare", params)
        ops.sgd_(spare, lists, source=params, **kw)  # spare = the perturbed point
        orig = _utils.swap_data(params, spare)
        return Move("swap", params, orig, lists[0], group)

    def restore(self, moves):
        """Undoes every move."""
        for m in moves:
            if m.kind == "copy":
                ops.restore_(m.params, m.saved, backend=self.backend)
            else:
                self.unswap(m)

    def unswap(self, m):
        """Points a swapped list back at its original storage; the perturbed storage becomes
        the next spare."""
        perturbed = _utils.swap_data(m.params, m.saved)
        self._replace("spare", m.params, perturbed)
