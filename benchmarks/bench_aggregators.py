"""Gradient aggregators over K linear losses (issue 13): roga_cuda vs torchjd vs pytorch-optimizer.

K linear losses over a parameter list (default: the ResNet-34 list, 21.3M parameters):
``L_k = sum_j s_kj <R_j, theta_j>`` with one shared random tensor ``R_j`` per parameter and
random signs ``s_kj`` (so tasks agree on some tensors and conflict on others). Backward is
cheap — each task gradient is ``s_kj R_j``, one pass — so a step is dominated by what the
aggregator does with the K gradients. Timed per step: backward + aggregation + base
optimizer step (SGD with momentum); the forward pass that builds the graph runs untimed.

Variants, interleaved in one process (medians):

* ``twin``: K backward passes accumulating into ``.grad`` + the base step: no alignment, the
  reference every aligning method is compared with (issue goal: within 1.1x);
* ``sum``: one backward of ``sum_k L_k`` + step (the floor: what one backward costs);
* ``roga|<method>``: ``roga_cuda.optim.PCGrad(method=...)``: ``backward(losses)`` + ``step()``;
  methods the installed optimizer does not accept are listed as skipped, so the script
  picks up new method names as soon as the optimizer accepts them;
* ``roga-fold|<method>`` (``--fold-path``): the same optimizer's ``step(closure)`` with a
  closure returning the K losses: the combination runs inside the base update (one pass
  fewer over the combined gradient);
* ``torchjd-autojac|<method>``: ``torchjd.autojac.backward`` + ``jac_to_grad(aggregator)``;
* ``torchjd-autogram|<method>``: ``autogram.Engine.compute_gramian`` + weighting +
  ``losses.backward(weights)`` (one module per parameter, so the Gramian is exact);
* ``pytorch-optimizer|pcgrad``: ``pytorch_optimizer.PCGrad(..., reduction="sum").pc_backward``.

Peak extra memory (``--memory``, or ``--memory-only`` without the timing): each variant in a
fresh process, the high-water mark of the resident set (CPU, with glibc told to map every
allocation of 64 KiB or more on its own, so that the resident set follows the memory in use)
or ``max_memory_allocated`` (CUDA) over its first steps, above what the process held before the first step (parameters,
``R``, the graph) and less the momentum buffer, in units of one parameter set P. Memory kept
between steps (the kept task-gradient sets) counts. The K task gradients alone are K P.

    python -m benchmarks.bench_aggregators --device cpu --ks 2 4 8 --memory --json out.json
    python -m benchmarks.bench_aggregators --quick      # tiny sizes: checks the machinery only
    python -m benchmarks.bench_aggregators --faults-only --methods pcgrad   # counts, no timing

Page faults (``--faults``, or ``--faults-only`` without the timing): per K a fresh process
runs the variants interleaved as the timing does (``--faults-isolated``: each variant in its
own process), and counts after warm-up the minor page faults (``getrusage`` ``ru_minflt``)
per step — memory the allocator returned to the OS and the step touches again — and the
bytes one step allocates (torch's profiler memory events), in units of one parameter set P.
Counts, not times: run anywhere (``roga-fresh|<method>``: the aggregator with
``persistent_grads=False``, autograd's fresh gradients; ``--faults-only`` also adds
torchjd's and pytorch-optimizer's PCGrad when installed).

Isolated timing (``--isolated ROUNDS``): every variant in its own fresh process, the
processes alternating over ROUNDS rounds, "vs twin" the median of same-round ratios. On the
CPU the variants interleaved in one process see each other's heap (the kept sets, the peers'
page faults): the twin's own median moved between 35 and 78 ms across such runs on 2026-12-01.

    python -m benchmarks.bench_aggregators --ks 2 4 8 --methods pcgrad --only twin roga --isolated 3

Time only on a quiet machine (the report records the load average).
"""
import argparse
import json

import torch

from . import lists as L
from .timing import in_child, interleaved, machine, median, peak_bytes_over, rss_follows_use, sync

METHODS = ("sum", "pcgrad", "gradvac", "mgda", "cagrad", "upgrad", "dualproj", "imtl_g", "aligned_mtl",
           "nash_mtl", "random", "config")
LR, MOMENTUM = 1e-3, 0.9
# --quick: small tensors of several ranks (pytorch-optimizer's PCGrad cannot unflatten 0-d ones)
QUICK_SHAPES = [(3,), (5, 4), (257,), (2, 3, 3, 3), (1,)]


def shapes_of(list_name):
    return QUICK_SHAPES if list_name == "quick" else L.LISTS[list_name]()


