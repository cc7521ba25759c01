"""Gradient surgery in Gram space: PCGrad, GradVac, CAGrad, MGDA and the plain sum.

Every method here only needs the inner products between the K task gradients: each
projected gradient stays a linear combination ``sum_k c_k g_k`` whose inner products follow
from the Gram matrix ``G``. So a step is one fused ``gram`` pass over the K gradients, a
K x K solve for the coefficients, and one fused ``combine_`` pass into ``.grad`` — no
flattening copies, no per-parameter loops.

    opt = PCGrad(model.parameters(), torch.optim.AdamW, lr=1e-4)       # method="pcgrad", reduction="sum"
    opt.zero_grad()
    opt.backward([loss_clean, loss_augmented])    # may share one graph
    opt.step()
    opt.stats["cosine"][0, 1], opt.conflict_rate  # free statistics from G

Reductions: ``"sum"`` (the DPDA paper's choice, and the default) returns ``sum_i g_i'``;
``"mean"`` divides by K. For MGDA and CAGrad, whose natural direction is mean-like,
``"sum"`` multiplies it by K so the flag means the same for every method.
"""
import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from . import _utils
from .base import WrapperOptimizer
from .fused import UpdatePart

METHODS = ("pcgrad", "gradvac", "cagrad", "mgda", "sum")


# ------------------------------------------------------------------- K x K solvers
# Each returns "sum-form" coefficients w (the update is sum_k w_k g_k with reduction="sum").

def pcgrad_weights(G, orders, eps=1e-20):
    """PCGrad (Yu et al. 2020) in Gram space, on G's device (no host sync).

    For each task i, c = e_i; for j in orders[i]: if <g_i', g_j> < 0, project:
    c_j -= <g_i', g_j> / ||g_j||^2. Returns sum_i c_i."""
    k = G.shape[0]
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    total = torch.zeros(k, dtype=G.dtype, device=G.device)
    diag = G.diagonal()
    for i in range(k):
        c = eye[i]
        for j in orders[i]:
            d = c @ G[:, j]
            step = torch.where((d < 0) & (diag[j] > eps), d / diag[j].clamp_min(eps), torch.zeros_like(d))
            c = c - step * eye[j]
        total = total + c
    return total


def gradvac_weights(G, targets, beta, orders, eps=1e-20):
    """GradVac (Wang et al. 2021) in Gram space. targets[i, j] are the EMA cosine targets
    phi_hat; returns (weights, new_targets). When cos(g_i', g_j) < phi_hat_ij, add
    w g_j with w = ||g_i'|| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) / (||g_j|| sqrt(1-phi_hat^2)),
    then phi_hat_ij <- (1-beta) phi_hat_ij + beta phi_ij."""
    k = G.shape[0]
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    total = torch.zeros(k, dtype=G.dtype, device=G.device)
    new = targets.clone()
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    for i in range(k):
        c = eye[i]
        for j in orders[i]:
            gi2 = c @ G @ c
            gj2 = G[j, j]
            phi = ((c @ G[:, j]) / (gi2 * gj2).clamp_min(eps).sqrt()).clamp(-1.0, 1.0)
            t = targets[i, j]
            num = t * (1 - phi * phi).clamp_min(0).sqrt() - phi * (1 - t * t).clamp_min(0).sqrt()
            w = gi2.clamp_min(0).sqrt() * num / (gj2.clamp_min(eps).sqrt() * (1 - t * t).clamp_min(eps).sqrt())
            c = c + torch.where(phi < t, w, zero) * eye[j]
            new[i, j] = torch.where(torch.isfinite(phi), (1 - beta) * t + beta * phi, t)
        total = total + c
    return total, new


def mgda_weights(G, iters=250):
    """MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the gradients,
    min_{w in simplex} w^T G w. K=2 in closed form, else Frank-Wolfe with exact line search.
    Host computation on a K x K float64 array. Returns K * w (sum-form)."""
    A = np.asarray(G, dtype=np.float64)
    k = A.shape[0]
    if not np.all(np.isfinite(A)):
        return np.full(k, np.nan)
    if k == 1:
        return np.ones(1)
    if k == 2:
        den = A[0, 0] + A[1, 1] - 2 * A[0, 1]
        gamma = 0.5 if den <= 0 else min(1.0, max(0.0, (A[1, 1] - A[0, 1]) / den))
        return 2 * np.array([gamma, 1 - gamma])
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        grad = A @ w
        j = int(np.argmin(grad))
        v = -w.copy()
        v[j] += 1.0
        vAv = v @ A @ v
        if vAv <= 1e-30:
            break
        gamma = min(1.0, max(0.0, -(w @ A @ v) / vAv))
        if gamma < 1e-10:
            break
        w = w + gamma * v
    return k * w


