"""The reference backend: one Python loop per tensor. This file is the specification.

Every other backend is tested against these functions (and against float64 math).
Element-wise math runs in float32 (float64 for float64 storage) and rounds once to the
storage dtype; reductions accumulate in float64 here and are returned as float32
(float64 when any input is float64).

Arguments arrive validated and normalised by ``roga_cuda.ops``: ``scale``/``weight`` is a
Python float or a 0-d tensor on the lists' device; ``weights`` is a list of floats or a
1-d tensor of length K.
"""
import torch


def _math_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _out_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def norm(ts, per_tensor, params, eta):
    sq = []
    for i, t in enumerate(ts):
        x = t.double()
        if params is not None:  # ASAM: || (|p| + eta) * t ||
            x = (params[i].double().abs() + eta) * x
        sq.append(x.pow(2).sum())
    sq = torch.stack(sq)
    dt = _out_dtype(ts)
    total = sq.sum().sqrt().to(dt)
    return total, (sq.sqrt().to(dt) if per_tensor else None)


def perturb_(params, grads, backup, scale, adaptive, eta):
    for p, g, b in zip(params, grads, backup):
        b.copy_(p)
        m = _math_dtype(p)
        pf, gf = p.to(m), g.to(m)
        if adaptive:  # ASAM: scale * (|p| + eta)^2 * g
            gf = (pf.abs() + eta).pow(2) * gf
        p.copy_(pf + scale * gf)


def restore_(params, backup):
    for p, b in zip(params, backup):
        p.copy_(b)


def restore_accumulate_(params, backup, acc, grads, weight):
    for p, b, a, g in zip(params, backup, acc, grads):
        p.copy_(b)
        m = _math_dtype(a)
        a.copy_(a.to(m) + weight * g.to(m))


def gram(lists):
    k = len(lists)
    out = torch.zeros(k, k, dtype=torch.float64, device=lists[0][0].device)
    for a in range(k):
        for b in range(a, k):
            s = sum((x.double() * y.double()).sum() for x, y in zip(lists[a], lists[b]))
            out[a, b] = out[b, a] = s
    return out.to(_out_dtype(lists[0]))


def combine_(out, lists, weights):
    for i, o in enumerate(out):
        m = _math_dtype(o)
        acc = sum(weights[k] * lists[k][i].to(m) for k in range(len(lists)))
        o.copy_(acc)  # the sum is complete before `o` is written: `o` may alias an input
