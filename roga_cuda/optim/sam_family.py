r"""The SAM variants users ask for, on SAM's machinery: GSAM, WSAM, Friendly-SAM, LookSAM.

Each is a :class:`~roga_cuda.optim.SAM` subclass that overrides a hook or two, so it keeps
everything SAM guarantees: shared ``param_groups`` and per-group hyper-parameters,
``state_dict``, AMP through ``GradScaler`` without host synchronisation, DDP, clipping
(``max_grad_norm`` clips the *final* gradient the base optimizer sees), the copy/swap
strategies with a bit-exact restore, ``step(closure)``, ``abort()``. Usage is SAM's::

    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with freeze_bn_stats(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)            # or scaler.step(opt) with AMP

Notation: ``g`` the gradient at ``w`` (first backward), ``g_p`` the gradient at the
perturbed point ``w + e`` (second backward), ``<.,.>`` and ``||.||`` over the whole model.
Inner products come from one fused ``gram`` pass per parameter group; the update's
gradient is a weighted combination of ``g`` and ``g_p`` that the fused base update forms
itself (restore, combination, AMP unscaling, clipping and the SGD/Adam update in one pass).

GSAM, WSAM and LookSAM read ``g`` in the second step: they keep the first pass's gradient
tensors and clear ``.grad`` in ``first_step`` whatever ``zero_grad`` says. Under DDP both
backward passes must be synchronised (the default): then every rank computes the same
update, equal to the single-process step on the global batch. (The GSAM authors' code runs
both passes under ``no_sync`` and all-reduces the final gradient instead.)
"""
import torch

from .. import ops
from . import _utils
from .sam import SAM, Mix, check_hyper, check_interval

EPS = 1e-12  # the epsilon of SAM's own ascent, rho / (||g|| + EPS)


class _Variant(SAM):
    """SAM plus the variant's per-group hyper-parameters, validated in every group."""

    def _init_groups(self, **defaults):
        self.defaults.update(defaults)
        for group in self.param_groups:
            for k, v in defaults.items():
                group.setdefault(k, v)
            self._check_group(group)
        self._groups_ready = True

    def add_param_group(self, param_group):
        ready = getattr(self, "_groups_ready", False)
        if ready:  # checked before the base optimizer takes it
            self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        if ready:
            self._check_group(self.param_groups[-1])  # fills in what depends on the group (GSAM's lr_max)

    def _check_group(self, group):
        """Raise a ValueError naming a bad per-group hyper-parameter."""


# ------------------------------------------------------------------------------------ GSAM