def cagrad_weights(G, c=0.5, rescale=1, iters=300):
    """CAGrad (Liu et al. 2021): d = g0 + (c ||g0|| / ||g_w||) g_w, with g0 the mean gradient
    and w = argmin_{w in simplex} g_w . g0 + c ||g0|| ||g_w||; divided by 1 + c^2
    (rescale=1, the reference default), 1 + c (rescale=2) or not (rescale=0).
    Host computation; K=2 by bisection on the derivative, else exponentiated gradient.
    Returns sum-form coefficients (K * the mean-like direction's)."""
    A = np.asarray(G, dtype=np.float64)
    k = A.shape[0]
    if not np.all(np.isfinite(A)):
        return np.full(k, np.nan)
    b = np.full(k, 1.0 / k)
    g0_norm = math.sqrt(max(A.mean(), 0.0) + 1e-8)
    cc = c * g0_norm + 1e-8
    Ab = A @ b

    def grad(w):
        Aw = A @ w
        return Ab + cc * Aw / math.sqrt(max(w @ Aw, 0.0) + 1e-8)

    if k == 1:
        w = np.ones(1)
    elif k == 2:  # F(gamma) is convex on [0, 1]: bisect on the sign of dF/dgamma
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            gw = grad(np.array([mid, 1 - mid]))
            if gw[0] - gw[1] > 0:
                hi = mid
            else:
                lo = mid
        w = np.array([0.5 * (lo + hi), 1 - 0.5 * (lo + hi)])
    else:
        w = b.copy()
        scale = None
        for t in range(iters):
            g = grad(w)
            if scale is None:
                scale = 1.0 / (np.abs(g).max() + 1e-30)
            z = -scale * g / math.sqrt(t + 1)
            w = w * np.exp(z - z.max())
            w /= w.sum()
    gw_norm = math.sqrt(max(w @ A @ w, 0.0) + 1e-8)
    lam = cc / gw_norm
    d = b + lam * w
    d = d / {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]
    return k * d


# ------------------------------------------------------------------------ optimizer

