"""SAM, RoGA and PCGrad on a sharded (FSDP2 ``fully_shard``) vs an unsharded (DDP) model:
2 processes, gloo, CPU.

    python -m benchmarks.bench_fsdp [--quick] [--steps N] [--width W] [--depth D] [--out FILE]

Each process trains an MLP (``depth`` Linear layers of ``width``) on its half of the batch.

* ``fsdp``: every Linear and the root under ``fully_shard``; the optimizer gets DTensors.
* ``ddp``: DistributedDataParallel with the optimizers' DDP policy (SAM: synchronised
  passes; RoGA: every pass under ``no_sync``, one all-reduce of the accumulated gradient per
  step; PCGrad: the K passes under ``no_sync``, one all-reduce per task gradient).

Per step: the optimizer's own time (its calls only, no forward/backward; median over the
steps) and the collectives, counted by wrapping the ``torch.distributed`` functions (DDP's
bucket all-reduces go through them by way of torch's default comm hook), split by where they
are called: in the optimizer, or in the model's forward/backward (FSDP's all-gathers and
reduce-scatters, DDP's buckets). Expected: the optimizer adds SAM 1, RoGA 1 per domain, PCGrad 1 (the Gram
matrix) all-reduces of a few numbers to FSDP's own.

Probes of FSDP2's behaviour with repeated backward passes (what docs/optimizers.md says):

* ``no_sync``: a pass under ``set_requires_gradient_sync(False)`` does no reduce-scatter and
  leaves ``.grad`` unset; FSDP keeps the whole (unsharded) gradient on every rank and adds
  it into the next synchronised pass, so that pass's gradient cannot be read on its own.
* ``pcgrad_keep_gathered``: the K backward passes of one forward with
  ``set_reshard_after_backward(False)`` on all but the last: all-gathers per step.
* ``sam_stale``: with ``set_reshard_after_backward(False)`` the pass after ``first_step``
  would run on the gathered (unperturbed) parameters: how far its gradient is off.

Timing belongs on a quiet machine; ``--quick`` only checks that everything runs.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
K_ROGA = 3
_COLLECTIVES = ("all_reduce", "reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor",
                "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter")


class Counts:
    """Collectives by phase ("optimizer" or "model"), and the optimizer's time."""

    def __init__(self):
        self.phase = "model"
        self.calls = {"optimizer": Counter(), "model": Counter()}
        self.opt_s = 0.0

    def reset(self):
        for c in self.calls.values():
            c.clear()
        self.opt_s = 0.0

    @contextlib.contextmanager
    def optimizer(self):
        self.phase = "optimizer"
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.opt_s += time.perf_counter() - t0
            self.phase = "model"

    def install(self):
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue

            def counted(*a, _fn=fn, _name=name, **k):
                self.calls[self.phase][_name] += 1
                return _fn(*a, **k)
            setattr(dist, name, counted)



COUNTS = Counts()


def mlp(depth, width):
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(width, width if i < depth - 1 else 4), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def batch(step, domain, n, width, rank):
    g = torch.Generator().manual_seed(1000 * step + domain)
    x, y = torch.randn(n * WORLD, width, generator=g), torch.randint(0, 4, (n * WORLD,), generator=g)
    return x[rank::WORLD], y[rank::WORLD]


def wrap(model, mode):
    if mode == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, allreduce_hook)  # buckets through dist.all_reduce: counted
        return ddp
    from torch.distributed.fsdp import fully_shard
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def optimizer(kind, params):
    from roga_cuda import PCGrad, RoGA, SAM
    if kind == "sam":
        return SAM(params, torch.optim.SGD, lr=0.01, momentum=0.9, rho=0.05)
    if kind == "roga":
        return RoGA(params, torch.optim.SGD, lr=0.01, momentum=0.9, rho=0.1, alpha=2e-4, num_domains=K_ROGA)
    return PCGrad(params, torch.optim.SGD, lr=0.01, momentum=0.9)


