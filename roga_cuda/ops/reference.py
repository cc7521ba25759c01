"""The reference backend: one Python loop per tensor. This file is the specification.

Every other backend is tested against these functions (and against float64 math).
Element-wise math runs in float32 (float64 for float64 storage) and rounds once to the
storage dtype; reductions accumulate in float64 here and are returned as float32
(float64 when any input is float64).

Arguments arrive validated and normalised by ``roga_cuda.ops``: ``scale``/``weight`` is a
Python float or a 0-d tensor on the lists' device; ``weights`` is a list of floats or a
1-d tensor of length K.
"""
import math

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


# ------------------------------------------------------------------ fused base updates
# grads: K lists; weights: K floats or a 1-d tensor; the gradient of position i is
# sum_k weights[k] * grads[k][i]. 2K weights: the second K are the direct row d, and the
# update ends with params -= lr * sum_k d[k] * grads[k] (outside momentum, moments, weight
# decay and maximize: WSAM's decoupled term). source: None (read params) or the list the
# parameter values are read from. grad_out: None or a list receiving the combined
# gradient. steps: None or one-element float32 tensors, the counts before this update;
# incremented after. found_inf: None or a one-element tensor; nonzero skips the update:
# only source (when given) is copied into params, so a restore folded into the update
# still happens.

def _grad_and_source(i, m, params, source, grads, weights, grad_out, maximize):
    """Position i's combined gradient (stored to grad_out before `maximize` negates it), its
    parameter value (read from source when given) and the direct row's combination (None
    without one), in math dtype m."""
    k = len(grads)
    g = sum(weights[j] * grads[j][i].to(m) for j in range(k))
    d = sum(weights[k + j] * grads[j][i].to(m) for j in range(k)) if len(weights) == 2 * k else None
    if grad_out is not None:
        grad_out[i].copy_(g)
    if maximize:
        g = -g
    x = (source[i] if source is not None else params[i]).to(m)
    return g, x, d


def _minus_direct(y, lr, d):
    return y if d is None else y - lr * d


def _skip(found_inf, params, source):
    if found_inf is None or not bool(found_inf.reshape(()) != 0):
        return False
    for p, s in zip(params, source or ()):
        p.copy_(s)
    return True


def sgd_(params, source, grads, weights, grad_out, momentum_buffers, steps, lr, momentum, dampening, nesterov,
         weight_decay, maximize, found_inf):
    """torch.optim.SGD's update (the momentum buffer starts as the gradient at step 0)."""
    if _skip(found_inf, params, source):
        return
    for i, p in enumerate(params):
        m = _math_dtype(p)
        g, x, d = _grad_and_source(i, m, params, source, grads, weights, grad_out, maximize)
        if weight_decay != 0:
            g = g + weight_decay * x
        if momentum != 0:
            first = bool(steps[i].reshape(()) == 0)
            buf = g if first else momentum * momentum_buffers[i].to(m) + (1 - dampening) * g
            momentum_buffers[i].copy_(buf)
            g = g + momentum * buf if nesterov else buf
        p.copy_(_minus_direct(x - lr * g, lr, d))
    for s in steps or ():
        s.add_(1)


def adam_(params, source, grads, weights, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
          eps, weight_decay, decoupled, amsgrad, maximize, found_inf):
    """torch.optim.Adam's update (AdamW: decoupled=True), bias-corrected by each step count."""
    if _skip(found_inf, params, source):
        return
    for i, p in enumerate(params):
        m = _math_dtype(p)
        g, x, d = _grad_and_source(i, m, params, source, grads, weights, grad_out, maximize)
        step = float(steps[i]) + 1
        if weight_decay != 0:
            if decoupled:
                x = x * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * x
        mu = exp_avgs[i].to(m)
        mu = mu + (1 - beta1) * (g - mu)
        nu = beta2 * exp_avg_sqs[i].to(m) + (1 - beta2) * g * g
        exp_avgs[i].copy_(mu)
        exp_avg_sqs[i].copy_(nu)
        if amsgrad:
            nu = torch.maximum(max_exp_avg_sqs[i].to(m), nu)
            max_exp_avg_sqs[i].copy_(nu)
        step_size = lr / (1 - beta1 ** step)
        denom = nu.sqrt() / math.sqrt(1 - beta2 ** step) + eps
        p.copy_(_minus_direct(x - step_size * (mu / denom), lr, d))
    for s in steps:
        s.add_(1)