class PCGrad(WrapperOptimizer):
    """Gradient surgery over K losses (tasks, or the clean and augmented paths of DPDA).

    Args:
        params, base_optimizer, **base_kwargs: as for :class:`SAM`.
        method: "pcgrad" | "gradvac" | "cagrad" | "mgda" | "sum".
        reduction: "sum" (default, the paper's choice) or "mean".
        beta: GradVac's EMA rate for the cosine targets. c, cagrad_rescale: CAGrad's
            conflict-aversion radius and output rescaling.
        max_grad_norm: clip the final gradient (free: its norm follows from G).
        seed: seeds the random projection order (K > 2); saved in state_dict. Under
            torch.distributed every rank must draw the same orders: give every rank the
            same seed, or leave it None and rank 0's seed is broadcast at the first draw.
        ddp_sync: all-reduce the K task gradients across processes before the surgery
            (default: when torch.distributed runs with more than one process); pass the
            DDP model to backward(model=...) so the K backward passes skip DDP's own sync.
        fused: run the base update (SGD, Adam, AdamW) as a fused primitive.

    ``step(closure)`` with a closure that returns the K losses runs backward, the surgery and
    the base update with the combination folded into the update (one pass over the K
    gradients). Models under ``torch.compile``: the K backward passes share one compiled
    graph, which AOTAutograd must not compile with donated buffers; constructing a PCGrad
    turns ``torch._functorch.config.donated_buffer`` off (before the model's first compile).
    """

    _step_supports_amp_scaling = True  # GradScaler.step(): unscale and skip inside the update

    def __init__(self, params, base_optimizer, method="pcgrad", reduction="sum", backend="auto", *,
                 beta=0.01, c=0.5, cagrad_rescale=1, max_grad_norm=None, seed=None, ddp_sync=None, fused=True,
                 **base_kwargs):
        if method not in METHODS:
            raise ValueError(f"PCGrad: method must be one of {METHODS}, got {method!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PCGrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        if not 0 < beta <= 1:
            raise ValueError(f"PCGrad: beta must be in (0, 1], got {beta}")
        if not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"PCGrad: c must be a finite number >= 0, got {c}")
        if cagrad_rescale not in (0, 1, 2):
            raise ValueError(f"PCGrad: cagrad_rescale must be 0, 1 or 2, got {cagrad_rescale}")
        super().__init__(params, base_optimizer, {}, backend, max_grad_norm, fused, **base_kwargs)
        self.method, self.reduction = method, reduction
        self.beta, self.c, self.cagrad_rescale = beta, c, cagrad_rescale
        self.ddp_sync = ddp_sync
        self._sync()  # a clear error now for ddp_sync=True on sharded (FSDP) parameters
        self._gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63) if seed is None else int(seed))
        self._seed_shared = seed is not None  # else rank 0's seed is broadcast before the first draw
        self._stash = None  # per task: gradients aligned with the layout's params (None: no gradient)
        self._aligned = None  # _Aligned between a folding align() and step()
        self._flat = None
        self._inv_scale = None
        self._targets = None  # GradVac's EMA cosine targets (K x K)
        self._n_steps = 0
        self._n_conflict = None  # device tensors: steps with a conflicting pair, steps with a finite G
        self._n_finite = None
        self.stats = {}
        _no_donated_buffers()

    # ---------------------------------------------------------------------------------
    def _task_views(self, k):
        """Per task, gradients as views of one flat buffer per dtype/device (one all-reduce
        each), as lists aligned with the layout's params."""
        lay = self._layout()
        if self._flat is None or self._flat[0] is not lay or len(self._flat[1]) < k:
            tasks = []
            for _ in range(k):
                bufs, views = _utils.flat_views(lay.params, zero=True)
                tasks.append((bufs, [views[id(p)] for p in lay.params]))
            self._flat = (lay, tasks)
        return self._flat[1][:k]

    def backward(self, losses, *, align=True, scaler=None, model=None, retain_graph=False):
        """Compute the K task gradients and, with ``align=True``, combine them into ``.grad``.

        losses: K scalar losses (they may share one graph). align=False keeps adding the
        task gradients to pending sums (gradient accumulation over micro-batches: surgery
        once, on the accumulated gradients, at align()). scaler: a GradScaler: the losses
        are scaled here, and clipping uses the unscaled norm. model: a
        DistributedDataParallel model, whose own gradient sync is skipped (see ddp_sync), or
        an FSDP2 (fully_shard) model, whose parameters then stay gathered from one pass to
        the next (they do not change in between) and are resharded after the last: no
        re-gathering in passes 2..K, at the memory cost of the whole parameters meanwhile.
        """
        losses = self._check_losses(losses)
        k = len(losses)
        if scaler is not None and scaler.is_enabled():
            losses = [scaler.scale(l) for l in losses]
            self._inv_scale = _utils.inv_scale_of(scaler)
        else:
            self._inv_scale = None
        params = self._params()
        flat = self._task_views(k) if self._sync() else None
        if flat is not None and self._stash is None:
            for bufs, _ in flat:
                for b in bufs:
                    b.zero_()
        ctx = model.no_sync() if model is not None and hasattr(model, "no_sync") else contextlib.nullcontext()
        keep_gathered = model is not None and hasattr(model, "set_reshard_after_backward")  # FSDP2
        stash = []
        with ctx, _resharded_at_exit(model if keep_gathered else None):
            for t, loss in enumerate(losses):
                if keep_gathered:
                    model.set_reshard_after_backward(t == k - 1)
                # accumulate into the flat views / the pending sums, or let autograd allocate
                if flat is not None:
                    _utils.set_grads(params, flat[t][1])
                else:
                    _utils.set_grads(params, self._stash[t] if self._stash is not None else None)
                try:
                    torch.autograd.backward(loss, retain_graph=retain_graph or t < k - 1)
                except RuntimeError as e:
                    if "donated buffers" in str(e):
                        raise RuntimeError(
                            "PCGrad.backward: the model was compiled (torch.compile) with donated buffers, which "
                            "forbid the K backward passes through one graph; construct the PCGrad optimizer before "
                            "the model's first forward, or set torch._functorch.config.donated_buffer = False") from e
                    raise
                stash.append(_utils.grads_of(params)[0])
        _utils.set_grads(params, None)
        self._stash = stash
        if align:
            self.align()

    def _check_losses(self, losses):
        if isinstance(losses, torch.Tensor):
            if losses.dim() == 0:
                raise ValueError("PCGrad.backward: got one 0-d loss; give the K task losses as a list "
                                 "(or a 1-d tensor of K losses)")
            losses = list(losses.unbind())
        else:
            losses = list(losses)
        k = len(losses)
        if k < 1:
            raise ValueError("PCGrad.backward: give at least one loss")
        if self._stash is not None and len(self._stash) != k:
            raise ValueError(f"PCGrad.backward: got {k} losses but the pending accumulation has {len(self._stash)}")
        if self._targets is not None and self._targets.shape[0] != k:
            raise ValueError(f"PCGrad.backward: got {k} losses but this optimizer has aligned "
                             f"{self._targets.shape[0]} tasks so far")
        for i, l in enumerate(losses):
            if not isinstance(l, torch.Tensor) or l.numel() != 1:
                raise ValueError(f"PCGrad.backward: losses[{i}] must be a scalar tensor")
            if not l.requires_grad:
                raise ValueError(f"PCGrad.backward: losses[{i}] does not require grad (was it computed under no_grad?)")
        return losses

    @torch.no_grad()
    def align(self, fold=False):
        """Gram matrix, coefficients, and the combined gradient into ``.grad``. ``fold``:
        leave the combination to the next step(), inside the base update (one pass)."""
        if self._stash is None:
            raise RuntimeError("PCGrad.align() without backward(losses)")
        stash, self._stash = self._stash, None
        k = len(stash)
        lay = self._layout()
        if self._sync() and self._flat is not None:
            world = dist.get_world_size()
            for bufs, _ in self._flat[1][:k]:
                for b in bufs:
                    dist.all_reduce(b)
                    b.div_(world)
        present = [i for i in range(len(lay.params)) if any(s[i] is not None for s in stash)] \
            if any(g is None for s in stash for g in s) else None
        if present is not None and not present:
            raise RuntimeError("PCGrad: no parameter received a gradient from the losses")
        parts = []  # (group, params, K lists)
        for (group, ps), (a, b) in zip(lay.parts, lay.bounds):
            idx = range(a, b) if present is None else [i for i in present if a <= i < b]
            if not idx:
                continue
            plist = ps if present is None else [lay.params[i] for i in idx]
            lists = [[s[i] if s[i] is not None else torch.zeros_like(lay.params[i]) for i in idx] for s in stash] \
                if present is not None else [s[a:b] if len(lay.parts) > 1 else s for s in stash]
            parts.append((group, plist, lists))
        grams = [_utils.local_value(ops.gram(lists, backend=self.backend)) for _, _, lists in parts]
        G = grams[0] if len(grams) == 1 else sum(g.to(grams[0].device) for g in grams)
        w = self._coefficients(G)
        if self.reduction == "mean":
            w = w / k
        if self.max_grad_norm is not None:
            dnorm = (w @ G.double() @ w).clamp_min(0).sqrt()
            if self._inv_scale is not None:
                dnorm = dnorm * self._inv_scale.to(dnorm.device, torch.float64)
            w = w * (self.max_grad_norm / (dnorm + 1e-6)).clamp(max=1.0)
        self._record(G)
        if fold and self.fused:
            self._aligned = [(group, ps, lists, w) for group, ps, lists in parts]
            return
        for group, ps, lists in parts:
            ops.combine_(lists[0], lists, w.to(lists[0][0].device), backend=self.backend)
            _utils.set_grads(ps, lists[0])

    def _orders(self, k, device):
        if k <= 2:
            return [[j for j in range(k) if j != i] for i in range(k)]
        if not self._seed_shared:
            self._share_seed(device)
        out = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            perm = torch.randperm(len(others), generator=self._gen).tolist()
            out.append([others[m] for m in perm])
        return out

    def _share_seed(self, device):
        """Rank 0's seed for every rank (once): ranks that projected in different orders
        would compute different coefficients, and DDP replicas or FSDP shards would diverge."""
        self._seed_shared = True
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            seed = torch.tensor([self._gen.initial_seed()], dtype=torch.int64, device=device)
            dist.broadcast(seed, src=0)
            self._gen.manual_seed(int(seed))

    def _coefficients(self, G):
        k = G.shape[0]
        G64 = G.double()
        if self.method == "sum":
            return torch.ones(k, dtype=torch.float64, device=G.device)
        if self.method == "pcgrad":
            return pcgrad_weights(G64, self._orders(k, G.device))
        if self.method == "gradvac":
            if self._targets is None:
                self._targets = torch.zeros(k, k, dtype=torch.float64, device=G.device)
            w, self._targets = gradvac_weights(G64, self._targets.to(G.device), self.beta, self._orders(k, G.device))
            return w
        host = G64.cpu().numpy()  # one small device-to-host copy: the solvers iterate on the host
        w = mgda_weights(host) if self.method == "mgda" else cagrad_weights(host, self.c, self.cagrad_rescale)
        return torch.as_tensor(w, dtype=torch.float64).to(G.device)

    def _record(self, G):
        d = G.diagonal().clamp_min(1e-30).sqrt()
        cos = G / (d[:, None] * d[None, :])
        k = G.shape[0]
        off = ~torch.eye(k, dtype=torch.bool, device=G.device)
        conflict = (G < 0) & off
        any_conflict = conflict.any()
        # Steps whose Gram matrix is not finite (an AMP overflow the scaler will skip) count
        # neither as conflicts nor in the denominator: the rate stays unbiased under fp16.
        finite = torch.isfinite(G).all()
        if self._n_conflict is None:
            self._n_conflict = torch.zeros((), device=G.device)
            self._n_finite = torch.zeros((), device=G.device)
        self._n_conflict = self._n_conflict + (any_conflict & finite).float()
        self._n_finite = self._n_finite + finite.float()
        self._n_steps += 1
        self.stats = {"gram": G, "cosine": cos, "conflict": conflict, "any_conflict": any_conflict,
                      "finite": finite, "conflict_rate": self._n_conflict / self._n_finite.clamp_min(1),
                      "steps": self._n_steps}

    @property
    def conflict_rate(self):
        """Fraction of aligned steps (with a finite Gram matrix) that had at least one
        conflicting pair; a Python float (synchronises with the device)."""
        if self._n_conflict is None or float(self._n_finite) == 0:
            return float("nan")
        return float(self._n_conflict / self._n_finite)

    def reset_stats(self):
        self._n_steps, self._n_conflict, self._n_finite, self.stats = 0, None, None, {}

    @torch.no_grad()
    def step(self, closure=None):
        """The base optimizer's update on the aligned gradient in ``.grad``.

        closure: either torch's kind (forward, backward, returns the loss) or one that
        returns the K task losses (a list or tuple): then backward, the surgery and the
        base update run here, the combination folded into the update."""
        if self._stash is not None:
            raise RuntimeError("PCGrad.step(): backward(..., align=False) left task gradients pending; "
                               "call align() first (before GradScaler.step with AMP)")
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
        if self._aligned is not None:
            aligned, self._aligned = self._aligned, None
            updates = []
            for group, ps, lists, w in aligned:
                wd = w.to(lists[0][0].device)
                if coef is not None:
                    wd = wd * coef.to(wd.device)
                updates.append(UpdatePart(group, ps, lists, wd, grad_out=lists[0]))
                _utils.set_grads(ps, lists[0])
        else:
            updates = [UpdatePart(p.group, p.params, [p.grads], None if coef is None else
                                  coef.to(p.params[0].device).reshape(1)) for p in self._gather()]
        self._base_step(updates, found_inf)
        return loss

    def _extra_state(self):
        return {"method": self.method, "targets": self._targets, "generator": self._gen.get_state(),
                "n_steps": self._n_steps,
                "n_conflict": None if self._n_conflict is None else self._n_conflict.detach().cpu(),
                "n_finite": None if self._n_finite is None else self._n_finite.detach().cpu()}

    def _check_extra_state(self, state):
        if state and state.get("method", self.method) != self.method:
            raise ValueError(f"PCGrad.load_state_dict: state is for method {state['method']!r}, not {self.method!r}")

    def _load_extra_state(self, state):
        if not state:
            return
        dev = next((p.device for p in self._params()), torch.device("cpu"))
        t = state.get("targets")
        self._targets = None if t is None else t.to(dev)
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])
            self._seed_shared = True  # the same saved state on every rank
        self._n_steps = state.get("n_steps", 0)
        n, f = state.get("n_conflict"), state.get("n_finite")
        self._n_conflict = None if n is None else n.to(dev)
        self._n_finite = None if n is None else (f if f is not None else torch.tensor(float(self._n_steps))).to(dev)


@contextlib.contextmanager
def _resharded_at_exit(model):
    """FSDP2's default (reshard after backward) back on model at exit, also on an error."""
    try:
        yield
    finally:
        if model is not None:
            model.set_reshard_after_backward(True)


def _no_donated_buffers():
    """K backward passes through one graph need it retained, which AOTAutograd forbids for
    graphs compiled with donated buffers (a memory optimisation): turn them off."""
    try:
        import torch._functorch.config as fconfig
    except ImportError:
        return
    if getattr(fconfig, "donated_buffer", False):
        fconfig.donated_buffer = False
