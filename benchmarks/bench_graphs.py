"""Optimizer steps replayed from CUDA graphs vs eager (issue 12).

The step is the optimizer's own calls, forward/backward excluded: each "backward" copies a
fixed gradient set into the kept ``.grad`` tensors, the same in every variant. Per list
(``aasist``: 400 small tensors, where the host cost is the step; ``resnet34``: memory-bound):

* ``sam|eager`` / ``sam|graph``: ``first_step`` + ``second_step`` (copy strategy), each call
  captured once and replayed (docs/optimizers.md, "CUDA graphs");
* ``roga|default``: RoGA K = 3 as usual (``.grad`` handed over as autograd does);
  ``roga|eager`` / ``roga|graph``: ``RoGA(capturable=True)``, eager or one graph per call
  (2K + 1 graphs), replayed in order;
* ``base|sgd``: torch's SGD (foreach) step alone, for scale.

    python -m benchmarks.bench_graphs [--lists aasist resnet34] [--reps 50]

Without CUDA, ``--dry`` runs every variant with the graphs replaced by direct calls (what
the tests run); its times are not graph times.
"""
import argparse
import json

import torch

from roga_cuda import RoGA, SAM

from . import lists as L
from .bench_optim import K_ROGA, Model
from .timing import interleaved, machine, median

RHO, ALPHA = 1e-3, 1e-4


class Calls:
    """Optimizer calls captured once each (``capture``) or kept as plain calls (dry run).
    Capturing runs every call's Python once, so record one whole step, in order."""

    def __init__(self, capture):
        self.capture = capture
        self.graphs = []  # kept alive: a replayed graph's memory pool lives with it
        self.calls = {}

    def record(self, name, fn):
        if not self.capture:
            self.calls[name] = fn
            return
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        self.graphs.append(g)
        self.calls[name] = g.replay

    def __getitem__(self, name):
        return self.calls[name]


def warm_up(step, device, n=2):
    """Eager steps on a side stream, as torch.cuda.graphs asks before a capture."""
    if device.type != "cuda":
        for _ in range(n):
            step()
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            step()
    torch.cuda.current_stream().wait_stream(s)


def roga_calls(opt, capture):
    """RoGA(capturable=True)'s calls of one step, recorded: ("perturb", d), ("accumulate", d), "step"."""
    calls = Calls(capture)
    for d in range(opt.num_domains):
        calls.record(("perturb", d), opt.perturb)
        calls.record(("accumulate", d), opt.accumulate)
    calls.record("step", opt.step)
    return calls


def variants(m, device, capture):
    out = {}
    static = [torch.zeros_like(p) for p in m.params]

    def use_static():  # (untimed) another variant may have handed .grad other tensors
        m.refill()
        for p, g in zip(m.params, static):
            p.grad = g

    def backward(i):
        torch._foreach_copy_(static, m.pool[i])

    base = torch.optim.SGD(m.params, lr=1e-3, momentum=0.9, foreach=True)

    def base_step():
        backward(0)
        base.step()
    out["base|sgd"] = (use_static, base_step)

    sam = SAM(m.params, torch.optim.SGD, lr=1e-3, momentum=0.9, rho=RHO, strategy="copy")

    def sam_eager():
        backward(0)
        sam.first_step()
        backward(1)
        sam.second_step()
    use_static()
    warm_up(sam_eager, device)
    sam_calls = Calls(capture)
    sam_calls.record("first", sam.first_step)
    sam_calls.record("second", sam.second_step)

    def sam_graph():
        backward(0)
        sam_calls["first"]()
        backward(1)
        sam_calls["second"]()
    out["sam|eager"] = (use_static, sam_eager)
    out["sam|graph"] = (use_static, sam_graph)

    default = RoGA(m.params, torch.optim.SGD, lr=1e-3, momentum=0.9, rho=RHO, alpha=ALPHA, strategy="copy",
                   num_domains=K_ROGA)

    def roga_default():
        default.zero_grad()
        for d in range(K_ROGA):
            m.backward(2 * d)
            default.perturb()
            m.backward(2 * d + 1)
            default.accumulate()
        default.step()
    out["roga|default"] = (m.refill, roga_default)

    roga = RoGA(m.params, torch.optim.SGD, lr=1e-3, momentum=0.9, rho=RHO, alpha=ALPHA, num_domains=K_ROGA,
                capturable=True)

    def roga_step(call):
        roga.zero_grad(set_to_none=False)
        for d in range(K_ROGA):
            backward(2 * d)
            call(("perturb", d))
            backward(2 * d + 1)
            call(("accumulate", d))
        call("step")

    eager = {("perturb", d): roga.perturb for d in range(K_ROGA)}
    eager.update({("accumulate", d): roga.accumulate for d in range(K_ROGA)}, step=roga.step)
    use_static()
    warm_up(lambda: roga_step(lambda name: eager[name]()), device)
    graphs = roga_calls(roga, capture)
    out["roga|eager"] = (use_static, lambda: roga_step(lambda name: eager[name]()))
    out["roga|graph"] = (use_static, lambda: roga_step(lambda name: graphs[name]()))
    return out


def run(device="cuda", list_names=("aasist", "resnet34"), reps=None, dry=False, log=print):
    device = torch.device(device)
    capture = device.type == "cuda" and not dry
    if not capture and not dry:
        raise SystemExit("bench_graphs needs CUDA (or --dry, which times no graphs)")
    res = {"machine": machine(device), "captured": capture, "lists": {}}
    for name in list_names:
        m = Model(L.LISTS[name](), device)
        numel = sum(p.numel() for p in m.params)
        r = reps or (20 if numel > 5e6 else 50)
        t = interleaved(variants(m, device, capture), reps=r, device=device)
        rows = {k: median(x) for k, x in t.items()}
        res["lists"][name] = {"tensors": len(m.params), "numel": numel, "reps": r, "median_s": rows}
        log(format_list(name, res["lists"][name], capture))
        del m
    return res


def format_list(name, lst, capture):
    rows = lst["median_s"]
    lines = [f"\n### {name}: optimizer step, {'CUDA graphs' if capture else 'DRY RUN (no graphs)'} "
             f"({lst['tensors']} tensors, {lst['numel'] / 1e6:.2f}M params, {lst['reps']} reps)\n",
             "| step | median | graph / eager |", "|---|---:|---:|"]
    for key, t in rows.items():
        opt, var = key.split("|")
        ratio = f"{t / rows[f'{opt}|eager']:.2f}x" if var == "graph" else ""
        lines.append(f"| {key} | {t * 1e3:.3f} ms | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lists", nargs="+", default=["aasist", "resnet34"], choices=sorted(L.LISTS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dry", action="store_true", help="no CUDA: direct calls in place of graphs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(a.device, a.lists, a.reps, a.dry)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