def train_step(kind, mode, model, opt, s, cfg, rank):
    n, w = cfg["batch"], cfg["width"]
    if kind == "sam":
        x, y = batch(s, 0, n, w, rank)
        F.cross_entropy(model(x), y).backward()
        with COUNTS.optimizer():
            opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        with COUNTS.optimizer():
            opt.second_step(zero_grad=True)
    elif kind == "roga":
        with COUNTS.optimizer():
            opt.zero_grad()
        ctx = opt.no_sync(model) if mode == "ddp" else contextlib.nullcontext()
        with ctx:
            for d in range(K_ROGA):
                x, y = batch(s, d, n, w, rank)
                F.cross_entropy(model(x), y).backward()
                with COUNTS.optimizer():
                    opt.perturb()
                F.cross_entropy(model(x), y).backward()
                with COUNTS.optimizer():
                    opt.accumulate()
        with COUNTS.optimizer():
            opt.step()
    else:
        x, y = batch(s, 0, n, w, rank)
        out = model(x)
        losses = [F.cross_entropy(out, y), F.cross_entropy(out, (y + 1) % 4)]
        # the K backward passes are the model's part: time and count them as such
        t0 = time.perf_counter()
        opt.zero_grad()
        opt.backward(losses, align=False, model=model)  # DDP: no_sync; FSDP: kept gathered between passes
        backward_s = time.perf_counter() - t0
        with COUNTS.optimizer():
            opt.align()
            opt.step()
        return backward_s
    return 0.0


def measure(kind, mode, cfg, rank):
    model = wrap(mlp(cfg["depth"], cfg["width"]), mode)
    opt = optimizer(kind, model.parameters())
    for s in range(cfg["warmup"]):
        train_step(kind, mode, model, opt, s, cfg, rank)
    times, per_step = [], []
    for s in range(cfg["steps"]):
        COUNTS.reset()
        train_step(kind, mode, model, opt, cfg["warmup"] + s, cfg, rank)
        times.append(COUNTS.opt_s)
        per_step.append({ph: dict(c) for ph, c in COUNTS.calls.items()})
    constant = all(p == per_step[0] for p in per_step)
    return {"opt_ms": 1e3 * statistics.median(times), "collectives": per_step[0], "constant": constant}


# ---------------------------------------------------------------- probes of FSDP2

def _grads(params):
    """The whole gradients of the sharded parameters. (Not of model.parameters(): while FSDP
    keeps a module gathered, its attributes are the unsharded parameters.)"""
    return [p.grad.full_tensor() if p.grad is not None else None for p in params]


def _zero(params):
    for p in params:
        p.grad = None


def probe_no_sync(cfg, rank):
    """A pass under set_requires_gradient_sync(False), then a synchronised pass."""
    model = wrap(mlp(cfg["depth"], cfg["width"]), "fsdp")
    params = list(model.parameters())
    x1, y1 = batch(0, 0, cfg["batch"], cfg["width"], rank)
    x2, y2 = batch(0, 1, cfg["batch"], cfg["width"], rank)
    ref = []
    for x, y in ((x1, y1), (x2, y2)):
        F.cross_entropy(model(x), y).backward()
        ref.append(_grads(params))
        _zero(params)
    COUNTS.reset()
    model.set_requires_gradient_sync(False)
    F.cross_entropy(model(x1), y1).backward()
    skipped = dict(COUNTS.calls["model"])
    grad_set = any(p.grad is not None for p in params)
    held = 0
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        for group in (getattr(state, "_fsdp_param_groups", None) or []):
            for fp in group.fsdp_params:
                g = getattr(fp, "unsharded_accumulated_grad", None)  # (FSDP internals: best effort)
                if g is None:
                    g = getattr(getattr(fp, "_unsharded_param", None), "grad", None)
                held += 0 if g is None else g.numel() * g.element_size()
    model.set_requires_gradient_sync(True)
    COUNTS.reset()
    F.cross_entropy(model(x2), y2).backward()
    synced = dict(COUNTS.calls["model"])
    got = _grads(params)
    err_sum = max((a - (b + c)).abs().max().item() for a, b, c in zip(got, ref[0], ref[1]))
    err_own = max((a - c).abs().max().item() for a, c in zip(got, ref[1]))
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in params)
    full_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"collectives_in_skipped_pass": skipped, "grad_set_after_skipped_pass": grad_set,
            "unsharded_grad_bytes_kept": held, "param_shard_bytes": shard_bytes, "param_full_bytes": full_bytes,
            "collectives_in_next_pass": synced, "next_pass_minus_sum_of_both": err_sum,
            "next_pass_minus_its_own": err_own}


def probe_pcgrad_keep_gathered(cfg, rank):
    """All-gathers per step of PCGrad's K passes, resharding after each pass or not."""
    out = {}
    for keep in (False, True):
        model = wrap(mlp(cfg["depth"], cfg["width"]), "fsdp")
        params = list(model.parameters())
        x, y = batch(0, 0, cfg["batch"], cfg["width"], rank)
        COUNTS.reset()
        o = model(x)
        losses = [F.cross_entropy(o, y), F.cross_entropy(o, (y + 1) % 4)]
        grads = []
        for t, loss in enumerate(losses):
            if keep:
                model.set_reshard_after_backward(t == len(losses) - 1)
            loss.backward(retain_graph=t < len(losses) - 1)
            grads.append(_grads(params))
            _zero(params)
        out["keep_gathered" if keep else "default"] = {"collectives": dict(COUNTS.calls["model"]), "grads": grads}
    a, b = out["default"].pop("grads"), out["keep_gathered"].pop("grads")
    out["max_grad_difference"] = max((u - v).abs().max().item() for ga, gb in zip(a, b) for u, v in zip(ga, gb))
    return out