class GSAM(_Variant):
    r"""GSAM: surrogate gap guided SAM (Zhuang et al., ICLR 2022).

    SAM minimises the perturbed loss :math:`f_p(w) = \max_{\|e\| \le \rho} f(w + e)`. GSAM
    also minimises the surrogate gap :math:`h(w) = f_p(w) - f(w)` (a measure of sharpness),
    without disturbing :math:`f_p`: it decomposes :math:`g = \nabla f(w)` into the parts
    parallel and orthogonal to :math:`g_p = \nabla f_p(w) = \nabla f(w + e)`,

    .. math::
        g_\parallel = \frac{\langle g, g_p\rangle}{\|g_p\|^2}\, g_p, \qquad
        g_\perp = g - g_\parallel,

    and descends along :math:`-g_\perp` (which decreases the gap) with weight
    :math:`\alpha`: the update direction is

    .. math:: d = g_p - \alpha\, g_\perp = (1 + \alpha c)\, g_p - \alpha\, g, \qquad
              c = \langle g, g_p\rangle / \|g_p\|^2 .

    The radius follows the learning rate (the paper's schedule):

    .. math:: \rho_t = \rho_{\min} + (\rho - \rho_{\min})
              \frac{lr_t - lr_{\min}}{lr_{\max} - lr_{\min}} .

    ``c`` is computed with the authors' epsilons,
    :math:`c = \cos(g, g_p)\,\|g\| / (\|g_p\| + \epsilon)` with
    :math:`\cos = \langle g, g_p\rangle / (\|g\|\|g_p\| + \epsilon)`, :math:`\epsilon = 10^{-12}`.
    One ``gram`` pass gives :math:`\|g\|^2, \langle g, g_p\rangle, \|g_p\|^2`; the fused
    update forms ``d`` itself. Clipping clips ``d`` (its norm also comes from the Gram matrix).

    Args:
        rho: the radius at ``lr_max`` (rho_max in the paper; per group).
        alpha: weight of the gap-decreasing direction (per group; the paper uses 0.01-0.3,
            the authors' code defaults to 0.4).
        rho_min: the radius at ``lr_min`` (per group; None: ``rho``, a constant radius).
        lr_max, lr_min: the learning rates mapped to ``rho`` and ``rho_min`` (per group;
            ``lr_max=None``: the group's learning rate when the optimizer is built).
        The rest as for :class:`SAM` (``adaptive``/``eta``: an ASAM ascent).

    ``opt.rho_t`` lists each group's radius for the current learning rate. The radius is
    read from the group's ``lr`` at every ``first_step``: step your LR scheduler as usual.
    """

    _keeps_first_grads = True

    def __init__(self, params, base_optimizer, rho=0.05, alpha=0.4, rho_min=None, lr_max=None, lr_min=0.0,
                 adaptive=False, eta=0.0, backend="auto", strategy="auto", max_grad_norm=None, fused=True,
                 interval=1, **base_kwargs):
        super().__init__(params, base_optimizer, rho, adaptive, eta, backend, strategy, max_grad_norm, fused,
                         interval, **base_kwargs)
        self._init_groups(alpha=alpha, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)

    def _check_group(self, group):
        check_hyper("GSAM", alpha=group["alpha"], lr_min=group["lr_min"])
        if group["rho_min"] is not None:
            check_hyper("GSAM", rho_min=group["rho_min"])
        if group["lr_max"] is None:  # the learning rate it starts with
            group["lr_max"] = float(group["lr"])
        check_hyper("GSAM", lr_max=group["lr_max"])
        if group["lr_max"] < group["lr_min"]:
            raise ValueError(f"GSAM: lr_max ({group['lr_max']}) must be >= lr_min ({group['lr_min']})")

    def _radius(self, group):
        rho, rho_min = group["rho"], group["rho_min"]
        lo, hi = group["lr_min"], group["lr_max"]
        if rho_min is None or hi <= lo:
            return rho
        return rho_min + (rho - rho_min) * (group["lr"] - lo) / (hi - lo)

    @property
    def rho_t(self):
        """The radius of each group at its current learning rate."""
        return [self._radius(g) for g in self.param_groups]

    def _mix(self, parts, firsts, grad_scale):
        if not parts:
            return []
        grams = _grams(firsts, parts, self.backend)
        tot = _total(grams)
        ng, npert = tot[0, 0].sqrt(), tot[1, 1].sqrt()
        cos = tot[0, 1] / (ng * npert + EPS)
        c = cos * ng / (npert + EPS)  # <g, g_p> / ||g_p||^2
        ab = [(1.0 + p.group["alpha"] * c, -p.group["alpha"]) for p in parts]  # d = a g_p + b g
        norm = None
        if self.max_grad_norm is not None:
            norm = _combo_norm(grams, [(b, a) for a, b in ab])
        coef = _coef(norm, grad_scale, self.max_grad_norm)
        return [Mix([p.grads, f], _weights(w, coef, p, gm)) for p, f, w, gm in zip(parts, firsts, ab, grams)]


# ------------------------------------------------------------------------------------ WSAM