class Problem:
    """Parameters, the shared tensors R_j, the sign matrix S (K x tensors), and the losses."""

    def __init__(self, shapes, k, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.k = k
        self.params = [torch.nn.Parameter(t) for t in L.make(shapes, device, seed=seed)]
        self.R = [t * 1e-2 for t in L.make(shapes, device, seed=seed + 1)]
        self.S = (torch.randint(0, 2, (k, len(shapes)), generator=gen) * 2 - 1).to(device, torch.float32)
        self.losses = None

    def forward(self):
        u = torch.stack([(r * p).sum() for r, p in zip(self.R, self.params)])
        self.losses = list((self.S @ u).unbind())
        return self.losses

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)


def _torchjd_aggregator(A, method, k):
    make = {"sum": lambda: A.Sum(), "pcgrad": lambda: A.PCGrad(), "gradvac": lambda: A.GradVac(),
            "mgda": lambda: A.MGDA(), "cagrad": lambda: A.CAGrad(c=0.5), "upgrad": lambda: A.UPGrad(),
            "dualproj": lambda: A.DualProj(), "imtl_g": lambda: A.IMTLG(), "aligned_mtl": lambda: A.AlignedMTL(),
            "nash_mtl": lambda: A.NashMTL(n_tasks=k), "random": lambda: A.Random(), "config": lambda: A.ConFIG()}
    return make[method]()


def _torchjd_weighting(A, method):
    make = {"sum": "SumWeighting", "pcgrad": "PCGradWeighting", "gradvac": "GradVacWeighting", "mgda": "MGDAWeighting",
            "upgrad": "UPGradWeighting", "dualproj": "DualProjWeighting", "imtl_g": "IMTLGWeighting",
            "aligned_mtl": "AlignedMTLWeighting"}
    if method == "cagrad":
        return A.CAGradWeighting(c=0.5)
    return getattr(A, make[method])() if method in make else None


class _Dot(torch.nn.Module):
    """u_j = <R_j, theta_j>: one module per parameter, so autogram sees every parameter."""

    def __init__(self, p):
        super().__init__()
        self.weight = p

    def forward(self, r):
        return (r * self.weight).sum()


def variants(prob, methods, log=print, paths=()):
    """{name: (setup, step)}: setup (untimed) zeroes the gradients and runs the forward."""
    out, skipped = {}, {}
    params = prob.params

    def fresh():
        prob.zero_grad()
        prob.forward()

    twin_opt = _sgd(params)

    def twin():
        for i, loss in enumerate(prob.losses):
            loss.backward(retain_graph=i < prob.k - 1)
        twin_opt.step()
    out["twin"] = (fresh, twin)

    sum_opt = _sgd(params)

    def one_backward():
        torch.stack(prob.losses).sum().backward()
        sum_opt.step()
    out["sum"] = (fresh, one_backward)

    import inspect

    from roga_cuda.optim import PCGrad
    kinds = {"roga": {}}
    if "roga-fresh" in paths and "persistent_grads" in inspect.signature(PCGrad.__init__).parameters:
        kinds["roga-fresh"] = {"persistent_grads": False}
    if "roga-fold" in paths:
        kinds["roga-fold"] = {}
    for m in methods:
        for kind, extra in kinds.items():
            try:
                opt = PCGrad(params, torch.optim.SGD, method=m, lr=LR, momentum=MOMENTUM, foreach=True, seed=0,
                             **extra)
            except (ValueError, TypeError) as e:
                skipped[f"{kind}|{m}"] = f"not accepted by roga_cuda.optim.PCGrad ({e})"
                continue

            def roga_step(opt=opt):
                opt.backward(prob.losses)
                opt.step()

            def roga_fold(opt=opt):  # a closure returning the K losses (here already built)
                opt.step(lambda: prob.losses)
            out[f"{kind}|{m}"] = (fresh, roga_fold if kind == "roga-fold" else roga_step)

    try:
        import torchjd.aggregation as A
        from torchjd.autojac import backward as jd_backward
        from torchjd.autojac import jac_to_grad
    except ImportError as e:
        skipped["torchjd"] = f"not installed ({e})"
        A = None
    if A is not None:
        for m in methods:
            try:
                agg = _torchjd_aggregator(A, m, prob.k)
            except Exception as e:  # optional solver dependencies (cvxpy, quadprog) missing
                skipped[f"torchjd-autojac|{m}"] = f"{type(e).__name__}: {e}"
                continue
            opt = _sgd(params)

            def autojac(agg=agg, opt=opt):
                jd_backward(prob.losses, inputs=params)
                jac_to_grad(params, agg)
                opt.step()
            out[f"torchjd-autojac|{m}"] = (fresh, autojac)
        try:
            from torchjd.autogram import Engine
            dots = [_Dot(p) for p in params]
            engine = Engine(*dots, batch_dim=None)
        except Exception as e:
            skipped["torchjd-autogram"] = f"{type(e).__name__}: {e}"
            engine = None
        if engine is not None:
            def gram_forward():
                prob.zero_grad()
                u = torch.stack([d(r) for d, r in zip(dots, prob.R)])
                prob.losses = prob.S @ u

            for m in methods:
                try:
                    wt = _torchjd_weighting(A, m)
                except Exception as e:
                    skipped[f"torchjd-autogram|{m}"] = f"{type(e).__name__}: {e}"
                    continue
                if wt is None:
                    skipped[f"torchjd-autogram|{m}"] = "no Gramian weighting in torchjd"
                    continue
                opt = _sgd(params)

                def autogram(wt=wt, opt=opt):
                    losses = prob.losses
                    weights = wt(engine.compute_gramian(losses))
                    losses.backward(weights)
                    opt.step()
                out[f"torchjd-autogram|{m}"] = (gram_forward, autogram)

    if "pcgrad" in methods:
        try:
            from pytorch_optimizer import PCGrad as PoPCGrad
            po = PoPCGrad(_sgd(params), reduction="sum")

            def po_step():
                po.pc_backward(prob.losses)
                po.step()
            out["pytorch-optimizer|pcgrad"] = (fresh, po_step)
        except ImportError as e:
            skipped["pytorch-optimizer|pcgrad"] = f"not installed ({e})"
    for name, why in skipped.items():
        log(f"  skipped {name}: {why}")
    return out


