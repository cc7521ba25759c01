"""SAM and ASAM on fused multi-tensor ops.

The math is davda54/sam's: ``e = rho * g / ||g||`` (ASAM: ``e = rho * p^2 g / ||p g||``,
or with ``eta``: ``(|p| + eta)``), the base optimizer steps with the gradient at
``p + e``, and the parameters are restored bit-exactly. Its README example works with
only the import changed::

    from roga_cuda import SAM
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ...
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)

A step is four fused passes: norm and perturb in ``first_step``; in ``second_step`` the
restore and the base update are one pass (the update reads the parameters from the backup),
plus a norm pass when clipping. No host synchronisation (the scale stays on the device).

AMP: ``scaler.scale(loss).backward(); opt.first_step(zero_grad=True);
scaler.scale(loss2).backward(); scaler.step(opt); scaler.update()``. The perturbation is
scale-invariant, so the first step needs no unscaling; ``scaler.step(opt)`` always reaches
``opt.step()`` (the optimizer declares ``_step_supports_amp_scaling``), which restores the
parameters, unscales inside the update, and skips the update on inf/nan, all on the device.

``interval=k``: SAM every k-th step (the first included), the base optimizer's plain step
in between (one backward). ``first_step()`` says which: it returns True when it perturbed
(run the second forward/backward, then ``second_step()``), False on a plain step (it leaves
``.grad`` alone, whatever ``zero_grad`` says; call ``second_step()`` or
``scaler.step(opt)`` right away)::

    loss_fn(model(x), y).backward()
    if optimizer.first_step(zero_grad=True):
        with freeze_bn_stats(model):
            loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)

The variants in :mod:`.sam_family` (GSAM, WSAM, Friendly-SAM, LookSAM) override the hooks
``_radius``, ``_ascend``, ``_mix``, ``_reuse_mix`` and ``_after_update``.
"""
import math
from typing import NamedTuple

import torch

from .. import ops
from . import _utils
from .base import Part, WrapperOptimizer
from .fused import UpdatePart
from .perturb import Perturber


def check_interval(name, interval, what="interval"):
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{name}: {what} must be an integer >= 1, got {interval!r}")
    return interval


def check_hyper(name, **values):
    """Finite and >= 0, or a clear ValueError (NaN would otherwise slip through `< 0` tests)."""
    for k, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: {k} must be a finite number >= 0, got {v!r}")


class Mix(NamedTuple):
    """What one part's update takes (see :class:`UpdatePart`): the base optimizer steps with
    ``sum_k weights[k] * grads[k]``; ``direct`` (K weights, or None) adds the plain step
    ``-lr * sum_k direct[k] * grads[k]`` outside it, in the same pass when fused."""
    grads: list
    weights: object = None
    direct: object = None

    def update(self, part, source=None):
        """The fused call of ``part`` (a Part) with this mix, reading its values from ``source``."""
        return UpdatePart(part.group, part.params, self.grads, self.weights, source, direct=self.direct)


