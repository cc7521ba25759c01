"""Command-line pieces both apps share: the common arguments, one-line user errors, and
the multi-seed comparison statistics ("do the methods differ by more than seed noise?")."""
import argparse
import concurrent.futures
import importlib
import math
import multiprocessing
import os
import sys
import time
from typing import NamedTuple, Optional

import numpy as np

from .checkpoint import CheckpointError
from .config import ConfigError, list_presets

__all__ = ["add_run_args", "parse_args", "parse_seeds", "USER_ERRORS", "paired_interval", "seed_noise_report",
           "mean_sd", "RunSpec", "default_jobs", "run_all"]

# Errors caused by the input (config, files, data, checkpoints): reported in one line, exit status 2.
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, CheckpointError, ImportError, UnicodeDecodeError)


def add_run_args(p, app, method_help):
    """Arguments of ``roga-train`` and ``dpda-train`` alike (same names, same meaning)."""
    p.add_argument("--preset", default=None, help=f"bundled preset: {', '.join(list_presets(app))} (default: default)")
    p.add_argument("--config", default=None, help="a YAML file merged over the preset")
    p.add_argument("--method", default=None, help=f"config: method ({method_help})")
    p.add_argument("--compare", default=None, metavar="LIST",
                   help="train several methods on the same data into OUT/<method>/ and print a comparison table")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="with --compare: repeat for these training seeds (e.g. 0,1,2): mean ± sd per method and "
                        "95%% intervals of the differences (into OUT/<method>/seed<N>/)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="with --compare on CPU: train N runs at once, each in its own process with "
                        "runtime.threads = cores / N (default: one per core; 1 = one after the other in this process)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint file, a folder's latest, or (no value) OUT's latest")
    p.add_argument("--device", default=None, help="config: runtime.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--threads", type=int, default=None, help="config: runtime.threads (0: one per core)")
    p.add_argument("--seed", type=int, default=None, help="config: seed")
    p.add_argument("--lr", type=float, default=None, help="config: optim.lr")
    p.add_argument("--batch-size", type=int, default=None, help="config: train.batch_size")
    p.add_argument("--no-progress", action="store_true", help="config: runtime.progress=false")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides key=value or a.b=value (e.g. optim.lr=0.01), anywhere on the line")


RUN_FLAGS = {"method": "method", "device": "runtime.device", "threads": "runtime.threads", "seed": "seed",
             "lr": "optim.lr", "batch_size": "train.batch_size"}


def flag_overrides(args, flags):
    """key=value strings for the shortcut flags that were given (``flags``: {attr: key})."""
    out = []
    for attr, key in flags.items():
        v = getattr(args, attr, None)
        if v is not None:
            out.append(f"{key}={v}")
    if getattr(args, "no_progress", False):
        out.append("runtime.progress=false")
    return out


def parse_args(parser, argv):
    """Parse with overrides allowed anywhere. ``--resume`` takes an optional path, so an
    override written right after it (``--resume optim.lr=0.1``) would be read as the path:
    such a value, when no file of that name exists, is an override and ``--resume`` means
    OUT's latest checkpoint."""
    args = parser.parse_intermixed_args(argv)
    r = getattr(args, "resume", None)
    if r not in (None, "auto") and "=" in r and not os.path.exists(r):
        args.overrides = [r] + list(args.overrides or [])
        args.resume = "auto"
    return args


def parse_seeds(text):
    if not text:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers like 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs distinct integers like 0,1,2; got {text!r}")
    return seeds


# ------------------------------------------------------------------ runs of a comparison
class RunSpec(NamedTuple):
    """One training run of a comparison: ``train`` ("module:function", called as
    ``function(cfg, out, resume=resume)``) with the resolved ``config`` of ``app`` into ``out``.
    ``cost``: its expected time relative to the others (e.g. backward passes per step), so
    that the longest runs start first and no core idles at the end of a comparison."""
    name: str
    app: str
    train: str
    config: dict
    out: str
    resume: Optional[str] = None
    cost: float = 1.0