def probe_sam_stale(cfg, rank):
    """SAM's second pass with the parameters left gathered after the first backward."""
    out = {}
    for keep in (False, True):
        model = wrap(mlp(cfg["depth"], cfg["width"]), "fsdp")
        params = list(model.parameters())
        opt = optimizer("sam", params)
        x, y = batch(0, 0, cfg["batch"], cfg["width"], rank)
        model.set_reshard_after_backward(not keep)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        out[keep] = _grads(params)
        opt.abort()
    return {"max_grad_difference": max((a - b).abs().max().item() for a, b in zip(out[False], out[True]))}


def _worker(rank, tmp, cfg):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(cfg["threads"])
    COUNTS.install()
    res = {"runs": {}}
    try:
        for kind in cfg["kinds"]:
            for mode in ("fsdp", "ddp"):
                res["runs"][f"{kind}/{mode}"] = measure(kind, mode, cfg, rank)
        res["no_sync"] = probe_no_sync(cfg, rank)
        res["pcgrad_keep_gathered"] = probe_pcgrad_keep_gathered(cfg, rank)
        res["sam_stale"] = probe_sam_stale(cfg, rank)
    except BaseException:
        import traceback
        res["error"] = traceback.format_exc()
    with open(os.path.join(tmp, f"{rank}.json"), "w") as f:
        json.dump(res, f, default=str)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown at exit (see tests/test_ddp.py)


def run(quick=False, steps=None, width=None, depth=None, threads=1, kinds=("sam", "roga", "pcgrad")):
    cfg = dict(kinds=list(kinds), depth=depth or (3 if quick else 4), width=width or (32 if quick else 1024),
               batch=4 if quick else 32, warmup=1 if quick else 3, steps=steps or (2 if quick else 20),
               threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp, cfg), nprocs=WORLD, join=True)
        results = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"{r}.json")) as f:
                results.append(json.load(f))
    for r, res in enumerate(results):
        if "error" in res:
            raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    return {"config": cfg, "ranks": results}


def _fmt(counter):
    return ", ".join(f"{v} {k}" for k, v in sorted(counter.items())) or "none"


def report(res):
    r0 = res["ranks"][0]
    lines = [f"config: {res['config']}", "",
             "| optimizer / model | optimizer ms/step (rank 0, median) | optimizer's collectives / step | "
             "model's collectives / step |", "|---|---|---|---|"]
    for name, run_ in r0["runs"].items():
        ms = [rk["runs"][name]["opt_ms"] for rk in res["ranks"]]
        lines.append(f"| {name} | {ms[0]:.2f} (rank 1: {ms[1]:.2f}) | {_fmt(run_['collectives']['optimizer'])} | "
                     f"{_fmt(run_['collectives']['model'])} |" + ("" if run_["constant"] else " (varies by step)"))
    ns = r0["no_sync"]
    lines += ["", "FSDP2 set_requires_gradient_sync(False) pass: "
              f"collectives {_fmt(ns['collectives_in_skipped_pass'])}; .grad set afterwards: "
              f"{ns['grad_set_after_skipped_pass']}; unsharded gradient kept: {ns['unsharded_grad_bytes_kept']} B "
              f"(parameters: {ns['param_shard_bytes']} B local shard, {ns['param_full_bytes']} B whole); next "
              f"synchronised pass: {_fmt(ns['collectives_in_next_pass'])}, its gradient minus the sum of both "
              f"passes' {ns['next_pass_minus_sum_of_both']:.2e}, minus its own {ns['next_pass_minus_its_own']:.2e}"]
    pk = r0["pcgrad_keep_gathered"]
    lines += [f"PCGrad's K=2 passes of one forward, resharding after each (default): "
              f"{_fmt(pk['default']['collectives'])}; keeping the parameters gathered until the last: "
              f"{_fmt(pk['keep_gathered']['collectives'])} (gradients differ by {pk['max_grad_difference']:.1e})"]
    lines += [f"SAM's second pass with the parameters kept gathered after the first backward: its gradient is off "
              f"by {r0['sam_stale']['max_grad_difference']:.2e} (0 would mean it saw the perturbation)"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps: checks that everything runs")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    res = run(args.quick, args.steps, args.width, args.depth, args.threads)
    print(report(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
