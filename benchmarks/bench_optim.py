"""Whole-optimizer overhead per step: everything except the forward and backward passes.

SAM, RoGA (K=3 domains) and PCGrad (K=2) from roga_cuda, against plain-PyTorch versions of
the public code's approach (per-parameter loops that clone every step; PCGrad with
torch.cat flattening), on the ResNet-34 and AASIST-sized parameter lists. Gradients are
precomputed tensors handed to ``.grad`` where a backward pass would produce them, so the
timings contain only optimizer work (the base SGD step included, identical for all).
Peak extra memory: measured per variant in a fresh process (max RSS on CPU,
max_memory_allocated on CUDA) above the model + its gradients.

    python -m benchmarks.bench_optim --device cpu [--memory]
"""
import argparse
import json
import random

import torch

from roga_cuda import PCGrad, RoGA, SAM

from . import lists as L
from .timing import in_child, interleaved, machine, median, peak_bytes_over, rss_follows_use, sync

K_ROGA, RHO, ALPHA = 3, 0.1, 2e-4


class Model:
    """Parameters, and the gradient tensors backward passes would produce.

    ``backward(i)`` hands ``.grad`` the i-th tensors of a pool, as autograd hands over the
    tensors it allocated; ``refill()`` (untimed) restores the pool's values, since
    optimizers may adopt and update those tensors in place."""

    def __init__(self, shapes, device, passes=2 * K_ROGA):
        self.params = [torch.nn.Parameter(t) for t in L.make(shapes, device, seed=0)]
        self.src = [[g * 1e-3 for g in L.make(shapes, device, seed=s)] for s in range(1, passes + 1)]
        # a second task gradient that conflicts with the first
        self.src.append([(-0.3 * a + 0.5 * b) for a, b in zip(self.src[0], self.src[1])])
        self.pool = [[g.clone() for g in gs] for gs in self.src]

    def refill(self):
        for dst, src in zip(self.pool, self.src):
            torch._foreach_copy_(dst, src)

    def backward(self, i):
        for p, g in zip(self.params, self.pool[i]):
            p.grad = g

    @property
    def task2(self):
        return self.pool[-1]


# ------------------------------------------------------------------------- public-code style

class PublicSAM:
    """davda54/sam's step, verbatim in spirit: per-parameter loops, a clone per step."""

    def __init__(self, params, lr=0.01):
        self.params = list(params)
        self.base = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.state = {}

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = RHO / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.state[p] = p.data.clone()
            e_w = p.grad * scale.to(p)
            p.add_(e_w)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.state[p]
        self.base.step()
        for p in self.params:
            p.grad = None


class PublicRoGA(PublicSAM):
    """RoGA written the public-code way: SAM's loops per domain, a Python accumulator."""

    @torch.no_grad()
    def perturb(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]), p=2)
        scale = RHO / (grad_norm + 1e-12) - ALPHA
        for p in self.params:
            self.state[p] = p.data.clone()
            p.add_(p.grad * scale.to(p))
            p.grad = None

    @torch.no_grad()
    def accumulate(self):
        for p in self.params:
            p.data = self.state[p]
            if "acc" not in self.state:
                self.state["acc"] = {}
            acc = self.state["acc"]
            acc[p] = acc[p] + p.grad if p in acc else p.grad.clone()
            p.grad = None

    @torch.no_grad()
    def step(self, k):
        acc = self.state.pop("acc")
        for p in self.params:
            p.grad = acc[p] / k
        self.base.step()
        for p in self.params:
            p.grad = None


@torch.no_grad()
def public_pc_project(flat_grads):
    """pc_backward's core as the PyTorch PCGrad port writes it, on flattened task gradients:
    each g_i projected off every conflicting g_j (in shuffled order), then summed."""
    grads = list(flat_grads)
    pc = [g.clone() for g in grads]
    for g_i in pc:
        random.shuffle(grads)
        for g_j in grads:
            d = torch.dot(g_i, g_j)
            if d < 0:
                g_i -= d * g_j / (g_j.norm() ** 2)
    return torch.stack(pc).sum(dim=0)


class PublicPCGrad:
    """The PyTorch PCGrad port's pc_backward: flatten with torch.cat, project, unflatten."""

    def __init__(self, params, lr=0.01):
        self.params = list(params)
        self.base = torch.optim.SGD(self.params, lr=lr, momentum=0.9)

    @torch.no_grad()
    def backward_and_step(self, task_grads):
        merged = public_pc_project([torch.cat([g.flatten() for g in tg]) for tg in task_grads])
        idx = 0
        for p in self.params:
            n = p.numel()
            p.grad = merged[idx:idx + n].view_as(p).clone()
            idx += n
        self.base.step()
        for p in self.params:
            p.grad = None


# ------------------------------------------------------------------------------ variants

