"""The SAM variants: optimizer overhead per step, and what LookSAM / interval reuse saves.

1. Overhead: everything a training step does except the forward and backward passes
   (gradients are precomputed tensors handed to ``.grad`` where a backward would produce
   them; the base SGD-with-momentum step is included), for GSAM, WSAM, Friendly-SAM and
   LookSAM from roga_cuda against pytorch-optimizer's implementation of the same variant,
   on the ResNet-34 and AASIST-sized parameter lists, interleaved medians. LookSAM rows are
   the mean over a cycle of k steps (one SAM step, k - 1 reuse steps). Goal: >= 2x.
2. Reuse: the average training-step cost (forward + backward included) of SAM with
   ``interval=k`` and of LookSAM(k) against plain SAM on a small ResNet, interleaved;
   ideal ratio (1 + 1/k) / 2 (goal: within 10% of it).

    python -m benchmarks.bench_sam_family [--device cpu] [--k 5] [--json out.json] [--quick]

``--quick`` runs every code path on tiny inputs in seconds (a smoke test, not a timing).
Without pytorch-optimizer installed the peer rows are left out.
"""
import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from roga_cuda import GSAM, SAM, WSAM, FriendlySAM, LookSAM, freeze_bn_stats

from . import lists as L
from .bench_optim import Model
from .timing import interleaved, machine, median

RHO, LR, K = 0.05, 0.01, 5
VARIANTS = ("gsam", "wsam", "fsam", "looksam")


def _peer():
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    return pytorch_optimizer


# ------------------------------------------------------------------------------- overhead

def _sam_cycle(m, opt, steps=1):
    """SAM-style steps with precomputed gradients: pool 0 is the first pass, pool 1 the
    second (only when first_step perturbed)."""
    for _ in range(steps):
        m.backward(0)
        if opt.first_step(zero_grad=True):
            m.backward(1)
        opt.second_step(zero_grad=True)


def ours(m, k=K, backend="auto"):
    kw = dict(lr=LR, momentum=0.9, rho=RHO, backend=backend)
    opts = {"gsam": GSAM(m.params, torch.optim.SGD, alpha=0.4, **kw),
            "wsam": WSAM(m.params, torch.optim.SGD, gamma=0.9, **kw),
            "fsam": FriendlySAM(m.params, torch.optim.SGD, sigma=1.0, lmbda=0.9, **kw),
            "looksam": LookSAM(m.params, torch.optim.SGD, k=k, alpha=0.7, **kw)}
    return {f"{v}|roga_cuda": (m.refill, lambda o=opts[v], n=(k if v == "looksam" else 1): _sam_cycle(m, o, n))
            for v in VARIANTS}


def theirs(m, po, k=K):
    """pytorch-optimizer's step of each variant, minus the forward/backward passes it
    would run itself (GSAM: its step() with the two closure calls replaced by handing
    over the gradients)."""
    sgd = dict(lr=LR, momentum=0.9)
    base = torch.optim.SGD(m.params, **sgd)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda t: 1.0)
    gsam = po.GSAM(m.params, base, None, po.ProportionScheduler(sched, max_lr=LR, max_value=RHO, min_value=RHO),
                   alpha=0.4)
    wsam = po.WSAM(None, m.params, torch.optim.SGD, rho=RHO, gamma=0.9, **sgd)
    fsam = po.FriendlySAM(m.params, torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.9, **sgd)
    look = po.LookSAM(m.params, torch.optim.SGD, rho=RHO, k=k, alpha=0.7, **sgd)

    def gsam_step():
        base.zero_grad()
        m.backward(0)
        gsam.perturb_weights(rho=gsam.rho_t)
        base.zero_grad()
        m.backward(1)
        gsam.gradient_decompose(gsam.alpha)
        gsam.un_perturb()
        base.step()

    def two_pass(opt, steps=1):  # its step(closure): the closure runs on every step
        for _ in range(steps):
            m.backward(0)
            opt.first_step(zero_grad=True)
            m.backward(1)
            opt.second_step(zero_grad=True)

    return {"gsam|pytorch-optimizer": (m.refill, gsam_step),
            "wsam|pytorch-optimizer": (m.refill, lambda: two_pass(wsam)),
            "fsam|pytorch-optimizer": (m.refill, lambda: two_pass(fsam)),
            "looksam|pytorch-optimizer": (m.refill, lambda: two_pass(look, k))}


