"""Command line: ``dpda-train`` / ``dpda-eval`` (also ``python -m roga_cuda.apps.speech [train|eval]``).

    dpda-train --preset smoke --out runs/speech-smoke
    dpda-train --preset demo --compare baseline,dpda --out runs/speech
    dpda-train --mode dpda --align gradvac data.source=asvspoof2019 data.root=/data/LA --out runs/la
    dpda-eval runs/speech/dpda-pcgrad/model_avg.pt --out runs/speech/eval     (or --checkpoint PATH)
    dpda-eval --scores runs/la/scores/eval.txt --asv-scores /data/LA/.../ASVspoof2019.LA.asv.eval.gi.trl.scores.txt
"""
import argparse
import copy
import json
import math
import os
import sys
import time

from ..common import ConfigError, list_presets, load_config
from ..common.runtime import cleanup_distributed, is_main, print0
from .asvspoof5 import summary as asvspoof5_summary
from .models import MODELS

APP = "speech"


def _common_args(p):
    p.add_argument("--preset", default=None, help=f"bundled preset: {', '.join(list_presets(APP))} (default: default)")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--out", default=None, help="output folder (default: runs/speech/<preset>)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-root", default=None, help="ASVspoof 2019 LA folder (sets data.source=asvspoof2019)")
    p.add_argument("--in-the-wild", default=None, help="In-the-Wild folder (meta.csv + audio) scored as set 'itw'")
    p.add_argument("--asv-scores", default=None, help="ASV score file for min t-DCF of the main test set")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3")


def _overrides(args, extra=()):
    ov = list(extra)
    if args.device:
        ov.append(f"runtime.device={args.device}")
    if args.data_root:
        ov += ["data.source=asvspoof2019", f"data.root={args.data_root}"]
    if args.in_the_wild:
        ov.append(f"data.in_the_wild={args.in_the_wild}")
    if args.asv_scores:
        ov.append(f"data.asv_scores={args.asv_scores}")
    if args.no_progress:
        ov.append("runtime.progress=false")
    return ov + list(args.set) + list(args.overrides)


def _fmt_pct(v):
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


# ----------------------------------------------------------------------------- training

