"""Primitive throughput: every primitive, the RoGA per-domain cycle and the K=2 PCGrad pair,
for every available backend and for the per-parameter Python loops public SAM/PCGrad code
uses, on realistic parameter lists. One process, interleaved repetitions, medians.

    python -m benchmarks.bench_ops --device cpu [--lists resnet34 aasist] [--json out.json]

The foreach backend is timed through its module functions directly (no Python-side input
validation), its best case; the compiled backends through the public API (their checks run
in C++ and are included).
"""
import argparse
import json
import sys

import torch

from roga_cuda import ops
from roga_cuda.ops import foreach as fe
from roga_cuda.optim.weightings import PCGradWeighting

from . import lists as L
from .bench_optim import public_pc_project

_PCGRAD = PCGradWeighting()  # K = 2: the order is fixed
from .timing import interleaved, machine, median, op_bytes, stream_bandwidth, sync

RHO, ALPHA = 0.1, 2e-4


def available_backends(device):
    dev = torch.device(device)
    out = ["foreach"]
    for name in ("cpu", "cuda", "triton"):
        be = ops._registry[name]
        if be.available and (not be.device_types or dev.type in be.device_types):
            out.append(name)
    return out


class State:
    """Parameters, two gradient sets, backup, accumulator and spare buffer for one list."""

    def __init__(self, shapes, device, dtype=torch.float32):
        self.P = L.make(shapes, device, dtype, seed=0)
        self.G = L.make(shapes, device, dtype, seed=1)
        # the second gradient conflicts with the first (cos < 0), so PCGrad projects
        self.H = [(-0.3 * g + 0.5 * h) for g, h in zip(self.G, L.make(shapes, device, dtype, seed=2))]
        self.B = [torch.empty_like(p) for p in self.P]
        self.A = L.make(shapes, device, dtype, seed=3)
        self.S = [torch.empty_like(p) for p in self.P]
        self.numel = sum(p.numel() for p in self.P)


def primitive_variants(st, backend):
    """{op: callable} for one backend (values stay bounded over repetitions)."""
    if backend == "foreach":
        def call(name, *a):
            return getattr(fe, name)(*a)
        norm = lambda ts: fe.norm(ts, False, None, 0.0)[0]  # noqa: E731
        perturb = lambda p, g, b, s: fe.perturb_(p, g, b, s, False, 0.0)  # noqa: E731
        rest = fe.restore_
        racc = fe.restore_accumulate_
        gram = fe.gram
        comb = fe.combine_
    else:
        norm = lambda ts: ops.norm(ts, backend=backend)  # noqa: E731
        perturb = lambda p, g, b, s: ops.perturb_(p, g, b, s, backend=backend)  # noqa: E731
        rest = lambda p, b: ops.restore_(p, b, backend=backend)  # noqa: E731
        racc = lambda p, b, a, g, w: ops.restore_accumulate_(p, b, a, g, w, backend=backend)  # noqa: E731
        gram = lambda ls: ops.gram(ls, backend=backend)  # noqa: E731
        comb = lambda o, ls, w: ops.combine_(o, ls, w, backend=backend)  # noqa: E731
    P, G, H, B, A, S = st.P, st.G, st.H, st.B, st.A, st.S
    dev = P[0].device
    if backend == "foreach" and dev.type == "cpu":
        norm_to_scale = lambda n: float(RHO / (n + 1e-12) - ALPHA)  # noqa: E731  (CPU: a float is free)
    else:
        norm_to_scale = lambda n: RHO / (n + 1e-12) - ALPHA  # noqa: E731

    def roga_cycle():
        s = norm_to_scale(norm(G))
        perturb(P, G, B, s)
        racc(P, B, A, H, 1.0)  # restore + accumulate the second-pass gradient

    def roga_cycle_swap():
        s = norm_to_scale(norm(G))
        comb(S, [P, G], [1.0, s])  # the perturbed point into the spare buffer (then p.data swaps: free)
        comb(A, [A, H], [1.0, 1.0])

    def pcgrad_pair():
        g2 = gram([G, H])
        w = _PCGRAD(g2).to(g2.device)
        comb(H, [G, H], w * 0.5)  # into H (bounded: the mean of the projected pair)

    return {
        "norm": lambda: norm(G),
        "perturb_": lambda: perturb(P, G, B, 1e-6),
        "restore_": lambda: rest(P, B),
        "restore_accumulate_": lambda: racc(P, B, A, G, 1e-6),
        "gram2": lambda: gram([G, H]),
        "gram3": lambda: gram([G, H, A]),
        "combine2": lambda: comb(A, [A, G], [0.5, 0.5]),
        "roga_cycle": roga_cycle,
        "roga_cycle_swap": roga_cycle_swap,
        "pcgrad_pair": pcgrad_pair,
    }