def overhead(device, list_names, reps=None, k=K, backend="auto", log=print):
    po = _peer()
    out = {}
    for name in list_names:
        shapes = L.LISTS[name]()
        m = Model(shapes, device, passes=2)
        numel = sum(p.numel() for p in m.params)
        r = reps or (10 if numel > 5e6 else 40)
        variants = ours(m, k, backend)
        if po is not None:
            variants.update(theirs(m, po, k))
        t = interleaved(variants, reps=r, device=device)
        med = {key: median(v) / (k if key.startswith("looksam") else 1) for key, v in t.items()}
        out[name] = {"tensors": len(shapes), "numel": numel, "reps": r, "median_s": med}
        log(format_overhead(name, out[name], k))
        del m
    return out


def format_overhead(name, res, k):
    med = res["median_s"]
    lines = [f"\n### {name}: optimizer overhead per step ({res['tensors']} tensors, {res['numel'] / 1e6:.2f}M params, "
             f"{res['reps']} reps; LookSAM: mean over a k={k} cycle)\n",
             "| variant | roga_cuda | pytorch-optimizer | speedup |", "|---|---:|---:|---:|"]
    for v in VARIANTS:
        a, b = med.get(f"{v}|roga_cuda"), med.get(f"{v}|pytorch-optimizer")
        lines.append(f"| {v} | {a * 1e3:.3f} ms | " + (f"{b * 1e3:.3f} ms | {b / a:.2f}x |" if b else "n/a | |"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- reuse

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet(width=32, blocks=(2, 2, 2, 2), classes=2):
    """A ResNet-18-shaped network (narrower): forward/backward dominate its step, as in training."""
    layers, cin = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
    for i, n in enumerate(blocks):
        cout = width * 2 ** i
        for b in range(n):
            layers.append(Block(cin, cout, 2 if b == 0 and i > 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def reuse(device, k=K, batch=32, size=32, width=32, reps=None, backend="auto", log=print):
    """Mean training-step time over k steps: SAM, SAM(interval=k), LookSAM(k), and the base
    optimizer alone (one pass)."""
    torch.manual_seed(0)
    model = resnet(width).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    kw = dict(lr=LR, momentum=0.9, rho=RHO, backend=backend)
    opts = {"sam": SAM(model.parameters(), torch.optim.SGD, **kw),
            f"sam_interval{k}": SAM(model.parameters(), torch.optim.SGD, interval=k, **kw),
            f"looksam{k}": LookSAM(model.parameters(), torch.optim.SGD, k=k, **kw)}
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, foreach=True)

    def train(opt):
        for _ in range(k):
            F.cross_entropy(model(x), y).backward()
            if opt.first_step(zero_grad=True):
                with freeze_bn_stats(model):
                    F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)

    def erm():
        for _ in range(k):
            F.cross_entropy(model(x), y).backward()
            base.step()
            base.zero_grad()

    variants = {name: (lambda o=o: train(o)) for name, o in opts.items()}
    variants["base"] = erm
    t = interleaved(variants, reps=reps or 5, warmup=1, device=device)
    med = {n: median(v) / k for n, v in t.items()}
    res = {"k": k, "batch": batch, "size": size, "width": width, "median_step_s": med,
           "ideal_ratio": (1 + 1 / k) / 2,
           "ratio_vs_sam": {n: med[n] / med["sam"] for n in med}}
    log(format_reuse(res))
    return res


def format_reuse(res):
    med, ratio, k = res["median_step_s"], res["ratio_vs_sam"], res["k"]
    lines = [f"\n### Reuse: mean training step over k={k} steps (ResNet width {res['width']}, batch {res['batch']} "
             f"at {res['size']}px); ideal ratio vs SAM (1 + 1/k) / 2 = {res['ideal_ratio']:.3f}\n",
             "| variant | mean step | ratio vs SAM | vs ideal |", "|---|---:|---:|---:|"]
    for n in med:
        vs = f"{ratio[n] / res['ideal_ratio']:.3f}" if n != "sam" and n != "base" else ""
        lines.append(f"| {n} | {med[n] * 1e3:.2f} ms | {ratio[n]:.3f} | {vs} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

def run(device="cpu", quick=False, k=K, reps=None, backend="auto", log=print):
    device = torch.device(device)
    res = {"machine": machine(device), "quick": quick}
    if quick:
        res["overhead"] = overhead(device, ["tiny"], reps=reps or 2, k=k, backend=backend, log=log)
        res["reuse"] = reuse(device, k=k, batch=2, size=8, width=4, reps=reps or 2, backend=backend, log=log)
    else:
        res["overhead"] = overhead(device, ["resnet34", "aasist"], reps=reps, k=k, backend=backend, log=log)
        res["reuse"] = reuse(device, k=k, reps=reps, backend=backend, log=log)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--k", type=int, default=K, help="LookSAM's k and SAM's interval")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny inputs: check that everything runs (no timing)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(a.device, a.quick, a.k, a.reps, a.backend)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
