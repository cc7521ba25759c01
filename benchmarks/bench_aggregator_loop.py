"""A whole training step with K task losses (issue 13): the aggregator's kept vs fresh task
gradients against the no-alignment twin, forward and backward included.

``bench_aggregators`` isolates gradient handling (linear losses, cheap backward); here a real
forward and backward allocate and free activations too, which shapes the CPU heap the task
gradients land in. That decides whether kept sets (``persistent_grads``, the CPU default for
large tensors) or autograd's fresh gradients page-fault less: the question the default rests on.

Model: an MLP trunk of ``--layers`` Linear(width, width) + ReLU (5 x 2048: 21M parameters,
about the ResNet-34 list), K linear heads, cross-entropy per head, batch ``--batch``. Step:
zero_grad + forward + K losses + (``twin``: K backward passes summed into ``.grad`` + SGD step;
``kept`` / ``fresh``: ``PCGrad(persistent_grads=None / False).backward(losses)`` + step). Each
variant runs in its own process, the processes alternating over ``--rounds`` rounds; per
variant the median over rounds of its process's median step, "vs twin" the median of the
same-round ratios, and the minor page faults per step.

    python -m benchmarks.bench_aggregator_loop --ks 2 4 --rounds 3
    python -m benchmarks.bench_aggregator_loop --quick     # tiny sizes: checks the machinery
"""
import argparse
import json
import resource

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import in_child, machine, median

VARIANTS = ("twin", "kept", "fresh")


def _child(variant, k, width, layers, batch, reps):
    """In a fresh process: median step time and page faults per step of one variant."""
    import time

    from roga_cuda.optim import PCGrad

    torch.manual_seed(0)
    trunk = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
    heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))
    params = list(trunk.parameters()) + list(heads.parameters())
    x = torch.randn(batch, width)
    ys = [torch.randint(0, 10, (batch,)) for _ in range(k)]
    if variant == "twin":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    else:
        opt = PCGrad(params, torch.optim.SGD, lr=1e-3, momentum=0.9, foreach=True,
                     persistent_grads=None if variant == "kept" else False)
    times, faults = [], []
    for _ in range(reps + 3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        opt.zero_grad()
        h = trunk(x)
        losses = [F.cross_entropy(head(h), y) for head, y in zip(heads, ys)]
        if variant == "twin":
            for i, loss in enumerate(losses):
                loss.backward(retain_graph=i < k - 1)
        else:
            opt.backward(losses)
        opt.step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    kept = variant != "twin" and "kept" in opt._layout().memo
    print(json.dumps({"median_s": median(times[3:]), "faults": median(faults[3:]), "kept": kept}))


def run(ks=(2, 4), width=2048, layers=5, batch=256, reps=12, rounds=3, log=print):
    res = {"machine": machine("cpu"), "model": {"width": width, "layers": layers, "batch": batch}, "results": {}}
    for k in ks:
        log(f"# K = {k}: {layers} x Linear({width}, {width}), batch {batch}, {rounds} rounds of {reps} steps")
        per_round = []
        for i in range(rounds):
            got = {}
            for v in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
                code = (f"from benchmarks.bench_aggregator_loop import _child; "
                        f"_child({v!r}, {k}, {width}, {layers}, {batch}, {reps})")
                got[v] = in_child(code)
            per_round.append(got)
        r = {"per_round": per_round,
             "median_s": {v: median([g[v]["median_s"] for g in per_round]) for v in VARIANTS},
             "vs_twin": {v: median([g[v]["median_s"] / g["twin"]["median_s"] for g in per_round]) for v in VARIANTS},
             "faults": {v: median([g[v]["faults"] for g in per_round]) for v in VARIANTS},
             "kept_used": per_round[0]["kept"]["kept"]}
        res["results"][k] = r
        log("| variant | median step | vs twin | minor faults / step | per round |\n|---|---:|---:|---:|---|")
        for v in VARIANTS:
            rounds_ms = " / ".join(f"{g[v]['median_s'] * 1e3:.0f}" for g in per_round)
            log(f"| {v} | {r['median_s'][v] * 1e3:.1f} ms | {r['vs_twin'][v]:.2f}x | {r['faults'][v]:.0f} | "
                f"{rounds_ms} ms |")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks the machinery")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.ks, a.width, a.layers, a.batch, a.reps, a.rounds = [2], 64, 2, 8, 1, 1
    res = run(a.ks, a.width, a.layers, a.batch, a.reps, a.rounds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
