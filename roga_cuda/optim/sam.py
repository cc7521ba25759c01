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

AMP: ``scaler.scale(loss).backward(); opt.first_step(zero_grad=True);
scaler.scale(loss2).backward(); scaler.step(opt); scaler.update()``. The perturbation is
scale-invariant, so the first step needs no unscaling; ``scaler.step(opt)`` always reaches
``opt.step()`` (the optimizer declares ``_step_supports_amp_scaling``), which restores the
parameters, unscales, and skips the base step on inf/nan.
"""
import torch

from .base import WrapperOptimizer, by_device, choose_strategy


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
            safe and worth it).
        max_grad_norm: clip the final (second-pass) gradient to this global norm.
    """

    _step_supports_amp_scaling = True  # GradScaler.step() always calls step(): restore never skipped

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.0, backend="auto",
                 strategy="auto", max_grad_norm=None, **base_kwargs):
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"SAM: eta must be >= 0, got {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta)
        super().__init__(params, base_optimizer, defaults, backend, max_grad_norm, **base_kwargs)
        choose_strategy(strategy, [])  # validates the name
        self.strategy = strategy
        self._perturbed = None  # [(params, restore info)] between first_step and second_step

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Move to the worst-case neighbour ``p + e`` (uses the gradients in ``.grad``)."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step() called twice: the parameters are still perturbed. "
                               "Call second_step() (or scaler.step(optimizer) with AMP) after the second backward.")
        parts = [(g, ps, gs) for g, ps, gs in self._with_grads() if ps]
        if not parts:
            raise RuntimeError("SAM.first_step(): no parameter has a gradient; call loss.backward() first")
        norm = self._norm([(ps, gs) for _, ps, gs in parts],
                          adaptive=[g["eta"] if g["adaptive"] else None for g, _, _ in parts])
        strategy = self._strategy([p for _, ps, _ in parts for p in ps])
        done = []
        for group, ps, gs in parts:
            scale = group["rho"] / (norm + 1e-12)
            for dps, dgs in by_device(ps, gs):
                s = scale.to(dps[0].device)
                done.append(self._perturb_params(dps, dgs, s, strategy, group["adaptive"], group["eta"]))
        self._perturbed = done
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Restore the parameters and let the base optimizer step with the perturbed gradient."""
        if self._perturbed is None:
            raise RuntimeError("SAM.second_step() without first_step(): call first_step() after the first backward")
        self._restore_params(self._perturbed)
        self._perturbed = None
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def _base_step(self):
        # Set by torch.amp.GradScaler.step() (we declare _step_supports_amp_scaling):
        # grad_scale is the scale still applied to .grad (None once unscale_ ran), found_inf
        # whether any gradient is inf/nan.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        coef = None if grad_scale is None else grad_scale.double().reciprocal().float()
        if self.max_grad_norm is not None or coef is not None:
            parts = [(ps, gs) for _, ps, gs in self._with_grads() if ps]
            if self.max_grad_norm is not None:
                clip = self._clip_coef(parts, pre_scale=coef)
                coef = clip if coef is None else coef * clip
            self._scale_grads_([dgs for _, gs in parts for (dgs,) in by_device(gs)], coef)
        if found_inf is not None and float(found_inf) != 0.0:
            return  # overflow: skip; the parameters are already restored
        self.base_optimizer.step()
        self._opt_called = True  # LR schedulers check this

    def step(self, closure=None):
        """With a closure (forward + backward at the perturbed point, returning the loss):
        a full SAM step, after the user's first backward (davda54 semantics). Without one,
        it is ``second_step()`` (the path ``GradScaler.step(optimizer)`` takes)."""
        if closure is None:
            if self._perturbed is None:
                raise RuntimeError("SAM.step() needs a closure that re-evaluates the loss (forward + backward), "
                                   "or call first_step() / second_step() yourself")
            self.second_step()
            return None
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            self._restore_params(self._perturbed)
            self._perturbed = None
            raise RuntimeError("SAM.step(closure): the closure returned None; it must return the loss "
                               "after calling loss.backward()")
        self.second_step()
        return loss