class WSAM(_Variant):
    r"""WSAM: sharpness as a weighted regulariser (Yue et al., KDD 2023).

    With the sharpness :math:`s(w) = \max_{\|e\|\le\rho} f(w + e) - f(w)` WSAM minimises

    .. math:: L(w) = f(w) + \frac{\gamma}{1 - \gamma}\, s(w), \qquad \gamma \in [0, 1),

    (:math:`\gamma = 1/2` is SAM, :math:`\gamma = 0` the base optimizer), whose gradient is

    .. math:: \nabla L = g + a\,(g_p - g) = (1 - a)\, g + a\, g_p, \qquad a = \frac{\gamma}{1-\gamma}.

    ``decouple=True`` (the paper's Algorithm, the default) gives the base optimizer only
    :math:`g` and applies the sharpness term afterwards as a plain SGD step,
    :math:`w \leftarrow w - lr\, a\,(g_p - g)`, so that momentum and Adam's moments see the
    loss gradient alone (like decoupled weight decay). ``decouple=False`` steps the base
    optimizer on :math:`\nabla L`. Both are one fused pass: the decoupled term rides in the
    update's pass as its direct row (skipped on AMP overflow like the update).

    ``max_grad_norm`` clips :math:`\nabla L`: its coefficient scales both the base gradient
    and the decoupled term (so SGD takes the same step either way). pytorch-optimizer
    instead clips :math:`g_p` before mixing.

    Args:
        gamma: the sharpness weight :math:`\gamma` (per group, ``0 <= gamma < 1``).
        decouple: apply the sharpness term outside the base optimizer (per group).
        The rest as for :class:`SAM`.
    """

    _keeps_first_grads = True

    def __init__(self, params, base_optimizer, rho=0.05, gamma=0.9, decouple=True, adaptive=False, eta=0.0,
                 backend="auto", strategy="auto", max_grad_norm=None, fused=True, interval=1, **base_kwargs):
        super().__init__(params, base_optimizer, rho, adaptive, eta, backend, strategy, max_grad_norm, fused,
                         interval, **base_kwargs)
        self._init_groups(gamma=gamma, decouple=decouple)

    def _check_group(self, group):
        gamma = group["gamma"]
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 <= gamma < 1):
            raise ValueError(f"WSAM: gamma must be a number in [0, 1), got {gamma!r}")
        if not isinstance(group["decouple"], bool):
            raise TypeError(f"WSAM: decouple must be True or False, got {group['decouple']!r}")

    def _mix(self, parts, firsts, grad_scale):
        if not parts:
            return []
        a = [_ratio(p.group["gamma"]) for p in parts]
        grams, norm = [None] * len(parts), None
        if self.max_grad_norm is not None:
            grams = _grams(firsts, parts, self.backend)
            norm = _combo_norm(grams, [(1.0 - x, x) for x in a])
        coef = _coef(norm, grad_scale, self.max_grad_norm)
        out = []
        for p, f, x, gm in zip(parts, firsts, a, grams):
            if not p.group["decouple"]:
                out.append(Mix([f, p.grads], _weights((1.0 - x, x), coef, p, gm)))
            elif x == 0:
                out.append(Mix([f], _weights((1.0,), coef, p, gm)))
            else:  # w -= lr a (g_p - g) outside the base optimizer, in its pass
                out.append(Mix([f, p.grads], _weights((1.0, 0.0), coef, p, gm), _weights((-x, x), coef, p, gm)))
        return out


# ----------------------------------------------------------------------------- Friendly-SAM