def variants(m, backend="auto"):
    """{name: step function} — one whole optimizer step each, forward/backward excluded."""
    out = {}
    base = torch.optim.SGD(m.params, lr=0.01, momentum=0.9, foreach=True)

    def base_step():  # the base optimizer alone: its time and memory are in every variant below
        m.backward(0)
        base.step()
        base.zero_grad()
    out["base|sgd"] = (m.refill, base_step)
    sam_pub = PublicSAM(m.params)
    out["sam|public"] = (m.refill, lambda: (m.backward(0), sam_pub.first_step(), m.backward(1), sam_pub.second_step()))
    for strategy in ("copy", "swap"):
        opt = SAM(m.params, torch.optim.SGD, lr=0.01, momentum=0.9, rho=RHO, strategy=strategy, backend=backend)

        def sam_step(opt=opt):
            m.backward(0)
            opt.first_step(zero_grad=True)
            m.backward(1)
            opt.second_step(zero_grad=True)
        out[f"sam|{strategy}"] = (m.refill, sam_step)

    roga_pub = PublicRoGA(m.params)

    def roga_public():
        for d in range(K_ROGA):
            m.backward(2 * d)
            roga_pub.perturb()
            m.backward(2 * d + 1)
            roga_pub.accumulate()
        roga_pub.step(K_ROGA)
    out["roga|public"] = (m.refill, roga_public)
    for strategy in ("copy", "swap"):
        opt = RoGA(m.params, torch.optim.SGD, lr=0.01, momentum=0.9, rho=RHO, alpha=ALPHA, strategy=strategy,
                   num_domains=K_ROGA, backend=backend)

        def roga_step(opt=opt):
            opt.zero_grad()
            for d in range(K_ROGA):
                m.backward(2 * d)
                opt.perturb()
                m.backward(2 * d + 1)
                opt.accumulate()
            opt.step()
        out[f"roga|{strategy}"] = (m.refill, roga_step)
    opt = RoGA(m.params, torch.optim.SGD, lr=0.01, momentum=0.9, rho=RHO, alpha=ALPHA, num_domains=K_ROGA,
               capturable=True, backend=backend)

    def roga_static_step(opt=opt):  # the backward passes copy into the kept .grad tensors
        opt.zero_grad(set_to_none=False)
        for d in range(K_ROGA):
            torch._foreach_copy_(grads, m.pool[2 * d])
            opt.perturb()
            torch._foreach_copy_(grads, m.pool[2 * d + 1])
            opt.accumulate()
        opt.step()
    grads = [torch.zeros_like(p) for p in m.params]
    out["roga|capturable"] = (lambda: (m.refill(), [setattr(p, "grad", g) for p, g in zip(m.params, grads)]),
                              roga_static_step)

    pc_pub = PublicPCGrad(m.params)
    out["pcgrad|public"] = (m.refill, lambda: pc_pub.backward_and_step([m.pool[0], m.task2]))
    pc = PCGrad(m.params, torch.optim.SGD, lr=0.01, momentum=0.9, backend=backend)

    def pcgrad_step():
        # what PCGrad.backward does after autograd: stash, gram, coefficients, combine
        pc._t.stash = [list(m.pool[0]), list(m.task2)]  # per task, aligned with the parameters
        pc._t.inv_scale = None
        pc._t.stash_complete = True
        pc.align()
        pc.step()
        pc.zero_grad()
    out["pcgrad|ours"] = (m.refill, pcgrad_step)
    return out


# Bytes per float32 parameter each fused step moves (SGD with momentum as the base; each
# input read once, each output written once; docs/math.md "Bytes per step"):
#   SAM copy: norm 4 + perturb_ 16 + sgd_ from the backup (read backup, g, buf; write p, buf) 20
#   SAM swap: norm 4 + combine_ into the spare 12 + sgd_ (read p, g, buf; write p, buf) 20
#   RoGA K=3 copy: domain 1 norm 4 + perturb_ 16 + restore_ 8 (the gradient becomes the
#     accumulator); domain 2 4 + 16 + restore_accumulate_ 20; domain 3 4 + 16 + sgd_ from the
#     backup over [acc, h] writing the mean gradient to .grad (read backup, acc, h, buf; write
#     p, buf, grad) 28
#   RoGA K=3 swap: 4 + 12; 4 + 12 + combine_ 12; 4 + 12 + sgd_ (read p, acc, h, buf; write p, buf, grad) 28
#   RoGA K=3 capturable (copy): zero_grad 4; per domain the stand-in backward copies 2 x 8 and
#     perturb_ zeroes .grad 4; domain 1 norm 4 + perturb_ 16 + 4 + restore_ 8 + acc <- h 8 +
#     zero h 4; domain 2 4 + 16 + 4 + restore_accumulate_ 20 + 4; domain 3 4 + 16 + 4 + sgd_ 28
#     writing the mean gradient into .grad itself
BYTES_PER_PARAM = {"sam|copy": 40, "sam|swap": 36, "roga|copy": 28 + 40 + 48, "roga|swap": 16 + 28 + 44,
                   "roga|capturable": 4 + 3 * 16 + 44 + 48 + 52}