def run(device="cpu", list_name="resnet34", ks=(2, 4, 8), methods=METHODS, reps=None, log=print, paths=(),
        only=None):
    device = torch.device(device)
    res = {"machine": machine(device), "list": list_name, "results": {}}
    shapes = shapes_of(list_name)
    for k in ks:
        prob = Problem(shapes, k, device)
        numel = sum(p.numel() for p in prob.params)
        r = reps or (10 if numel > 5e6 else 40)
        log(f"# K = {k}: {len(shapes)} tensors, {numel / 1e6:.2f}M parameters, {r} reps")
        v = variants(prob, methods, log, paths=paths)
        if only:  # e.g. without the peers, whose page faults disturb the heap the others see
            v = {n: x for n, x in v.items() if n.split("|")[0] in only}
        t = interleaved(v, reps=r, warmup=1 if reps == 1 else 3, device=device)
        res["results"][k] = {"reps": r, "median_s": {n: median(v) for n, v in t.items()}}
        log(format_k(k, res["results"][k]))
        del prob
        sync(device)
    return res


def _time_child(variant, list_name, k, device, reps, paths):
    """In a fresh process: the median step time of one variant (after 3 untimed steps)."""
    prob = Problem(shapes_of(list_name), k, torch.device(device))
    methods = [variant.split("|")[1]] if "|" in variant else []
    v = variants(prob, methods, log=lambda *_: None, paths=paths)
    t = interleaved({variant: v[variant]}, reps=reps, warmup=3, device=device)
    print(json.dumps({"median_s": median(t[variant])}))


def _variant_names(methods, paths=(), only=None):
    """The names variants() makes for these methods (those the installed peers accept),
    keeping only the kinds in ``only``."""
    names = list(variants(Problem(QUICK_SHAPES, 2, "cpu"), methods, log=lambda *_: None, paths=paths))
    return [n for n in names if n.split("|")[0] in only] if only else names


def run_isolated(device="cpu", list_name="resnet34", ks=(2, 4, 8), methods=METHODS, reps=None, rounds=3, log=print,
                 paths=(), only=None):
    """As run(), but every variant in its own fresh process, the processes alternating over
    ``rounds`` rounds (the order rotating): no variant sees the heap another one left (the
    kept sets, a peer's page faults). Per variant the median over rounds of its process's
    median, and "vs twin" the median of the same-round ratios."""
    res = {"machine": machine(torch.device(device)), "list": list_name, "isolated_rounds": rounds, "results": {}}
    names = _variant_names(methods, paths, only)
    if "twin" not in names:
        names.insert(0, "twin")
    for k in ks:
        r = reps or 12
        log(f"# K = {k}: {len(names)} variants, each in its own process, {rounds} rounds of {r} reps")
        per_round = []
        for i in range(rounds):
            got = {}
            for v in names[i % len(names):] + names[:i % len(names)]:
                code = (f"from benchmarks.bench_aggregators import _time_child; "
                        f"_time_child({v!r}, {list_name!r}, {k}, {str(device)!r}, {r}, {tuple(paths)!r})")
                try:
                    got[v] = in_child(code)["median_s"]
                except RuntimeError as e:
                    log(f"  K={k} {v}: failed ({e})")
            per_round.append(got)
        done = [n for n in names if all(n in g for g in per_round)]
        res["results"][k] = {
            "reps": r, "rounds": rounds,
            "median_s": {n: median([g[n] for g in per_round]) for n in done},
            "vs_twin": {n: median([g[n] / g["twin"] for g in per_round]) for n in done},
            "per_round_s": per_round}
        log(format_k(k, res["results"][k]))
    return res


