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
"""
import math

import torch

from . import _utils
from .base import WrapperOptimizer
from .fused import UpdatePart
from .perturb import Perturber


def check_hyper(name, **values):
    """Finite and >= 0, or a clear ValueError (NaN would otherwise slip through `< 0` tests)."""
    for k, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: {k} must be a finite number >= 0, got {v!r}")


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
    """

    _step_supports_amp_scaling = True  # GradScaler.step() always calls step(): restore never skipped

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.0, backend="auto",
                 strategy="auto", max_grad_norm=None, fused=True, **base_kwargs):
        check_hyper("SAM", rho=rho, eta=eta)
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta)
        super().__init__(params, base_optimizer, defaults, backend, max_grad_norm, fused, **base_kwargs)
        self._perturber = Perturber(backend, strategy)
        self._t.moves = None  # [Move] between first_step and second_step

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Move to the worst-case neighbour ``p + e`` (uses the gradients in ``.grad``)."""
        if self._t.moves is not None:
            raise RuntimeError("SAM.first_step() called twice: the parameters are still perturbed. "
                               "Call second_step() (or scaler.step(optimizer) with AMP) after the second backward, "
                               "or abort() to restore them.")
        parts = self._gather()
        if not parts:
            raise RuntimeError("SAM.first_step(): no parameter has a gradient; call loss.backward() first")
        norm = _utils.global_norm([(p.params, p.grads) for p in parts], self.backend,
                                  adaptive=[p.group["eta"] if p.group["adaptive"] else None for p in parts])
        strategy = self._perturber.strategy_for([p.params for p in parts])
        moves = []
        for part in parts:
            g = part.group
            scale = (g["rho"] / (norm + 1e-12)).to(part.params[0].device)
            moves.append(self._perturber.perturb(part.params, part.grads, scale, strategy, g["adaptive"], g["eta"],
                                                 group=g))
        self._t.moves = moves
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Restore the parameters and let the base optimizer step with the perturbed gradient."""
        if self._t.moves is None:
            raise RuntimeError("SAM.second_step() without first_step(): call first_step() after the first backward")
        moves, self._t.moves = self._t.moves, None
        # Set by torch.amp.GradScaler.step() (we declare _step_supports_amp_scaling):
        # grad_scale is the scale still applied to .grad (None once unscale_ ran), found_inf
        # whether any gradient is inf/nan. Both stay on the device.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        try:
            parts = self._gather()
        except BaseException:
            self._perturber.restore(moves)
            raise
        coef = self._grad_coef(parts, grad_scale)
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
        for part in parts:
            m = folded.pop(id(part.params), None)
            if m is not None and m.params is not part.params:
                self._perturber.restore([m])
                m = None
            w = None if coef is None else coef.to(part.params[0].device).reshape(1)
            updates.append(UpdatePart(part.group, part.params, [part.grads], w, m.saved if m else None))
        self._perturber.restore(folded.values())  # perturbed, but no gradient in the second pass
        self._base_step(updates, found_inf)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abort(self):
        """Undo a pending perturbation (after a failed second forward/backward, say)."""
        if self._t.moves is not None:
            moves, self._t.moves = self._t.moves, None
            self._perturber.restore(moves)

    def step(self, closure=None):
        """With a closure (forward + backward at the perturbed point, returning the loss):
        a full SAM step, after the user's first backward (davda54 semantics). Without one,
        it is ``second_step()`` (the path ``GradScaler.step(optimizer)`` takes). A closure
        that raises leaves the parameters restored."""
        if closure is None:
            if self._t.moves is None:
                raise RuntimeError("SAM.step() needs a closure that re-evaluates the loss (forward + backward), "
                                   "or call first_step() / second_step() yourself")
            self.second_step()
            return None
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
            if loss is None:
                raise RuntimeError("SAM.step(closure): the closure returned None; it must return the loss "
                                   "after calling loss.backward()")
        except BaseException:
            self.abort()
            raise
        self.second_step()
        return loss

    @property
    def strategy(self):
        return self._perturber.strategy