def run(device="cpu", list_names=("resnet34", "aasist"), reps=None, backend="auto", log=print):
    device = torch.device(device)
    res = {"machine": machine(device), "lists": {}}
    for name in list_names:
        shapes = L.LISTS[name]()
        m = Model(shapes, device)
        numel = sum(p.numel() for p in m.params)
        r = reps or (10 if numel > 5e6 else 40)
        v = variants(m, backend)
        # the streaming ceiling, interleaved with the steps: a.add_(b, alpha) over as many
        # elements as the model has parameters (12 bytes each)
        sa, sb = torch.randn(numel, device=device), torch.randn(numel, device=device)
        v["stream|axpy"] = lambda: sa.add_(sb, alpha=1e-3)
        t = interleaved(v, reps=r, device=device)
        rows = {k: median(x) for k, x in t.items()}
        stream = 12 * numel / rows.pop("stream|axpy")
        bw = {k: BYTES_PER_PARAM[k] * numel / rows[k] / stream for k in BYTES_PER_PARAM}
        res["lists"][name] = {"tensors": len(shapes), "numel": numel, "reps": r, "median_s": rows,
                              "stream_gbs": stream / 1e9, "fraction_of_stream": bw}
        del sa, sb
        log(format_list(name, res["lists"][name]))
        del m
        sync(device)
    return res


def format_list(name, lst):
    rows = lst["median_s"]
    lines = [f"\n### {name}: optimizer step without forward/backward ({lst['tensors']} tensors, "
             f"{lst['numel'] / 1e6:.2f}M params, {lst['reps']} reps)\n",
             "| optimizer | variant | median | speedup vs public |", "|---|---|---:|---:|"]
    for key, m in rows.items():
        opt, var = key.split("|")
        pub = rows.get(f"{opt}|public")
        lines.append(f"| {opt} | {var} | {m * 1e3:.3f} ms | {pub / m:.2f}x |" if pub else
                     f"| {opt} (SGD momentum step alone, in every row) | {var} | {m * 1e3:.3f} ms | |")
    if "fraction_of_stream" in lst:
        lines += [f"\nStreaming ceiling in this run: {lst['stream_gbs']:.1f} GB/s (a.add_(b), 12 B/element)\n",
                  "| step | bytes/param | GB/s | % of stream |", "|---|---:|---:|---:|"]
        for k, f in lst["fraction_of_stream"].items():
            gbs = BYTES_PER_PARAM[k] * lst["numel"] / rows[k] / 1e9
            lines.append(f"| {k.replace('|', ' ')} | {BYTES_PER_PARAM[k]} | {gbs:.1f} | {100 * f:.0f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- memory

def _peak_child(variant, list_name, device, steps):
    """Run in a fresh process: the peak memory above model + gradients for one variant.

    CPU: the resident-set high-water mark after the model and its gradients exist
    (timing.peak_bytes_over), so the peak counts only what the optimizer steps add (its
    buffers, clones, temporaries). CUDA: max_memory_allocated."""
    if not device.startswith("cuda"):
        rss_follows_use()
    m = Model(L.LISTS[list_name](), device)
    setup, fn = variants(m)[variant]
    setup()

    def run_steps():
        for _ in range(steps):
            setup()
            fn()
    extra = peak_bytes_over(device, run_steps)
    param_bytes = sum(p.numel() * p.element_size() for p in m.params)
    print(json.dumps({"extra_bytes": extra, "param_bytes": param_bytes}))


def memory(device="cpu", list_name="resnet34", steps=3, log=print):
    """Peak extra memory per variant over its first steps, in units of one parameter set (P),
    including the base SGD's momentum buffer (1 P: the "base|sgd" row). Algorithmic minimum
    on top of that: SAM 1 P (backup, or the spare buffer); RoGA 1 P (backup; the accumulator
    is the gradient autograd produced for the first domain); PCGrad 0 beyond the K=2 task
    gradients (the combination is written into one of them)."""
    names = list(variants(Model([(1,)], device)).keys())
    out = {}
    for v in names:
        d = in_child(f"from benchmarks.bench_optim import _peak_child; "
                     f"_peak_child({v!r}, {list_name!r}, {str(device)!r}, {steps})")
        out[v] = d["extra_bytes"] / d["param_bytes"]
        log(f"  {v:16s} peak extra memory {out[v]:.2f} x parameter size")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lists", nargs="+", default=["resnet34", "aasist"], choices=sorted(L.LISTS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--memory", action="store_true", help="also measure peak extra memory (subprocesses)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(a.device, a.lists, a.reps, a.backend)
    if a.memory:
        res["memory_x_params"] = memory(a.device)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
