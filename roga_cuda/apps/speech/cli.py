"""Command line: ``dpda-train`` / ``dpda-eval`` (also ``python -m roga_cuda.apps.speech [train|eval]``).

    dpda-train --preset smoke --out runs/speech-smoke
    dpda-train --preset demo --compare baseline,dpda --seeds 0,1,2 --out runs/speech
    dpda-train --method dpda --align gradvac data.source=asvspoof2019 data.root=/data/LA --out runs/la
    dpda-eval runs/speech/dpda-pcgrad/model_avg.pt --out runs/speech/eval     (or --checkpoint PATH)
    dpda-eval --scores runs/la/scores/eval.txt --asv-scores /data/LA/.../ASVspoof2019.LA.asv.eval.gi.trl.scores.txt
"""
import json
import math
import os
import sys
import time

from ..common import ConfigError, list_presets, load_config
from ..common.cli import (RUN_FLAGS, USER_ERRORS, RunSpec, add_run_args, default_jobs, flag_overrides, make_parser,
                          mean_sd, parse_args, parse_seeds, run_all, seed_noise_report)
from ..common.runtime import cleanup_distributed, is_main, print0
from .asvspoof5 import summary as asvspoof5_summary
from .data import AudioReadError
from .models import MODELS

APP = "speech"
USER_ERRORS = USER_ERRORS + (AudioReadError,)  # errors caused by input: one line, exit status 2


def _data_args(p):
    p.add_argument("--data-root", default=None, help="ASVspoof 2019 LA folder (sets data.source=asvspoof2019)")
    p.add_argument("--in-the-wild", default=None, help="In-the-Wild folder (meta.csv + audio) scored as set 'itw'")
    p.add_argument("--asv-scores", default=None, help="ASV score file for min t-DCF of the main test set")


def _common_args(p):
    """dpda-eval's arguments (dpda-train has these and more, see train_parser)."""
    p.add_argument("--preset", default=None, help=f"bundled preset: {', '.join(list_presets(APP))} (default: default)")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="config: runtime.threads")
    _data_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3")


def _overrides(args, extra=()):
    ov = list(extra)
    if getattr(args, "data_root", None):
        ov += ["data.source=asvspoof2019", f"data.root={args.data_root}"]
    if getattr(args, "in_the_wild", None):
        ov.append(f"data.in_the_wild={args.in_the_wild}")
    if getattr(args, "asv_scores", None):
        ov.append(f"data.asv_scores={args.asv_scores}")
    return ov + list(args.set) + list(args.overrides)


def _fmt_pct(v):
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


# ----------------------------------------------------------------------------- training

def train_parser():
    p = make_parser("dpda-train", "Train a speech deepfake countermeasure: baseline (RawBoost data augmentation) "
                    "or DPDA (clean + augmented paths, gradient alignment).", __doc__)
    add_run_args(p, APP, "baseline | dpda")
    p.add_argument("--out", default=None, help="output folder (default: runs/speech/<preset>)")
    p.add_argument("--mode", dest="method_alias", choices=["baseline", "dpda"], default=None,
                   help="same as --method (older name)")
    p.add_argument("--align", choices=["pcgrad", "gradvac", "cagrad", "mgda", "sum"], default=None,
                   help="config: optim.align, the dpda gradient alignment (sum = none)")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="config: model.name: aasist (clovaai/aasist exactly), aasist_l, aasist_ssl_readout, rawnet2")
    p.add_argument("--epochs", type=int, default=None, help="config: train.epochs")
    _data_args(p)
    p.epilog = (p.epilog or "") + ("\n--compare RUNS: e.g. baseline,dpda or baseline,dpda:sum,dpda:pcgrad "
                                   "(dpda:<align>)")
    return p


_FLAG_KEYS = {**RUN_FLAGS, "method_alias": "method", "align": "optim.align", "model": "model.name",
              "epochs": "train.epochs"}


def _parse_runs(text):
    runs = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        mode, _, align = item.partition(":")
        if mode not in ("baseline", "dpda") or (align and mode == "baseline"):
            raise ConfigError(f"--compare: {item!r} is not baseline, dpda or dpda:<align>")
        runs.append((mode, align or None))
    if not runs:
        raise ConfigError("--compare: no runs given")
    return runs