class SAM(WrapperOptimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) and ASAM (Kwon et al. 2021).

    Args:
        params: iterable of parameters or param-group dicts (may be None with an
            optimizer instance as ``base_optimizer``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``)
            or an instance.
        rho: neighbourhood radius (per group).
        adaptive: ASAM (per group). ``eta``: ASAM's offset in ``|p| + eta`` (0 = davda54).
        backend: kernel backend for the fused ops ("auto", "cpu", "cuda", "triton", "foreach", "reference").
        strategy: "copy" (back up and restore parameters), "swap" (write the perturbed point
            into a second buffer and swap storage: fewer bytes, but data pointers change, so
            not for CUDA-graph capture or parameters that are views), or "auto" (swap where
            safe and worth it). ``optimizer.strategy`` reads it.
        max_grad_norm: clip the final (second-pass) gradient to this global norm.
        fused: run the base update (SGD, Adam, AdamW) as a fused primitive folded into the
            restore; False: torch's ``step()`` after the restore.
        interval: perturb every ``interval``-th step only, a plain base step in between
            (see the module docstring); the step count is in ``state_dict()``.
    """

    _step_supports_amp_scaling = True  # GradScaler.step() always calls step(): restore never skipped
    _keeps_first_grads = False  # variants whose update reads the first pass's gradient set True

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.0, backend="auto",
                 strategy="auto", max_grad_norm=None, fused=True, interval=1, **base_kwargs):
        name = type(self).__name__
        check_hyper(name, rho=rho, eta=eta)
        self.interval = check_interval(name, interval)
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta)
        super().__init__(params, base_optimizer, defaults, backend, max_grad_norm, fused, **base_kwargs)
        self._perturber = Perturber(backend, strategy)
        self._t.moves = None  # [Move] between first_step and second_step
        self._t.plain = False  # first_step chose a plain (unperturbed) step: second_step takes it
        self._t.steps = 0  # completed steps: which ones perturb (interval); in state_dict()

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Move to the worst-case neighbour ``p + e`` (uses the gradients in ``.grad``).

        Returns True when it perturbed; False on a plain step of ``interval`` (``.grad`` is
        kept for ``second_step()``: no second backward)."""
        name = type(self).__name__
        if self._t.moves is not None or self._t.plain:
            raise RuntimeError(f"{name}.first_step() called twice: call second_step() (or scaler.step(optimizer) "
                               "with AMP) to finish the step, or abort().")
        parts = self._gather()
        if not parts:
            raise RuntimeError(f"{name}.first_step(): no parameter has a gradient; call loss.backward() first")
        if self._t.steps % self.interval != 0:
            self._t.plain = True
            return False
        if self._keeps_first_grads:  # the update reads them: they must outlive the next backward
            parts = [_owned(part, self._perturber) for part in parts]
        self._t.moves = self._ascend(parts)
        if zero_grad or self._keeps_first_grads:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Restore the parameters and let the base optimizer step with the perturbed gradient
        (on a plain step of ``interval``: with the gradient in ``.grad``)."""
        # Set by torch.amp.GradScaler.step() (we declare _step_supports_amp_scaling):
        # grad_scale is the scale still applied to .grad (None once unscale_ ran), found_inf
        # whether any gradient is inf/nan. Both stay on the device.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._t.plain:
            self._t.plain = False
            parts = self._gather()
            mixes = self._reuse_mix(parts, grad_scale)
            self._base_step([m.update(p) for p, m in zip(parts, mixes)], found_inf)
            self._t.steps += 1
            if zero_grad:
                self.zero_grad()
            return
        if self._t.moves is None:
            raise RuntimeError(f"{type(self).__name__}.second_step() without first_step(): call first_step() after "
                               "the first backward")
        moves, self._t.moves = self._t.moves, None
        try:
            if self._keeps_first_grads and grad_scale is None and found_inf is not None:
                raise RuntimeError(f"{type(self).__name__}: scaler.unscale_(optimizer) ran before scaler.step(optimizer), "
                                   "but the first pass's gradient it also uses is still scaled; leave the unscaling "
                                   "to scaler.step(optimizer) (clip with max_grad_norm=)")
            parts = self._gather()
            firsts = _first_grads(moves, parts) if self._keeps_first_grads else None
            mixes = self._mix(parts, firsts, grad_scale)
        except BaseException:
            self._perturber.restore(moves)
            raise
        # Swapped parameters point back at their storage for free; copied ones are restored by
        # the update itself, which reads them from the backup (one pass), when the update is
        # fused and the second pass saw exactly the first pass's parameters.
        folded = {}
        for m in moves:
            if m.kind == "copy" and self.fused:
                folded[id(m.params)] = m
            else:
                self._perturber.restore([m])
        updates = []
        for part, mix in zip(parts, mixes):
            m = folded.pop(id(part.params), None)
            if m is not None and m.params is not part.params:
                self._perturber.restore([m])
                m = None
            updates.append(mix.update(part, m.saved if m else None))
        self._perturber.restore(folded.values())  # perturbed, but no gradient in the second pass
        self._base_step(updates, found_inf)
        self._after_update(parts, firsts, found_inf, grad_scale)
        self._t.steps += 1
        if zero_grad:
            self.zero_grad()

    # -- hooks of the variants (sam_family) ----------------------------------------------
    def _radius(self, group):
        """The perturbation radius of a group this step."""
        return group["rho"]

    def _ascend(self, parts):
        """Move every part to its perturbed point ``p + e``; returns the moves (Friendly-SAM
        ascends along another direction)."""
        return self._move(parts, self._ascent_norm(parts))

    def _ascent_norm(self, parts):
        """The global norm of the ascent direction in ``.grad`` (ASAM's where adaptive)."""
        return _utils.global_norm([(p.params, p.grads) for p in parts], self.backend,
                                  adaptive=[p.group["eta"] if p.group["adaptive"] else None for p in parts])

    def _move(self, parts, norm):
        """Each part to ``p + radius * g / (norm + 1e-12)`` (ASAM's where adaptive)."""
        strategy = self._perturber.strategy_for([p.params for p in parts])
        moves = []
        for part in parts:
            g = part.group
            moves.append(self._perturber.perturb(part.params, part.grads, self._scale(part, norm), strategy,
                                                 g["adaptive"], g["eta"], group=g))
        return moves

    def _scale(self, part, norm):
        """A part's step along the ascent direction: its radius over the global norm, on its device."""
        return (self._radius(part.group) / (norm + 1e-12)).to(part.params[0].device)

    def _mix(self, parts, firsts, grad_scale):
        """Per part, a :class:`Mix`: the gradient lists the update combines and their weights
        (and a direct row, WSAM): SAM's is the perturbed gradient, times AMP's unscaling and
        clipping. ``firsts``: the first pass's gradients, aligned with ``parts`` (variants
        with ``_keeps_first_grads``)."""
        coef = self._grad_coef(parts, grad_scale)
        return [Mix([p.grads], None if coef is None else coef.to(p.params[0].device).reshape(1)) for p in parts]

    def _reuse_mix(self, parts, grad_scale):
        """:meth:`_mix` of a plain (unperturbed) step: the gradient itself."""
        return SAM._mix(self, parts, None, grad_scale)

    def _after_update(self, parts, firsts, found_inf, grad_scale):
        """After the base update of a perturbed step (LookSAM's g_v)."""

    @torch.no_grad()
    def abort(self):
        """Undo a pending perturbation (after a failed second forward/backward, say)."""
        self._t.plain = False
        if self._t.moves is not None:
            moves, self._t.moves = self._t.moves, None
            self._perturber.restore(moves)

    def step(self, closure=None):
        """With a closure (forward + backward at the perturbed point, returning the loss):
        a full SAM step, after the user's first backward (davda54 semantics). Without one,
        it is ``second_step()`` (the path ``GradScaler.step(optimizer)`` takes). A closure
        that raises leaves the parameters restored. On a plain step of ``interval`` the
        closure is not called and None is returned."""
        name = type(self).__name__
        if closure is None:
            if self._t.moves is None and not self._t.plain:
                raise RuntimeError(f"{name}.step() needs a closure that re-evaluates the loss (forward + backward), "
                                   "or call first_step() / second_step() yourself")
            self.second_step()
            return None
        if not self.first_step(zero_grad=True):
            self.second_step()
            return None
        try:
            with torch.enable_grad():
                loss = closure()
            if loss is None:
                raise RuntimeError(f"{name}.step(closure): the closure returned None; it must return the loss "
                                   "after calling loss.backward()")
        except BaseException:
            self.abort()
            raise
        self.second_step()
        return loss

    @property
    def strategy(self):
        return self._perturber.strategy

    # -- state ---------------------------------------------------------------------------
    def _extra_state(self):
        return {"steps": self._t.steps}

    def _check_extra_state(self, state):
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{type(self).__name__}.load_state_dict: 'steps' must be an integer >= 0, got {steps!r}")

    def _load_extra_state(self, state):
        self._t.steps = state.get("steps", 0)

    def _mid_step(self):
        if self._t.moves is not None or self._t.plain:
            return "between first_step() and second_step()"
        return None


def _owned(part, perturber):
    """The part with gradients the next backward cannot overwrite: DDP's
    ``gradient_as_bucket_view`` hands out views of its buckets and writes the next pass's
    reduced gradients into them even after ``.grad`` is cleared, so views are copied (one
    pass) into persistent buffers; gradients autograd allocated are kept as they are."""
    if part.grads[0]._base is None:
        return part
    own = perturber.buffers("first_grads", part.params)
    ops.combine_(own, [part.grads], [1.0], backend=perturber.backend)
    return Part(part.group, part.params, own)


def _first_grads(moves, parts):
    """The first pass's gradients (kept by the moves), aligned with the second pass's parts;
    zeros where a parameter had no gradient in the first pass."""
    out, by_param = [], None
    by_list = {id(m.params): m for m in moves}
    for part in parts:
        m = by_list.get(id(part.params))
        if m is not None and m.params is part.params:
            out.append(m.grads)
            continue
        if by_param is None:  # the passes saw different parameters: rare, align one by one
            by_param = {id(p): g for m in moves for p, g in zip(m.params, m.grads)}
        out.append([by_param[id(p)] if id(p) in by_param else torch.zeros_like(p) for p in part.params])
    return out
