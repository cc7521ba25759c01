"""Plain torch, no roga_cuda: a torch bug that affects gradient aggregation on compiled models.

The backward of one loss, taken again through a retained graph of an Inductor-compiled
Linear(bias=False)-BatchNorm-ReLU-Linear model, should repeat itself. With torch 2.13 on CPU,
once a new batch size recompiles the model with dynamic shapes, Inductor's in-place buffer
reuse corrupts a tensor the backward saved, and the repeated backward differs ("differ").
With ``torch._inductor.config.inplace_buffers = False`` (or ``dynamic=False``) it prints
"equal". Whether it shows can depend on what was compiled before in the same process, so
run it alone:

    python tools/repro_inductor_retained_backward.py            # the bug: differ
    python tools/repro_inductor_retained_backward.py --workaround   # equal
"""
import sys

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.nn as nn
import torch.nn.functional as F

if "--workaround" in sys.argv:
    inductor_config.inplace_buffers = False

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
compiled = torch.compile(net, backend="inductor")
params = list(net.parameters())
same = True
with functorch_config.patch(donated_buffer=False):
    for n in (16, 24, 32):  # the second size recompiles with dynamic shapes
        x, y = torch.randn(n, 4), torch.randn(n, 2)
        out = compiled(x)
        loss_a, loss_b = F.mse_loss(out[: n // 2], y[: n // 2]), F.mse_loss(out[n // 2:], y[n // 2:])
        first = torch.autograd.grad(loss_a, params, retain_graph=True)
        torch.autograd.grad(loss_b, params, retain_graph=True)
        again = torch.autograd.grad(loss_a, params, retain_graph=True)
        same = same and all(torch.equal(a, b) for a, b in zip(first, again))
print("equal" if same else "differ")