def format_k(k, r):
    rows = r["median_s"]
    twin = rows["twin"]
    ratio = r.get("vs_twin") or {n: s / twin for n, s in rows.items()}
    how = f"{r['rounds']} processes x {r['reps']} reps" if "rounds" in r else f"{r['reps']} reps"
    lines = [f"\n### K = {k} ({how})\n", "| variant | median | vs twin | torchjd autojac / this |",
             "|---|---:|---:|---:|"]
    for name, s in rows.items():
        method = name.split("|")[1] if "|" in name else None
        jd = rows.get(f"torchjd-autojac|{method}") if method else None
        lines.append(f"| {name} | {s * 1e3:.2f} ms | {ratio[name]:.2f}x | " + (f"{jd / s:.2f}x |" if jd else " |"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- memory

def _peak_child(variant, list_name, k, device, steps):
    """In a fresh process: peak memory of ``steps`` steps of one variant above what it held
    before its first step (parameters, R, the forward's graph), less the base optimizer's
    momentum buffer (one parameter set, created by the first step in every variant). Memory a
    variant keeps between steps (our kept task-gradient sets) counts: it is taken after the
    baseline."""
    if not device.startswith("cuda"):
        rss_follows_use()
    prob = Problem(shapes_of(list_name), k, device)
    setup, fn = variants(prob, [variant.split("|")[1]] if "|" in variant else [], log=lambda *_: None)[variant]
    setup()

    def run_steps():
        for i in range(steps):
            if i:
                setup()
            fn()
    extra = peak_bytes_over(device, run_steps)
    param_bytes = sum(p.numel() * p.element_size() for p in prob.params)
    print(json.dumps({"extra_bytes": extra - param_bytes, "param_bytes": param_bytes}))


def memory(names, device="cpu", list_name="resnet34", ks=(2, 4, 8), steps=2, log=print):
    """{K: {variant: peak extra memory / P}} (each variant in its own process)."""
    out = {}
    for k in ks:
        out[k] = {}
        for v in names[k]:
            code = (f"from benchmarks.bench_aggregators import _peak_child; "
                    f"_peak_child({v!r}, {list_name!r}, {k}, {str(device)!r}, {steps})")
            try:
                d = in_child(code)
            except RuntimeError as e:
                log(f"  K={k} {v}: failed ({e})")
                continue
            out[k][v] = d["extra_bytes"] / d["param_bytes"]
            log(f"  K={k} {v:34s} peak extra memory {out[k][v]:.2f} P")
    return out


# ------------------------------------------------------------------------------- page faults

def _faults_child(names, list_name, k, warmup, steps):
    """In a fresh process, the variants interleaved as in the timing run (rotating order, so
    each step sees the heap the others left): per variant, minor page faults per step
    (backward + aggregation + base step, then with its zero_grad + forward too) after
    ``warmup`` rounds, and the bytes one step allocates (profiler memory events)."""
    import resource

    def minflt():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    prob = Problem(shapes_of(list_name), k, torch.device("cpu"))
    methods = sorted({n.split("|")[1] for n in names if "|" in n})
    every = variants(prob, methods, log=lambda *_: None, paths=("roga-fresh",))
    run = {n: every[n] for n in names if n in every}
    if "*" in names:  # every variant of these methods
        run = every
    for _ in range(warmup):
        for setup, fn in run.values():
            setup()
            fn()
    step = {n: 0 for n in run}
    cycle = dict(step)
    order = list(run)
    for r in range(steps * len(order)):
        n = order[r % len(order)] if len(order) > 1 else order[0]
        if r and r % len(order) == 0:
            order = order[1:] + order[:1]
        setup, fn = run[n]
        f0 = minflt()
        setup()
        f1 = minflt()
        fn()
        f2 = minflt()
        step[n] += f2 - f1
        cycle[n] += f2 - f0
    out = {}
    param_bytes = sum(p.numel() * p.element_size() for p in prob.params)
    for n, (setup, fn) in run.items():
        setup()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        out[n] = {"faults_step": step[n] / steps, "faults_cycle": cycle[n] / steps, "allocated_bytes": allocated}
    print(json.dumps({"variants": out, "param_bytes": param_bytes, "page_bytes": resource.getpagesize()}))


def faults(names, list_name="resnet34", ks=(2, 4, 8), warmup=3, steps=3, isolated=False, log=print):
    """{K: {variant: {faults_step, faults_cycle, faulted_P, allocated_P}}} on the CPU: the
    variants interleaved in one process per K (as timed), or each in its own (``isolated``)."""
    out = {}
    for k in ks:
        out[k] = {}
        for group in ([[v] for v in names[k]] if isolated else [names[k]]):
            code = (f"from benchmarks.bench_aggregators import _faults_child; "
                    f"_faults_child({group!r}, {list_name!r}, {k}, {warmup}, {steps})")
            try:
                d = in_child(code)
            except RuntimeError as e:
                log(f"  K={k} {group}: failed ({e})")
                continue
            for v, c in d["variants"].items():
                row = {"faults_step": c["faults_step"], "faults_cycle": c["faults_cycle"],
                       "faulted_P": c["faults_step"] * d["page_bytes"] / d["param_bytes"],
                       "allocated_P": c["allocated_bytes"] / d["param_bytes"]}
                out[k][v] = row
                log(f"  K={k} {v:26s} minor faults/step {row['faults_step']:9.0f} ({row['faulted_P']:.2f} P), "
                    f"with zero_grad+forward {row['faults_cycle']:9.0f}; allocated/step {row['allocated_P']:.2f} P")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--list", default="resnet34", choices=sorted(L.LISTS) + ["quick"])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="also measure peak extra memory (one process per variant)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak extra memory (no timing)")
    ap.add_argument("--quick", action="store_true", help="a few small tensors, K=2 and 3, one rep: checks the machinery")
    ap.add_argument("--faults", action="store_true", help="also count page faults and bytes allocated per step "
                    "(CPU, one process per variant)")
    ap.add_argument("--faults-only", action="store_true", help="only the page-fault counts (no timing)")
    ap.add_argument("--faults-isolated", action="store_true", help="count each variant in its own process "
                    "(default: interleaved in one process per K, as timed)")
    ap.add_argument("--fresh-path", action="store_true", help="also time roga-fresh|<method>: the aggregator "
                    "with persistent_grads=False (autograd's fresh gradients every step)")
    ap.add_argument("--fold-path", action="store_true", help="also time roga-fold|<method>: step(closure) with a "
                    "closure returning the K losses, the combination folded into the base update")
    ap.add_argument("--only", nargs="+", default=None, help="time only these kinds (twin, sum, roga, roga-fresh, roga-fold, "
                    "torchjd-autojac, torchjd-autogram, pytorch-optimizer)")
    ap.add_argument("--isolated", type=int, default=None, metavar="ROUNDS", help="time every variant in its own "
                    "process, alternating over ROUNDS rounds (no variant sees the heap another left)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.list, a.ks, a.reps = "quick", [2, 3], 1
    res = _main_results(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


def _paths(a):
    return tuple(kind for kind, on in (("roga-fresh", a.fresh_path), ("roga-fold", a.fold_path)) if on)


def _main_results(a):
    """What main() reports for the parsed arguments (written to --json by main)."""
    if a.memory_only:
        names = {k: _variant_names(a.methods, _paths(a), a.only) for k in a.ks}
        return {"list": a.list, "memory_x_params": memory(names, a.device, a.list, a.ks)}
    if a.faults_only:
        names = {k: ["twin", "sum"] + [f"{kind}|{m}" for m in a.methods for kind in ("roga", "roga-fresh")]
                 if a.faults_isolated else ["*"] + [f"roga|{m}" for m in a.methods] for k in a.ks}
        return {"list": a.list, "faults": faults(names, a.list, a.ks, isolated=a.faults_isolated)}
    if a.isolated:
        res = run_isolated(a.device, a.list, a.ks, a.methods, a.reps, a.isolated, paths=_paths(a), only=a.only)
    else:
        res = run(a.device, a.list, a.ks, a.methods, a.reps, paths=_paths(a), only=a.only)
    if a.faults:
        names = {k: [n for n in r["median_s"] if n.startswith(("twin", "sum", "roga"))] for k, r in res["results"].items()}
        res["faults"] = faults(names, a.list, a.ks, isolated=a.faults_isolated)
    if a.memory:
        names = {k: list(r["median_s"]) for k, r in res["results"].items()}
        res["memory_x_params"] = memory(names, a.device, a.list, a.ks)
    return res


if __name__ == "__main__":
    main()
