"""Command-line entry points: ``roga-train`` and ``roga-eval`` (also
``python -m roga_cuda.apps.image [train|eval] ...``).

    roga-train --preset smoke --out runs/smoke
    roga-train --preset demo --compare erm,sam,roga --seeds 0,1,2 --out runs/demo   # ERM/SAM/RoGA table
    roga-train --method roga --lr 0.005 data.source=folder data.root=/data/faces \\
        data.train_domains=[DF,F2F,FS,NT] data.test_domains=[CDF] --out runs/ff
    torchrun --nproc_per_node=2 -m roga_cuda.apps.image --preset smoke --out runs/ddp
    roga-eval runs/smoke/final.pt --out runs/smoke-eval [data.test_domains=[hq] ...]

Positional ``key=value`` arguments override any config key (``a.b=value``); see
``roga_cuda/apps/image/presets/default.yaml`` for the keys.
"""
import json
import math
import os
import sys
import time


from ..common.cli import (RUN_FLAGS, USER_ERRORS, RunSpec, add_run_args, default_jobs, flag_overrides, make_parser,
                          mean_sd, parse_args, parse_seeds, run_all, seed_noise_report)
from ..common.config import ConfigError, load_config, save_config
from ..common.runtime import cleanup_distributed, is_main, print0
from .data import ImageReadError
from .train import METHODS

# errors caused by input (config, files, data): reported in one line, exit code 2
USER_ERRORS = USER_ERRORS + (ImageReadError,)

APP = "image"


def _train_parser():
    p = make_parser("roga-train", "Train an image deepfake detector with ERM, SAM (or a SAM variant) or RoGA.", __doc__)
    add_run_args(p, APP, " | ".join(METHODS))
    p.add_argument("--out", required=True, help="run folder (metrics.json, log.csv, plots, checkpoints, config.yaml)")
    p.add_argument("--optimizer", dest="method_alias", choices=METHODS, help="same as --method (older name)")
    p.add_argument("--base-optimizer", dest="base", choices=["sgd", "adam", "adamw"], help="config: optim.name")
    p.add_argument("--rho", type=float, help="config: optim.rho")
    p.add_argument("--alpha", type=float, help="config: optim.alpha")
    p.add_argument("--arch", choices=["resnet34", "xception", "efficientnet_b4", "meso4"], help="config: model.arch")
    p.add_argument("--pretrained", help="config: model.pretrained (a local weight file)")
    p.add_argument("--steps", type=int, help="config: train.steps")
    p.add_argument("--skip-corrupt", action="store_true", help="config: data.skip_corrupt=true (drop unreadable images)")
    return p


_FLAG_KEYS = {**RUN_FLAGS, "method_alias": "method", "base": "optim.name", "rho": "optim.rho",
              "alpha": "optim.alpha", "arch": "model.arch", "pretrained": "model.pretrained", "steps": "train.steps"}


def _config_from(args, extra=()):
    ov = flag_overrides(args, _FLAG_KEYS)
    if getattr(args, "skip_corrupt", False):
        ov.append("data.skip_corrupt=true")
    return load_config(args.preset, args.config, ov + list(args.set) + list(args.overrides or []) + list(extra),
                       app=APP)


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "  n/a"
    return f"{100 * v:5.2f}" if pct else f"{v:.4f}"


def _cell(vals, pct=False):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "  n/a"
    if len(vals) == 1:
        return _fmt(vals[0], pct)
    k = 100 if pct else 1
    mean, sd = mean_sd(vals)
    mean, sd = mean * k, sd * k
    return f"{mean:.2f}±{sd:.2f}" if pct else f"{mean:.3f}±{sd:.3f}"