class FriendlySAM(_Variant):
    r"""Friendly-SAM (F-SAM; Li et al., CVPR 2024): ascend along the stochastic gradient noise.

    The minibatch gradient is a full-batch component plus noise, and the full-batch
    component of SAM's ascent hurts generalisation. F-SAM estimates it with an exponential
    moving average of past gradients and removes it from the ascent direction:

    .. math::
        d_t = g_t - \sigma\, m_{t-1}, \qquad
        m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad
        e_t = \rho\, d_t / \|d_t\|,

    then the base optimizer steps with :math:`\nabla f(w + e_t)`, as in SAM. The first
    step starts the average at the gradient (:math:`m_1 = g_1`, :math:`d_1 = g_1`). This
    follows the authors' code (and pytorch-optimizer): the EMA subtracted is the one before
    this step's update.

    Fused: one ``gram`` pass gives :math:`\|g\|^2, \langle g, m\rangle, \|m\|^2`, hence
    :math:`\|d\|` without forming :math:`d`; one more pass reads :math:`w, g, m` once and writes
    both the perturbed point :math:`w + e_t` and :math:`m_t` (the fused SGD update with
    :math:`m_t` as its gradient, written back over :math:`m`, and a direct row for the rest of
    :math:`e_t`). With the swap strategy that is 28 bytes per float32 parameter against the
    40 of writing :math:`d` first (combine, norm, perturb, average).

    When :math:`d` is not finite (an AMP overflow) neither happens and the average never sees
    the overflow: the second gradient is taken at :math:`w`, where at the same scale it
    normally overflows too (the scaler skips the step and backs off); if it does not
    (dropout), the step is a plain base step.

    :math:`\|d\|^2` from the Gram matrix is a difference of sums: the radius's relative error
    is within 16 roundings times :math:`(\|g\| + \|m\|)^2 / \|d\|^2` (float32:
    :math:`10^{-5}` when :math:`d` is a tenth of :math:`g`, :math:`10^{-3}` at a hundredth);
    where the average cancels the gradient beyond what the Gram resolves, the square is
    floored and the radius shrinks below :math:`\rho` instead of blowing up. ASAM
    (``adaptive``) writes :math:`d` over ``.grad`` first, then perturbs and updates the
    average in SAM's passes.

    AMP: pass the scaler, ``opt.first_step(zero_grad=True, scaler=scaler)``: the average is
    kept of unscaled gradients. Parameters that first get a gradient after the first step
    start their average at zero. With ``interval > 1`` the average is updated on the
    perturbed steps only.

    Args:
        sigma: how much of the average to remove (per group; 1 in the paper).
        lmbda: the average's decay (per group, in [0, 1]).
        The rest as for :class:`SAM`.
    """

    def __init__(self, params, base_optimizer, rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False, eta=0.0,
                 backend="auto", strategy="auto", max_grad_norm=None, fused=True, interval=1, **base_kwargs):
        super().__init__(params, base_optimizer, rho, adaptive, eta, backend, strategy, max_grad_norm, fused,
                         interval, **base_kwargs)
        self._init_groups(sigma=sigma, lmbda=lmbda)
        self._ema = StateBuffers()
        self._t.inv_scale = None

    def _check_group(self, group):
        check_hyper("FriendlySAM", sigma=group["sigma"], lmbda=group["lmbda"])
        if group["lmbda"] > 1:
            raise ValueError(f"FriendlySAM: lmbda must be in [0, 1], got {group['lmbda']!r}")

    @torch.no_grad()
    def first_step(self, zero_grad=False, scaler=None):
        """SAM's first step along the friendly direction. ``scaler``: the GradScaler whose
        scale is in ``.grad`` (the average must be of unscaled gradients)."""
        self._t.inv_scale = _utils.inv_scale_of(scaler)
        try:
            return super().first_step(zero_grad)
        finally:
            self._t.inv_scale = None

    def _ascend(self, parts):
        inv = self._t.inv_scale
        ema = [self._ema.get(p.params) for p in parts]
        # Per part d = a g - sigma m and m' = (1 - lmbda) a g + lmbda m, a = 1/scale; a fresh
        # average starts at the gradient (sigma = lmbda = 0).
        hyper = [(0.0, 0.0) if fresh else (p.group["sigma"], p.group["lmbda"]) for p, (_, fresh) in zip(parts, ema)]
        a = [1.0 if inv is None else inv.to(p.params[0].device) for p in parts]
        if any(p.group["adaptive"] for p in parts):
            return self._ascend_adaptive(parts, ema, hyper, a)
        grams = [ops.gram([p.grads, m], backend=self.backend) for p, (m, _) in zip(parts, ema)]
        norm = _combo_norm(grams, [(ai, -sigma) for ai, (sigma, _) in zip(a, hyper)])
        strategy = self._perturber.strategy_for([p.params for p in parts])
        moves = []
        skip = (~torch.isfinite(norm)).to(torch.float32).reshape(1)
        for p, (m, _), ai, (sigma, lam) in zip(parts, ema, a, hyper):
            moves.append(self._perturber.perturb_mix(p.params, [p.grads, m], [ai, -sigma], m, [(1.0 - lam) * ai, lam],
                                                     self._scale(p, norm), strategy, skip.to(p.params[0].device),
                                                     group=p.group))
        return moves

    def _ascend_adaptive(self, parts, ema, hyper, a):
        """ASAM's perturbation along the friendly direction: d written over ``.grad`` first."""
        for p, (m, _), ai, (sigma, _) in zip(parts, ema, a, hyper):
            if not (isinstance(ai, float) and ai == 1.0 and sigma == 0):  # d = a g - sigma m
                ops.combine_(p.grads, [p.grads, m], _weights((ai, -sigma), None, p), backend=self.backend)
        norm = self._ascent_norm(parts)
        moves = self._move(parts, norm)
        skip = (~torch.isfinite(norm)).float()
        for p, (m, _), (sigma, lam) in zip(parts, ema, hyper):  # m' = (lmbda + (1 - lmbda) sigma) m + (1 - lmbda) d
            _blend_(m, [p.grads], lam + (1.0 - lam) * sigma, [1.0 - lam], skip, self.backend)
        return moves

    def _extra_state(self):
        return dict(super()._extra_state(), ema=self._ema.export(self._params()))

    def _check_extra_state(self, state):
        super()._check_extra_state(state)
        self._ema.check(self._params(), state.get("ema", {}), "FriendlySAM", "ema")

    def _load_extra_state(self, state):
        super()._load_extra_state(state)
        self._ema.load(self._params(), state.get("ema", {}))