def train_main(argv=None):
    t0 = time.time()
    try:
        args = parse_args(train_parser(), argv)
        seeds = parse_seeds(args.seeds)
        if seeds and not args.compare:
            raise ConfigError("--seeds is for --compare (for one run use --seed)")
        if args.compare and (args.method or args.method_alias):
            raise ConfigError("--compare and --method are exclusive")
        cfg = load_config(args.preset, args.config, _overrides(args, flag_overrides(args, _FLAG_KEYS)), app=APP)
        out = args.out or os.path.join("runs", "speech", args.preset or "default")
        from .train import train, validate
        if args.compare:
            if args.resume not in (None, "auto"):
                raise ConfigError("with --compare, --resume takes no value (each run resumes from its own folder)")
            compare(cfg, _parse_runs(args.compare), out, resume=args.resume, seeds=seeds, jobs=args.jobs)
        else:
            validate(cfg)
            res = train(cfg, out, resume=args.resume)
            print_summary({res["run"]: [res]}, out)
    except USER_ERRORS as e:
        print(f"dpda-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    print0(f"total wall time {time.time() - t0:.0f} s; outputs under {out}")
    return 0


def compare(cfg, runs, out, resume=None, seeds=None, jobs=None):
    """Train each (method, align) x seed on the same data into out/<run>[/seed<N>], ``jobs``
    at once (see :func:`roga_cuda.apps.common.cli.default_jobs`); print and write
    (comparison.json, comparison.md) a table with mean ± sd over seeds and the seed-noise
    verdict. Returns {run: [result per seed]}."""
    import copy

    from .data import build_data
    from .train import run_label, train, validate
    cfgs = []
    for mode, align in runs:
        c = copy.deepcopy(cfg)
        c.method = mode
        if align:
            c.optim.align = align
        validate(c)
        if run_label(c) in [run_label(x) for x in cfgs]:
            raise ConfigError(f"--compare: {run_label(c)} is listed twice")
        cfgs.append(c)
    seeds = seeds or [None]
    specs = []
    for seed in seeds:
        for c in cfgs:
            c = copy.deepcopy(c)
            if seed is not None:
                c.seed = seed
            label = run_label(c)
            folder = os.path.join(out, label) if len(seeds) == 1 else os.path.join(out, label, f"seed{seed}")
            specs.append(RunSpec(label + (f", seed {seed}" if seed is not None else ""), APP,
                                 "roga_cuda.apps.speech.train:train", c.to_dict(), folder, resume,
                                 cost=2.0 if c.method == "dpda" else 1.0))  # DPDA: clean + augmented path
    jobs = default_jobs(cfg, len(specs), jobs)
    t0 = time.time()
    data = build_data(cfg.data, log=print0)  # once; parallel runs read the synthetic corpus from its disk cache
    print0(f"data ready in {time.time() - t0:.0f} s")
    if jobs > 1:
        done = run_all(specs, jobs, say=print0, describe=lambda r: (
            f"{r['main_set']} EER {100 * r['eer']:.2f}%, best dev EER {100 * r['best_dev_eer']:.2f}% "
            f"({r['wall_time_s']:.0f} s)"))
    else:
        done = []
        for spec in specs:
            if len(seeds) > 1:
                print0(f"\n=== {spec.name} ===")
            done.append(train(load_config(None, [spec.config], app=APP), spec.out, data=data, resume=resume))
    results = {run_label(c): [] for c in cfgs}
    for r in done:
        results[r["run"]].append(r)
    print_summary(results, out)
    if is_main():
        from .train import write_json
        write_json(os.path.join(out, "comparison.json"), {"runs": [r for rs in results.values() for r in rs]})
        with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(summary_table(results, markdown=True) + "\n\n" + "\n".join(noise_report(results)) + "\n")
    return results


def noise_report(results):
    per = {label: [r["eer"] for r in rs] for label, rs in results.items()}
    return seed_noise_report(per, f"{next(iter(results.values()))[0]['main_set']} EER", higher_is_better=False,
                             fmt="{:+.2%}")


def _cell(vals, pct=True, digits=3):
    """One value, or mean±sd over seeds."""
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return _fmt_pct(vals[0]).strip() if pct else f"{vals[0]:.{digits}f}"
    m, sd = mean_sd(vals)
    return f"{100 * m:.2f}±{100 * sd:.2f}" if pct else f"{m:.{digits}f}±{sd:.{digits}f}"


def summary_table(results, markdown=False):
    """One row per run; ``results``: {run: [result per seed]} (cells: mean±sd over seeds)."""
    first = next(iter(results.values()))[0]
    main = first["main_set"]
    flat = [r for rs in results.values() for r in rs]
    attacks = sorted({a for r in flat for a in r["per_attack_eer"]})
    others = [s for s in first["sets"] if s != main]
    head = (["run", f"{main} EER%"] + [f"{a}" for a in attacks] + [f"{s} EER%" for s in others]
            + (["min t-DCF"] if any("min_tdcf" in r for r in flat) else [])
            + ["conflict rate", "epochs to best", "best dev EER%", "epochs run", "train s", "wall s"])
    rows = []
    for label, rs in results.items():
        row = [label, _cell([r["eer"] for r in rs])] + [_cell([r["per_attack_eer"].get(a) for r in rs])
                                                          for a in attacks]
        row += [_cell([r["sets"][s]["eer"] for r in rs]) for s in others]
        if "min t-DCF" in head:
            row.append(_cell([r.get("min_tdcf") for r in rs], pct=False, digits=4))
        row += [_cell([r.get("conflict_rate") for r in rs], pct=False),
                "/".join(str(r["epochs_to_best"]) for r in rs), _cell([r["best_dev_eer"] for r in rs]),
                "/".join(sorted({str(r["epochs_run"]) for r in rs})), f"{sum(r['train_time_s'] for r in rs):.0f}",
                f"{sum(r.get('wall_time_s') or 0 for r in rs):.0f}"]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(x.strip() for x in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" if i else f"{{:<{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in rows])


def print_summary(results, out):
    """``results``: {run: [result per seed]}."""
    if not is_main():
        return
    n = len(next(iter(results.values())))
    print0("")
    print0(summary_table(results))
    for label, rs in results.items():
        src = rs[0].get("conflict_rate_source")
        if src:
            print0(f"  {label}: conflict rate {src}")
    seeds = f"; mean±sd over {n} training seeds (same data), seconds are totals" if n > 1 else ""
    print0(f"EER in %, bona fide = positive class; per-attack EERs on the {next(iter(results.values()))[0]['main_set']!r} "
           f"set{seeds}; metrics.json, score files and plots under {out}")
    if len(results) > 1:
        print0("\n".join(noise_report(results)))


# ------------------------------------------------------------------------------ evaluation

def eval_parser():
    p = make_parser("dpda-eval", "Score a trained countermeasure on the test sets, or compute EER / per-attack EER "
                    "/ min t-DCF of an ASVspoof-format score file.")
    _common_args(p)
    p.add_argument("--checkpoint", default=None, help="model_avg.pt, best/epoch_*.pt or checkpoints/step_*.pt "
                   "(or give it as the first positional argument)")
    p.add_argument("--scores", default=None, help="a CM score file 'UTT_ID ATTACK bonafide|spoof SCORE' to evaluate")
    return p


def _checkpoint_config(path):
    """The config stored with a checkpoint (model_avg.pt, step checkpoints) or next to it."""
    from ..common import load_checkpoint
    ck = load_checkpoint(path)
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        return ck["config"]
    for cand in (os.path.join(os.path.dirname(path), "config.yaml"),
                 os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml")):
        if os.path.isfile(cand):
            import yaml
            with open(cand, encoding="utf-8") as f:
                return yaml.safe_load(f)
    return None


def eval_main(argv=None):
    try:
        args = parse_args(eval_parser(), argv)
    except USER_ERRORS as e:
        print(f"dpda-eval: error: {e}", file=sys.stderr)
        return 2
    if args.overrides and "=" not in args.overrides[0]:  # `dpda-eval CKPT ...`, like roga-eval
        if args.checkpoint:
            print(f"dpda-eval: two checkpoints given: {args.checkpoint} and {args.overrides[0]}", file=sys.stderr)
            return 2
        args.checkpoint = args.overrides.pop(0)
    out = args.out
    try:
        if args.scores:
            from .scoring import read_score_file, set_metrics
            ids, atk, lab, sc = read_score_file(args.scores)
            res = set_metrics(lab, sc, atk, args.asv_scores)
            res["scores"] = os.path.abspath(args.scores)
            print(json.dumps(res, indent=2, default=float))
            if out:
                from .train import write_json
                os.makedirs(out, exist_ok=True)
                write_json(os.path.join(out, "metrics.json"), res)
            return 0
        if not args.checkpoint:
            print("dpda-eval: give --checkpoint (a trained model) or --scores (a score file)", file=sys.stderr)
            return 2
        stored = _checkpoint_config(args.checkpoint)
        from ..common.trainer import check_app
        check_app({"config": stored}, APP, args.checkpoint)
        extra = flag_overrides(args, {"device": "runtime.device", "threads": "runtime.threads"})
        cfg = load_config(args.preset, [c for c in (stored, args.config) if c], _overrides(args, extra), app=APP)
        out = out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
        from .train import evaluate_checkpoint
        res = evaluate_checkpoint(cfg, args.checkpoint, out)
    except USER_ERRORS as e:
        print(f"dpda-eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if is_main():
        for name, m in res["sets"].items():
            per = ", ".join(f"{a} {_fmt_pct(v).strip()}" for a, v in m["per_attack_eer"].items())
            tdcf = f", min t-DCF {m['min_tdcf']:.4f}" if "min_tdcf" in m else ""
            print0(f"{name}: EER {_fmt_pct(m['eer']).strip()}%{tdcf}{asvspoof5_summary(m)}  per attack: {per}")
        print0(f"metrics.json and score files under {out}")
    return 0


def main(argv=None):
    """``python -m roga_cuda.apps.speech [train|eval] ...`` (default: train)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):
        cmd, argv = argv[0], argv[1:]
    else:
        cmd = "train"
    return (eval_main if cmd == "eval" else train_main)(argv)