def train_parser():
    p = argparse.ArgumentParser(prog="dpda-train", description="Train a speech deepfake countermeasure: baseline "
                                "(RawBoost data augmentation) or DPDA (clean + augmented paths, gradient alignment).")
    _common_args(p)
    p.add_argument("--mode", choices=["baseline", "dpda"], default=None)
    p.add_argument("--align", choices=["pcgrad", "gradvac", "cagrad", "mgda", "sum"], default=None,
                   help="dpda gradient alignment (sum = none)")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="aasist (clovaai/aasist exactly), aasist_l, aasist_ssl_readout, rawnet2")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint file/folder, or (no value) the latest in --out")
    p.add_argument("--compare", default=None, metavar="RUNS",
                   help="train several runs on the same data and print a table, e.g. baseline,dpda or "
                        "baseline,dpda:sum,dpda:pcgrad (dpda:<align>)")
    return p


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
    args = train_parser().parse_args(argv)
    extra = []
    for flag, key in (("mode", "mode"), ("align", "align"), ("model", "model.name"), ("epochs", "train.epochs"),
                      ("batch_size", "train.batch_size"), ("lr", "optim.lr"), ("seed", "seed")):
        v = getattr(args, flag)
        if v is not None:
            extra.append(f"{key}={v}")
    try:
        cfg = load_config(args.preset, args.config, _overrides(args, extra), app=APP)
    except ConfigError as e:
        print(f"dpda-train: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "speech", args.preset or "default")
    from .train import train, validate
    t0 = time.time()
    try:
        if args.compare:
            results = compare(cfg, _parse_runs(args.compare), out, resume=args.resume)
        else:
            validate(cfg)
            res = train(cfg, out, resume=args.resume)
            results = [res]
            print_summary([res], out)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"dpda-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    print0(f"total wall time {time.time() - t0:.0f} s; outputs under {out}")
    return 0


def compare(cfg, runs, out, resume=None):
    """Train each (mode, align) on the same data (built once) into out/<run>; print and
    write (comparison.json, comparison.md) a table."""
    from .data import build_data
    from .train import run_label, train, validate
    cfgs = []
    for mode, align in runs:
        c = copy.deepcopy(cfg)
        c.mode = mode
        if align:
            c.align = align
        validate(c)
        if run_label(c) in [run_label(x) for x in cfgs]:
            raise ConfigError(f"--compare: {run_label(c)} is listed twice")
        cfgs.append(c)
    t0 = time.time()
    data = build_data(cfg.data, log=print0)
    print0(f"data ready in {time.time() - t0:.0f} s")
    results = []
    for c in cfgs:
        label = run_label(c)
        t1 = time.time()
        r = train(c, os.path.join(out, label), data=data, resume=resume)
        r["wall_time_s"] = time.time() - t1
        results.append(r)
    print_summary(results, out)
    if is_main():
        from .train import write_json
        write_json(os.path.join(out, "comparison.json"), {"runs": results})
        with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(summary_table(results, markdown=True) + "\n")
    return results


def summary_table(results, markdown=False):
    main = results[0]["main_set"]
    attacks = sorted({a for r in results for a in r["per_attack_eer"]})
    others = [s for s in results[0]["sets"] if s != main]
    head = (["run", f"{main} EER%"] + [f"{a}" for a in attacks] + [f"{s} EER%" for s in others]
            + (["min t-DCF"] if any("min_tdcf" in r for r in results) else [])
            + ["conflict rate", "epochs to best", "best dev EER%", "epochs run", "train s", "wall s"])
    rows = []
    for r in results:
        row = [r["run"], _fmt_pct(r["eer"])] + [_fmt_pct(r["per_attack_eer"].get(a)) for a in attacks]
        row += [_fmt_pct(r["sets"][s]["eer"]) for s in others]
        if "min t-DCF" in head:
            row.append(f"{r['min_tdcf']:.4f}" if r.get("min_tdcf") is not None else "n/a")
        cr = r.get("conflict_rate")
        row += ["n/a" if cr is None else f"{cr:.3f}", str(r["epochs_to_best"]), _fmt_pct(r["best_dev_eer"]),
                str(r["epochs_run"]), f"{r['train_time_s']:.0f}",
                "n/a" if r.get("wall_time_s") is None else f"{r['wall_time_s']:.0f}"]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(x.strip() for x in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" if i else f"{{:<{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in rows])


def print_summary(results, out):
    if not is_main():
        return
    print0("")
    print0(summary_table(results))
    for r in results:
        src = r.get("conflict_rate_source")
        if src:
            print0(f"  {r['run']}: conflict rate {src}")
    print0(f"EER in %, bona fide = positive class; per-attack EERs on the {results[0]['main_set']!r} set; "
           f"metrics.json, score files and plots under {out}")


# ------------------------------------------------------------------------------ evaluation

def eval_parser():
    p = argparse.ArgumentParser(prog="dpda-eval", description="Score a trained countermeasure on the test sets, "
                                "or compute EER / per-attack EER / min t-DCF of an ASVspoof-format score file.")
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
    args = eval_parser().parse_args(argv)
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
        import tempfile

        import yaml
        tmp = None
        if stored is not None and not args.config:
            fd, tmp = tempfile.mkstemp(suffix=".yaml")
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump(stored, f)
        try:
            cfg = load_config(args.preset, args.config or tmp, _overrides(args), app=APP)
        finally:
            if tmp:
                os.unlink(tmp)
        out = out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
        from .train import evaluate_checkpoint
        res = evaluate_checkpoint(cfg, args.checkpoint, out)
    except (ConfigError, ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
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