def default_jobs(cfg, n_runs, requested=None):
    """How many runs to train at once. Several single-threaded processes use a CPU's cores
    far better than one process with several threads on a shared machine (where torch's
    threads wait for each other whenever another program takes a core); on a GPU, under
    torchrun, or when asked for 1: one run at a time in this process."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--jobs must be >= 1, got {requested}")
        return max(1, min(requested, n_runs))
    if "WORLD_SIZE" in os.environ or n_runs < 2:
        return 1
    dev = str(cfg.runtime.device)
    import torch
    if dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(os.cpu_count() or 1, n_runs))


def _run_in_worker(spec, threads):
    """A comparison run in a worker process: its output goes to OUT/train.log."""
    from .config import load_config
    os.makedirs(spec.out, exist_ok=True)
    with open(os.path.join(spec.out, "train.log"), "a", encoding="utf-8") as f:
        sys.stdout = sys.stderr = f
        overrides = ["runtime.progress=false"] + ([f"runtime.threads={threads}"] if threads else [])
        cfg = load_config(None, [spec.config], overrides, app=spec.app)
        module, func = spec.train.split(":")
        return getattr(importlib.import_module(module), func)(cfg, spec.out, resume=spec.resume)


def launch_order(specs):
    """Indices of ``specs``, the most costly first (ties keep their order): with more runs
    than workers, a long run started last would leave the other cores idle at the end."""
    return sorted(range(len(specs)), key=lambda i: -specs[i].cost)


def run_all(specs, jobs, say=print, describe=None):
    """Train every :class:`RunSpec` with ``jobs`` processes at once (``jobs`` = 1: in this
    process, one after the other). Returns the results in the order of ``specs``; the first
    failure stops the others and is raised. ``describe(result)``: a short summary printed
    when a run ends."""
    if jobs <= 1:
        results = []
        for spec in specs:
            from .config import load_config
            say(f"\n=== {spec.name} ===")
            module, func = spec.train.split(":")
            cfg = load_config(None, [spec.config], app=spec.app)
            results.append(getattr(importlib.import_module(module), func)(cfg, spec.out, resume=spec.resume))
        return results
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    say(f"training {len(specs)} runs, {jobs} at a time in separate processes with {threads} thread(s) each; "
        f"each run's output goes to its folder's train.log")
    results = [None] * len(specs)
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_run_in_worker, specs[i], threads): i for i in launch_order(specs)}
        done = 0
        try:
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                done += 1
                summary = f": {describe(results[i])}" if describe else ""
                say(f"[{done}/{len(specs)} done, {time.time() - t0:.0f} s] {specs[i].name}{summary}")
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return results


# ------------------------------------------------------------------------ seed statistics
# Two-sided 95% quantiles of Student's t with 1..30 degrees of freedom (beyond: normal).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_sd(vals):
    """(mean, sample sd) of the finite values; sd is NaN with fewer than two."""
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def paired_interval(a, b):
    """Mean of ``a[i] - b[i]`` (pairs: the same training seed) and its 95% t-interval;
    (diff, lo, hi), lo = hi = NaN with fewer than two pairs."""
    d = np.asarray([x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)], dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    m = float(d.mean())
    if d.size < 2:
        return m, math.nan, math.nan
    t = _T975[d.size - 2] if d.size - 1 <= len(_T975) else 1.960
    half = t * float(d.std(ddof=1)) / math.sqrt(d.size)
    return m, m - half, m + half


def seed_noise_report(per_method, metric, higher_is_better, fmt="{:+.3f}"):
    """Lines saying, for every pair of methods, whether ``metric`` differs by more than seed
    noise. ``per_method``: {method: [value per seed]}, seeds in the same order for every
    method (run i of each method used training seed i)."""
    methods = list(per_method)
    n = min(len(v) for v in per_method.values()) if methods else 0
    if len(methods) < 2:
        return []
    if n < 2:
        return [f"One training seed: the {metric} differences above cannot be told apart from seed noise (runs "
                "with another seed, or the same seed on another machine, differ too). Run with --seeds 0,1,2 for "
                "mean ± sd over seeds and intervals of the differences."]
    better = "higher" if higher_is_better else "lower"
    lines = [f"{metric} ({better} is better), paired by training seed over {n} seeds: mean difference and its 95% "
             "t-interval"]
    verdicts = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            d, lo, hi = paired_interval(per_method[b], per_method[a])
            exceeds = math.isfinite(lo) and (lo > 0 or hi < 0)
            verdict = "exceeds seed noise" if exceeds else "within seed noise"
            lines.append(f"  {b} - {a}: {fmt.format(d)} [{fmt.format(lo)}, {fmt.format(hi)}]  {verdict}")
            verdicts.append(exceeds)
    if not any(verdicts):
        lines.append(f"All {metric} differences between the methods are within seed noise: this run does not rank "
                     "them.")
    else:
        lines.append("Intervals that exclude 0 exceed seed noise (with few seeds this is a rough check, not a "
                     "significance test over several comparisons).")
    return lines


def make_parser(prog, description, epilog=None):
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