def loop_variants(st):
    """Per-parameter loops as public code writes them (davda54/sam, PCGrad ports)."""
    P, G, H, A = st.P, st.G, st.H, st.A

    def roga_cycle():
        grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in G]), p=2)
        scale = RHO / (grad_norm + 1e-12) - ALPHA
        old = []
        with torch.no_grad():
            for p, g in zip(P, G):
                old.append(p.data.clone())  # a fresh copy every step
                e_w = g * scale.to(p)
                p.add_(e_w)
            # ... the second backward runs here ...
            for p, o, a, h in zip(P, old, A, H):
                p.data = o  # restore by re-pointing, as davda54 does
                a.add_(h)

    def pcgrad_pair():  # flatten (torch.cat), project, sum, unflatten into .grad
        merged = public_pc_project([torch.cat([g.flatten() for g in G]), torch.cat([h.flatten() for h in H])]) * 0.5
        idx = 0
        for h in H:
            n = h.numel()
            h.copy_(merged[idx:idx + n].view_as(h))
            idx += n

    return {"roga_cycle": roga_cycle, "pcgrad_pair": pcgrad_pair,
            "norm": lambda: torch.norm(torch.stack([g.norm(p=2) for g in G]), p=2)}


def run(device="cpu", list_names=("resnet34", "aasist"), backends=None, reps=None, log=print):
    device = torch.device(device)
    backends = backends or available_backends(device)
    res = {"machine": machine(device), "bandwidth": stream_bandwidth(device), "lists": {}}
    log(f"bandwidth: {res['bandwidth']}")
    # The ceiling again, interleaved with the ops: on a shared host the memory bandwidth
    # drifts between runs, and "% of stream" must compare like with like.
    n_axpy = 2**20 if list_names == ["tiny"] else (64 if device.type == "cpu" else 256) * 2**20
    xa, xb = torch.randn(n_axpy, device=device), torch.randn(n_axpy, device=device)
    for name in list_names:
        shapes = L.LISTS[name]()
        st = State(shapes, device)
        variants = {("stream", "axpy"): lambda: xa.add_(xb, alpha=1e-3)}
        for be in backends:
            for op, fn in primitive_variants(st, be).items():
                variants[(op, be)] = fn
        for op, fn in loop_variants(st).items():
            variants[(op, "loop")] = fn
        r = reps or (15 if st.numel > 5e6 else 60)
        t = interleaved({f"{op}|{be}": fn for (op, be), fn in variants.items()}, reps=r, device=device)
        rows = {}
        for key, ts in t.items():
            op, be = key.split("|")
            if op == "stream":
                continue
            m = median(ts)
            rows.setdefault(op, {})[be] = {"median_s": m, "gbps": op_bytes(op, st.numel) / m / 1e9}
        stream = 12 * n_axpy / median(t["stream|axpy"]) / 1e9
        res["lists"][name] = {"tensors": len(shapes), "numel": st.numel, "reps": r, "ops": rows,
                              "stream_gbps": stream}
        log(format_list(name, res["lists"][name], res["bandwidth"]))
        del st
        sync(device)
    return res


def tensor_count_sweep(device="cpu", total=2**22, counts=(10, 30, 100, 300, 1000, 3000, 10000), backends=None,
                       reps=None, log=print):
    """Time of the RoGA per-domain cycle vs the number of tensors at a fixed total size:
    where per-tensor / per-launch overhead takes over from bandwidth."""
    device = torch.device(device)
    backends = backends or available_backends(device)
    out = {"total": total, "counts": list(counts), "median_s": {}}
    for n in counts:
        base, rem = divmod(total, n)
        shapes = [(base + (1 if i < rem else 0),) for i in range(n)]
        st = State(shapes, device)
        variants = {be: primitive_variants(st, be)["roga_cycle"] for be in backends}
        variants["loop"] = loop_variants(st)["roga_cycle"]
        t = interleaved(variants, reps=reps or 10, device=device)
        for be, ts in t.items():
            out["median_s"].setdefault(be, []).append(median(ts))
        del st
    lines = [f"\n### RoGA cycle vs number of tensors ({total / 1e6:.1f}M elements in all)\n",
             "| tensors | " + " | ".join(out["median_s"]) + " |", "|---:|" + "---:|" * len(out["median_s"])]
    for i, n in enumerate(counts):
        lines.append(f"| {n} | " + " | ".join(_ms(v[i]) for v in out["median_s"].values()) + " |")
    out["table"] = "\n".join(lines)
    log(out["table"])
    return out


def format_list(name, lst, bw):
    ceiling = lst.get("stream_gbps") or bw["axpy"]
    lines = [f"\n### {name}: {lst['tensors']} tensors, {lst['numel'] / 1e6:.2f}M elements ({lst['reps']} reps; "
             f"streaming ceiling interleaved with these ops: {ceiling:.1f} GB/s)\n",
             "| op | backend | median | GB/s | % of stream | vs loop | vs foreach |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for op, bes in lst["ops"].items():
        loop = bes.get("loop", {}).get("median_s")
        fo = bes.get("foreach", {}).get("median_s")
        for be, v in bes.items():
            m = v["median_s"]
            lines.append(f"| {op} | {be} | {_ms(m)} | {v['gbps']:.1f} | {100 * v['gbps'] / ceiling:.0f}% | "
                         f"{_ratio(loop, m)} | {_ratio(fo, m)} |")
    return "\n".join(lines)


def _ms(s):
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def _ratio(base, m):
    return f"{base / m:.2f}x" if base else "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lists", nargs="+", default=["resnet34", "aasist"], choices=sorted(L.LISTS))
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(a.device, a.lists, a.backends, a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
