"""The foreach backend: the strongest plain-PyTorch composition of ``torch._foreach_*`` ops.

It is the baseline the compiled backends are measured against and the fallback when they
are unavailable. Each primitive is a handful of multi-tensor launches; temporaries that
would be allocated every step (ASAM weights, the Gram matrix's flat copies) live in a
small workspace cache keyed on the list's shapes, dtypes and device.
"""
import math
from collections import OrderedDict

import torch


class _Workspace:
    """LRU cache of scratch buffers, keyed on (tag, shapes, dtypes, device)."""

    def __init__(self, maxsize=8):
        self.maxsize = maxsize
        self._bufs = OrderedDict()

    def get(self, key, make):
        buf = self._bufs.get(key)
        if buf is None:
            buf = make()
            self._bufs[key] = buf
            if len(self._bufs) > self.maxsize:
                self._bufs.popitem(last=False)
        else:
            self._bufs.move_to_end(key)
        return buf

    def clear(self):
        self._bufs.clear()


workspace = _Workspace()


def _sig(ts):
    return tuple((t.shape, t.dtype) for t in ts), ts[0].device


def _like(ts, tag, math=False):
    """Persistent scratch tensors shaped like ``ts`` (``math=True``: in the math dtype,
    float32 for float16/bfloat16, so intermediates are not rounded to 16 bits). Under
    torch.compile fresh ones: the graph owns its temporaries."""
    def make():
        return [torch.empty_like(t, dtype=_math_dtype(t) if math else t.dtype) for t in ts]
    if torch.compiler.is_compiling():
        return make()
    return workspace.get((tag, math) + _sig(ts), make)


def _math_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _by_dtype(ts):
    """Indices of ``ts`` grouped by dtype (foreach kernels fuse only within one dtype)."""
    groups = {}
    for i, t in enumerate(ts):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def _out_dtype(ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _scaled_add_(dst, src, s):
    """dst += s * src, with s a Python float or a 0-d device tensor (no host sync)."""
    if isinstance(s, torch.Tensor):
        torch._foreach_add_(dst, torch._foreach_mul(src, s))
    else:
        torch._foreach_add_(dst, src, alpha=s)


def _scaled(src, s):
    """s * src as new tensors (s a Python float or a 0-d device tensor)."""
    return torch._foreach_mul(src, s)


# torch._foreach_norm (and vector_norm) lose mass on one tensor of >= 2^28 elements on CPU
# (2^28 ones: sqrt(2^27)); larger tensors are reduced per 2^20-element chunk and combined.
_NORM_CHUNK = 1 << 20


def norm(ts, per_tensor, params, eta):
    if params is not None:  # ASAM: || (|p| + eta) * t ||
        w = _like(params, "asam_norm", math=True)
        torch._foreach_copy_(w, params)
        torch._foreach_abs_(w)
        if eta:
            torch._foreach_add_(w, eta)
        torch._foreach_mul_(w, ts)
        ts = w
    dt = _out_dtype(ts)
    per = [None] * len(ts)
    for idx in _by_dtype(ts).values():
        small = [i for i in idx if ts[i].numel() <= _NORM_CHUNK]
        for i, n in zip(small, torch._foreach_norm([ts[i] for i in small], 2, dtype=dt) if small else []):
            per[i] = n
        for i in idx:
            if per[i] is None:
                chunks = torch.split(ts[i].reshape(-1), _NORM_CHUNK)
                per[i] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(chunks, 2, dtype=dt)))
    per = torch.stack(per)
    total = torch.linalg.vector_norm(per)
    return total, (per if per_tensor else None)


def perturb_(params, grads, backup, scale, adaptive, eta):
    torch._foreach_copy_(backup, params)
    if adaptive:  # ASAM: scale * (|p| + eta)^2 * g
        w = _like(params, "asam_perturb", math=True)
        torch._foreach_copy_(w, params)
        torch._foreach_abs_(w)
        if eta:
            torch._foreach_add_(w, eta)
        torch._foreach_mul_(w, w)
        torch._foreach_mul_(w, grads)
        grads = w
    _scaled_add_(params, grads, scale)


def restore_(params, backup):
    torch._foreach_copy_(params, backup)


def restore_accumulate_(params, backup, acc, grads, weight):
    torch._foreach_copy_(params, backup)
    _scaled_add_(acc, grads, weight)


def gram(lists):
    # No foreach reduction computes dot products, so each list is copied once into a
    # persistent flat row of one (K, total) matrix and G = M @ M^T is one GEMM.
    k = len(lists)
    dt = _out_dtype(lists[0])
    sizes = [t.numel() for t in lists[0]]
    total = sum(sizes)
    dev = lists[0][0].device

    def make():
        m = torch.empty(k, total, dtype=dt, device=dev)
        views = [list(torch.split(m[a], sizes)) for a in range(k)]
        views = [[v.view(t.shape) for v, t in zip(row, lists[0])] for row in views]
        return m, views

    if torch.compiler.is_compiling():  # no persistent workspace inside a graph
        m = torch.stack([torch.cat([t.reshape(-1).to(dt) for t in lst]) for lst in lists])
        g = m @ m.T
        return g.triu() + g.triu(1).T
    m, views = workspace.get(("gram", k, dt) + _sig(lists[0]), make)
    for a in range(k):
        torch._foreach_copy_(views[a], lists[a])
    g = m @ m.T
    return g.triu() + g.triu(1).T  # BLAS does not promise an exactly symmetric product