def comparison_table(results):
    """Markdown table per method: mean in-domain and held-out AUC / EER (%) / video AUC, the
    AUC of each held-out domain, steps, training and wall seconds. ``results``: {method:
    result} or {method: [result per seed]} (then mean±sd over seeds; seconds are totals)."""
    results = {m: (r if isinstance(r, list) else [r]) for m, r in results.items()}
    methods = list(results)
    first = results[methods[0]][0]
    in_doms, x_doms = list(first["in_domain"]), list(first["cross_domain"])
    head = ["method", "in AUC", "in EER%", "in vAUC", "cross AUC", "cross EER%", "cross vAUC"]
    head += [f"{d} AUC" for d in x_doms] + ["steps", "train s", "wall s"]
    rows = []
    for m in methods:
        rs = results[m]
        si = [r["summary"]["in_domain"] for r in rs]
        sx = [r["summary"]["cross_domain"] for r in rs]
        row = [m, _cell([x["auc_mean"] for x in si]), _cell([x["eer_mean"] for x in si], True),
               _cell([x["video_auc_mean"] for x in si]), _cell([x["auc_mean"] for x in sx]),
               _cell([x["eer_mean"] for x in sx], True), _cell([x["video_auc_mean"] for x in sx])]
        row += [_cell([r["cross_domain"][d]["auc"] for r in rs]) for d in x_doms]
        row += ["/".join(sorted({str(r["steps"]) for r in rs})), f"{sum(r['train_time_s'] for r in rs):.0f}",
                f"{sum(r['wall_time_s'] for r in rs):.0f}"]
        rows.append(row)
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(cells)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows]
    n = len(results[methods[0]])
    notes = ["", "in-domain (test split of the training domains): " + ", ".join(in_doms),
             "held out (never trained on): " + ", ".join(x_doms)]
    if n > 1:
        notes.append(f"mean±sd over {n} training seeds (same data); seconds are totals over the seeds")
    return "\n".join(out + notes)