# ---------------------------------------------------------------------------------- LookSAM

class LookSAM(_Variant):
    r"""LookSAM (Liu et al., CVPR 2022): SAM's gradient every ``k`` steps, reused in between.

    Every ``k``-th step (the first included) is a SAM step: it updates with
    :math:`g_s = \nabla f(w + \rho g/\|g\|)` and keeps the part of :math:`g_s` orthogonal
    to :math:`g`,

    .. math:: g_v = g_s - \|g_s\| \cos\theta\, \frac{g}{\|g\|}
              = g_s - \frac{\langle g, g_s\rangle}{\|g\|^2}\, g .

    The steps in between need one backward only: they update with

    .. math:: g + \alpha\, \frac{\|g\|}{\|g_v\|}\, g_v .

    Usage is SAM's with ``interval=k``: ``first_step()`` returns False on a reuse step
    (no perturbation, ``.grad`` kept; skip the second backward)::

        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            with freeze_bn_stats(model):
                loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)        # or scaler.step(opt)

    Norms and inner products are over the whole model, as in the paper's Algorithm 1
    (pytorch-optimizer's LookSAM uses per-tensor norms and cosines, and runs the second
    backward on every step). Fused: a SAM step adds one ``gram`` pass and one pass that
    writes :math:`g_v` (skipped on AMP overflow or a non-finite gradient: :math:`g_v`
    then stays the last finite one); a reuse step is a norm pass and the fused update of
    :math:`g + w\, g_v`. Epsilons: :math:`g/(\|g\| + \epsilon)` and
    :math:`\|g\| / (\|g_v\| + \epsilon)`, :math:`\epsilon = 10^{-12}`.

    Args:
        k: a SAM step every ``k`` steps (``k=1``: plain SAM).
        alpha: weight of the reused direction (per group).
        The rest as for :class:`SAM`; ``rho`` defaults to 0.05 here.
    """

    _keeps_first_grads = True

    def __init__(self, params, base_optimizer, rho=0.05, k=5, alpha=0.7, adaptive=False, eta=0.0, backend="auto",
                 strategy="auto", max_grad_norm=None, fused=True, **base_kwargs):
        check_interval("LookSAM", k, "k")
        super().__init__(params, base_optimizer, rho, adaptive, eta, backend, strategy, max_grad_norm, fused, k,
                         **base_kwargs)
        self._init_groups(alpha=alpha)
        self._gv = StateBuffers()
        self._t.gv_norm = None  # ||g_v|| (a device tensor), recomputed after a load

    @property
    def k(self):
        return self.interval

    def _check_group(self, group):
        check_hyper("LookSAM", alpha=group["alpha"])

    def _after_update(self, parts, firsts, found_inf, grad_scale):
        if not parts:
            return
        tot = _total(_grams(firsts, parts, self.backend))
        c = tot[0, 1] / (tot[0, 0].sqrt() + EPS) ** 2  # <g, g_s> / ||g||^2
        skip = ~torch.isfinite(tot).all()
        if found_inf is not None:
            skip = skip | (found_inf.to(skip.device).reshape(()) != 0)
        skip = skip.float()
        gvs = []
        for p, f in zip(parts, firsts):
            gv, _ = self._gv.get(p.params)
            _blend_(gv, [p.grads, f], 0.0, _weights((1.0, -c), None, p), skip, self.backend)
            gvs.append(gv)
        self._t.gv_norm = _utils.global_norm([(p.params, gv) for p, gv in zip(parts, gvs)], self.backend)

    def _reuse_mix(self, parts, grad_scale):
        if not parts or all(p.group["alpha"] == 0 for p in parts):
            return super()._reuse_mix(parts, grad_scale)
        gvs = [self._gv.get(p.params)[0] for p in parts]
        if self._t.gv_norm is None:
            self._t.gv_norm = _utils.global_norm([(p.params, gv) for p, gv in zip(parts, gvs)], self.backend)
        grams, norm = [None] * len(parts), None
        if self.max_grad_norm is None:
            ng = _utils.global_norm([(p.params, p.grads) for p in parts], self.backend)
        else:
            grams = [ops.gram([p.grads, gv], backend=self.backend) for p, gv in zip(parts, gvs)]
            ng = _total(grams)[0, 0].sqrt()
        r = ng / (self._t.gv_norm.to(ng.device) + EPS)
        ws = [p.group["alpha"] * r for p in parts]  # d = g + w g_v
        if self.max_grad_norm is not None:
            norm = _combo_norm(grams, [(1.0, w) for w in ws])
        coef = _coef(norm, grad_scale, self.max_grad_norm)
        return [Mix([p.grads, gv], _weights((1.0, w), coef, p, gm)) for p, gv, w, gm in zip(parts, gvs, ws, grams)]

    def _extra_state(self):
        return dict(super()._extra_state(), gv=self._gv.export(self._params()))

    def _check_extra_state(self, state):
        super()._check_extra_state(state)
        self._gv.check(self._params(), state.get("gv", {}), "LookSAM", "gv")

    def _load_extra_state(self, state):
        super()._load_extra_state(state)
        self._gv.load(self._params(), state.get("gv", {}))
        self._t.gv_norm = None