def combine_(out, lists, weights):
    k = len(lists)
    if torch.compiler.is_compiling():
        # Data pointers are not traceable, so aliasing cannot be told apart: compute into
        # temporaries first (the graph's reinplacing removes what it can).
        acc = _scaled(lists[0], weights[0])
        for j in range(1, k):
            torch._foreach_add_(acc, _scaled(lists[j], weights[j]))
        torch._foreach_copy_(out, acc)
        return
    ptrs = [o.data_ptr() if o.numel() else None for o in out]
    hits = [[p is not None and p == x.data_ptr() for p, x in zip(ptrs, lst)] for lst in lists]
    touched = [j for j in range(k) if any(hits[j])]
    full = len(touched) == 1 and all(h or p is None for h, p in zip(hits[touched[0]], ptrs))
    if touched and not full:
        # `out` aliases several inputs, or one only at some positions: go through scratch.
        tmp = _like(out, "combine")
        combine_(tmp, lists, weights)
        torch._foreach_copy_(out, tmp)
        return
    alias = touched[0] if touched else None
    if alias is None:
        torch._foreach_zero_(out)
    else:  # out is lists[alias]: scale it in place first, then add the others
        torch._foreach_mul_(out, weights[alias])
    for j in range(k):
        if j != alias:
            _scaled_add_(out, lists[j], weights[j])


# ------------------------------------------------------------------ fused base updates
# The foreach backend is the plain-PyTorch baseline: its updates read the step counts (and
# found_inf, a tensor lr) on the host, which synchronises with a GPU once per call. The
# compiled backends do not.

def _combined(grads, weights):
    """sum_k w_k grads[k]: grads[0] itself when that is the whole sum, else new tensors."""
    if len(grads) == 1 and not isinstance(weights, torch.Tensor) and weights[0] == 1.0:
        return grads[0]
    acc = _scaled(grads[0], weights[0])
    for k in range(1, len(grads)):
        torch._foreach_add_(acc, _scaled(grads[k], weights[k]))
    return acc


def _direct(grads, weights):
    """The direct row's combination (2K weights), never grads[0] itself: grad_out may be it."""
    k = len(grads)
    if len(weights) != 2 * k:
        return None
    d = _combined(grads, weights[k:])
    return torch._foreach_mul(d, 1.0) if d is grads[0] else d


def _host(x):
    return float(x) if isinstance(x, torch.Tensor) else x


def _skipped(found_inf, params, source):
    if found_inf is None or _host(found_inf) == 0:
        return False
    if source is not None:  # a restore folded into the update still happens
        torch._foreach_copy_(params, source)
    return True


def _front(params, source, grads, weights, grad_out, maximize):
    g = _combined(grads, weights)
    if grad_out is not None:
        torch._foreach_copy_(grad_out, g)
    if maximize:
        g = torch._foreach_neg(g)
    if source is not None:
        torch._foreach_copy_(params, source)
    return g


def sgd_(params, source, grads, weights, grad_out, momentum_buffers, steps, lr, momentum, dampening, nesterov,
         weight_decay, maximize, found_inf):
    if _skipped(found_inf, params, source):
        return
    lr = _host(lr)
    d = _direct(grads, weights)
    g = _front(params, source, grads, weights, grad_out, maximize)
    if weight_decay != 0:
        g = torch._foreach_add(g, params, alpha=weight_decay)
    if momentum != 0:
        first = torch.stack([s.reshape(()) for s in steps]).eq(0).tolist()
        old = [i for i, f in enumerate(first) if not f]
        new = [i for i, f in enumerate(first) if f]
        if new:
            torch._foreach_copy_([momentum_buffers[i] for i in new], [g[i] for i in new])
        if old:
            bufs = [momentum_buffers[i] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [g[i] for i in old], alpha=1 - dampening)
        g = torch._foreach_add(g, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    torch._foreach_add_(params, g, alpha=-lr)
    if d is not None:
        torch._foreach_add_(params, d, alpha=-lr)
    if steps:
        torch._foreach_add_(steps, 1)


def adam_(params, source, grads, weights, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
          eps, weight_decay, decoupled, amsgrad, maximize, found_inf):
    if _skipped(found_inf, params, source):
        return
    lr = _host(lr)
    d = _direct(grads, weights)
    g = _front(params, source, grads, weights, grad_out, maximize)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    nu = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        nu = max_exp_avg_sqs
    counts = [c + 1 for c in torch.stack([s.reshape(()) for s in steps]).tolist()]
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** c) for c in counts])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1 ** c) for c in counts])
    if d is not None:
        torch._foreach_add_(params, d, alpha=-lr)
    torch._foreach_add_(steps, 1)