def train_main(argv=None):
    t0 = time.time()
    try:
        args = parse_args(_train_parser(), argv)
        seeds = parse_seeds(args.seeds)
        if seeds and not args.compare:
            raise ConfigError("--seeds is for --compare (for one run use --seed)")
        if args.compare:
            methods = [m.strip() for m in args.compare.split(",") if m.strip()]
            bad = [m for m in methods if m not in METHODS]
            if bad or not methods or len(set(methods)) != len(methods):
                raise ConfigError(f"--compare takes a list of distinct {', '.join(METHODS)}; got {args.compare!r}")
            if args.method or args.method_alias:
                raise ConfigError("--compare and --method are exclusive")
            if args.resume not in (None, "auto"):
                raise ConfigError("with --compare, --resume takes no value (each method resumes from its own folder)")
            seeds = seeds or [None]
            specs = []
            for seed in seeds:
                for m in methods:
                    cfg = _config_from(args, [f"method={m}"] + ([f"seed={seed}"] if seed is not None else []))
                    out = os.path.join(args.out, m) if len(seeds) == 1 else os.path.join(args.out, m, f"seed{seed}")
                    specs.append(RunSpec(m + (f", seed {seed}" if seed is not None else ""), APP,
                                         "roga_cuda.apps.image.train:train", cfg.to_dict(), out, args.resume,
                                         cost=1.0 if m == "erm" else 2.0))  # SAM-like: two passes a step
            jobs = default_jobs(cfg, len(specs), args.jobs)
            done = run_all(specs, jobs, say=print0, describe=lambda r: (
                f"held-out AUC {r['summary']['cross_domain']['auc_mean']:.3f}, in-domain AUC "
                f"{r['summary']['in_domain']['auc_mean']:.3f} ({r['wall_time_s']:.0f} s)"))
            results = {m: [] for m in methods}
            for r in done:  # in seed order
                results[r["method"]].append(r)
            total = time.time() - t0
            report = comparison_table(results) + "\n\n" + "\n".join(noise_report(results))
            if is_main():
                with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
                    f.write(report + f"\n\ntotal wall time {total:.0f} s\n")
                keep = ("summary", "in_domain", "cross_domain", "steps", "train_time_s", "wall_time_s", "selected")
                with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as f:
                    json.dump({m: [{"seed": sd, **{k: r[k] for k in keep}} for sd, r in zip(seeds, rs)]
                               for m, rs in results.items()}, f, indent=2, default=float)
            print0("\n" + report + f"\n\ntotal wall time {total:.0f} s  (details: {args.out}/<method>/)")
        else:
            from .train import train
            cfg = _config_from(args)
            r = train(cfg, args.out, resume=args.resume)
            print0("\n" + comparison_table({cfg.method: r}))
            print0(f"\nwrote {os.path.join(args.out, 'metrics.json')}; total wall time {time.time() - t0:.0f} s")
    except USER_ERRORS as e:
        print(f"roga-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


def noise_report(results):
    """Seed-noise lines for the held-out (cross-domain) and in-domain mean AUC."""
    lines = []
    for part, name in (("cross_domain", "held-out mean AUC"), ("in_domain", "in-domain mean AUC")):
        per = {m: [r["summary"][part]["auc_mean"] for r in rs] for m, rs in results.items()}
        lines += seed_noise_report(per, name, higher_is_better=True)
        if len(next(iter(results.values()))) < 2:
            break  # the one-seed sentence once is enough
    return lines


def _eval_parser():
    p = make_parser("roga-eval", "Score a trained detector on a dataset.", __doc__)
    p.add_argument("checkpoint", help="final.pt / best.pt / checkpoints/step_<N>.pt of a roga-train run")
    p.add_argument("--out", required=True, help="folder for metrics.json, scores/, roc.png")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split of the training domains to score (held-out domains: always test)")
    p.add_argument("--config", default=None, help="YAML merged over the checkpoint's config (e.g. another dataset)")
    p.add_argument("--device", default=None, help="config: runtime.device")
    p.add_argument("--threads", type=int, default=None, help="config: runtime.threads")
    p.add_argument("--skip-corrupt", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.source=folder data.root=DIR "
                                                "data.test_domains=[X]")
    return p


def evaluate_checkpoint(path, out_dir, overrides=(), config=None, split="test", device=None, skip_corrupt=False,
                        threads=None):
    from ..common.checkpoint import load_checkpoint
    from ..common.runtime import Amp, select_device, set_num_threads
    from ..common.trainer import check_app
    from .data import build_image_data
    from .train import _write_outputs, evaluate_domains, model_from_config, summarize

    ckpt = load_checkpoint(path)
    check_app(ckpt, APP, path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a roga-train checkpoint (needs 'model' and 'config')")
    ov = list(overrides) + (["data.skip_corrupt=true"] if skip_corrupt else []) + \
        ([f"runtime.device={device}"] if device else []) + ([f"runtime.threads={threads}"] if threads is not None else [])
    cfg = load_config(None, [ckpt["config"]] + ([config] if config else []), ov, app=APP)
    set_num_threads(cfg.runtime.threads)
    dev = select_device(cfg.runtime.device)
    model = model_from_config(cfg, dev, pretrained=False)  # in the run's layout: its scores, its rounding
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the model its config describes ({str(e).splitlines()[0]})") \
            from e
    data = build_image_data(cfg)
    amp = Amp(dev, cfg.runtime.amp, cfg.runtime.amp_dtype)
    t0 = time.time()
    in_dom, raw_in = evaluate_domains(model, data.train_domains, split, cfg, dev, amp)
    cross, raw_x = evaluate_domains(model, data.test_domains, "test", cfg, dev, amp)
    result = {"checkpoint": os.path.abspath(path), "method": cfg.method, "model": cfg.model.arch,
              "steps": int(ckpt.get("step", ckpt.get("counters", {}).get("step", -1))), "split": split,
              "in_domain": in_dom, "cross_domain": cross,
              "summary": {"in_domain": summarize(in_dom), "cross_domain": summarize(cross)},
              "wall_time_s": time.time() - t0, "train_time_s": 0.0, "skipped_corrupt": getattr(data, "skipped", 0)}
    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    _write_outputs(out_dir, result, raw_in, raw_x, cfg)
    return result


def eval_main(argv=None):
    try:
        args = _eval_parser().parse_intermixed_args(argv)
        r = evaluate_checkpoint(args.checkpoint, args.out, args.overrides, args.config, args.split, args.device,
                                args.skip_corrupt, args.threads)
    except USER_ERRORS as e:
        print(f"roga-eval: error: {e}", file=sys.stderr)
        return 2
    name = f"{r['method']} @ step {r['steps']}"
    print(comparison_table({name: r}))
    print(f"\nwrote {os.path.join(args.out, 'metrics.json')}")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return train_main(argv)