# ---------------------------------------------------------------------------------- helpers

class StateBuffers:
    """Per-parameter state tensors kept across steps (F-SAM's average, LookSAM's g_v):
    zeros when created, cached per parameter list (no per-parameter work once cached), and
    exported by position in the optimizer's parameter order for ``state_dict``."""

    def __init__(self):
        self._by_param = {}  # id(p) -> (p, tensor); the entry keeps p, so its id is not reused
        # (id(first parameter), length) -> (list, tensors): keyed by a parameter's id, not the
        # list's, because under torch.compile a list made inside the traced step has no real id
        self._lists = {}

    def __getstate__(self):  # a copy's parameters are new objects: re-keyed by their ids on load
        return {"entries": list(self._by_param.values())}

    def __setstate__(self, state):
        self.__init__()
        self._by_param = {id(p): (p, t) for p, t in state["entries"]}

    def get(self, params):
        """(tensors like ``params``, whether every one of them was created by this call)."""
        key = (id(params[0]), len(params))
        hit = self._lists.get(key)
        if hit is not None and hit[0] is params:
            return hit[1], False
        out, created = [], 0
        for p in params:
            e = self._by_param.get(id(p))
            if e is None or e[0] is not p or e[1].shape != p.shape or e[1].dtype != p.dtype or e[1].device != p.device:
                e = self._by_param[id(p)] = (p, torch.zeros_like(p, memory_format=torch.preserve_format))
                created += 1
            out.append(e[1])
        if len(self._lists) > 64:  # parameter lists that come and go: keep the cache bounded
            self._lists.clear()
        self._lists[key] = (params, out)
        return out, created == len(params) and created > 0

    def export(self, params):
        """{position in ``params``: tensor} for the parameters that have state."""
        out = {}
        for i, p in enumerate(params):
            e = self._by_param.get(id(p))
            if e is not None and e[0] is p:
                out[i] = e[1]
        return out

    @staticmethod
    def check(params, entries, name, key):
        if not isinstance(entries, dict):
            raise ValueError(f"{name}.load_state_dict: '{key}' must be a dict {{position: tensor}}")
        for i, t in entries.items():
            if not (isinstance(i, int) and 0 <= i < len(params)):
                raise ValueError(f"{name}.load_state_dict: '{key}' has position {i!r}, but the optimizer has "
                                 f"{len(params)} parameters")
            if not isinstance(t, torch.Tensor) or t.shape != params[i].shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}.load_state_dict: '{key}'[{i}] is {got}, but parameter {i} has shape "
                                 f"{list(params[i].shape)}")

    def load(self, params, entries):
        self._by_param, self._lists = {}, {}
        for i, t in entries.items():
            p = params[i]
            self._by_param[id(p)] = (p, torch.empty_like(p).copy_(t.detach()))  # on p's device, in p's layout


def _ratio(gamma):
    return gamma / (1.0 - gamma)


def _grams(firsts, parts, backend):
    """Per part the 2 x 2 Gram matrix of (first-pass, second-pass) gradients."""
    return [ops.gram([f, p.grads], backend=backend) for f, p in zip(firsts, parts)]


def _total(grams):
    """The sum of per-part Gram matrices, in float64 on the first one's device."""
    dev = grams[0].device
    tot = grams[0].to(torch.float64)
    for g in grams[1:]:
        tot = tot + g.to(dev, torch.float64)
    return tot


def _combo_norm(grams, coeffs):
    """|| u_j a + v_j b || over the parts j, for per-part Grams of (a, b) and coefficients
    (u_j, v_j): the norm of a combination without forming it. The square is a difference of
    sums, so it is floored at the Gram's rounding times the sum of the terms' magnitudes:
    where the combination cancels to below what the Gram can resolve, the norm is an upper
    bound (a radius divided by it stays bounded) rather than rounding noise or zero."""
    dev = grams[0].device
    sq = mag = 0.0
    for gm, (u, v) in zip(grams, coeffs):
        gm = gm.to(dev, torch.float64)
        a, b, c = u * u * gm[0, 0], 2 * u * v * gm[0, 1], v * v * gm[1, 1]
        sq, mag = sq + a + b + c, mag + a + abs(b) + c
    rel = 2.0 ** -43 if grams[0].dtype == torch.float64 else 2.0 ** -16
    return torch.maximum(sq, mag * rel).sqrt()


def _coef(norm, grad_scale, max_norm):
    """AMP's unscaling times clipping, from the (still scaled) norm of the final gradient:
    ``1/scale * min(1, max_norm / (||d| / scale + 1e-6))`` as a device tensor, or None."""
    coef = None if grad_scale is None else grad_scale.double().reciprocal()
    if max_norm is not None:
        n = norm if coef is None else norm * coef.to(norm.device)
        clip = _utils.clip_coef(n, max_norm)
        coef = clip if coef is None else coef.to(clip.device) * clip
    return coef


def _weights(values, coef, part, gram=None):
    """The K weights of a fused combination: floats as they are when there is no device
    scalar among them, else one 1-d tensor on the part's device (times ``coef``), in
    float64 for float64 gradients and float32 otherwise."""
    tensors = coef is not None or any(isinstance(v, torch.Tensor) for v in values)
    if not tensors:
        return None if all(v == 1.0 for v in values) else [float(v) for v in values]
    dev = part.params[0].device
    dt = gram.dtype if gram is not None else (torch.float64 if part.grads[0].dtype == torch.float64 else torch.float32)
    ref = next(v for v in (coef, *values) if isinstance(v, torch.Tensor)).to(dev)
    w = torch.stack([v.to(dev, dt).reshape(()) if isinstance(v, torch.Tensor) else torch.full_like(ref, v, dtype=dt)
                     .reshape(()) for v in values])
    return w if coef is None else w * coef.to(dev, dt)


def _blend_(out, lists, keep, weights, skip, backend):
    """``out <- keep * out + sum_k weights[k] * lists[k]`` in one fused pass, leaving
    ``out`` untouched when the one-element device flag ``skip`` is nonzero, so that an
    overflowed (AMP) or non-finite step never reaches the optimizer's state. This is SGD's
    update at lr 1 with weight decay ``1 - keep`` and the negated weights as its gradient,
    which the fused ``sgd_`` already skips on ``found_inf`` (one rounding of ``out`` more
    than the direct formula when ``keep != 1``)."""
    neg = -weights if isinstance(weights, torch.Tensor) else [-w for w in weights]
    dev = out[0].device if out else None
    ops.sgd_(out, lists, lr=1.0, weight_decay=1.0 - keep, grad_weights=neg,
             found_inf=skip.to(dev).reshape(1) if dev is not None else None, backend=backend)


__all__ = ["GSAM", "WSAM", "FriendlySAM", "LookSAM", "StateBuffers"]
