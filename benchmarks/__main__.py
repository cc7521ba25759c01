"""Run every benchmark available on this device in one process; write JSON, a markdown
report and PNG plots.

    python -m benchmarks                       # the current device (CUDA if present)
    python -m benchmarks --device cpu --out benchmarks/results/cpu
    python -m benchmarks --quick               # tiny sizes: checks the machinery in seconds

Sections: the machine's bandwidth ceiling; every primitive, the RoGA cycle and the PCGrad
pair per backend on the AASIST, ResNet-34 and ViT-B parameter lists; time vs tensor count;
whole-optimizer overhead vs the public-code approach (+ peak extra memory); end-to-end
training steps on the apps' models. Time only on a quiet machine: the report records the
load average at the start.
"""
import argparse
import json
import os
import shlex
import sys
import time

import torch

from . import bench_e2e, bench_ops, bench_optim, report
from .timing import machine, stream_bandwidth


def run(device, out_dir, quick=False, skip=(), log=print):
    res = {"machine": machine(device), "bandwidth": stream_bandwidth(device, numel=2**20 if quick else None)}
    log(f"# {res['machine']}\nbandwidth: {res['bandwidth']}")
    lists = ["tiny"] if quick else ["aasist", "resnet34", "vit_b"]
    reps = 1 if quick else None
    if "ops" not in skip:
        res["ops"] = {}
        for name in lists:
            r = bench_ops.run(device, [name], reps=reps, log=log)
            res["ops"][name] = r["lists"][name]
    if "sweep" not in skip:
        res["sweep"] = bench_ops.tensor_count_sweep(device, total=2**12 if quick else 2**22,
                                                    counts=(1, 4, 16) if quick else (10, 30, 100, 300, 1000, 3000, 10000),
                                                    reps=reps, log=log)
    if "optim" not in skip:
        res["optim"] = bench_optim.run(device, ["tiny"] if quick else ["aasist", "resnet34"], reps=reps, log=log)
        if not quick and "memory" not in skip:
            res["optim"]["memory_x_params"] = bench_optim.memory(str(device), log=log)
    if "e2e" not in skip:
        sizes = dict(image_batch=2, image_size=32, speech_batch=2, speech_len=4000) if quick else {}
        res["e2e"] = bench_e2e.run(device, reps=reps, log=log, **sizes)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    cmd = "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report.markdown(res, command=cmd))
    res["plots"] = report.plots(res, out_dir)
    log(f"\nwrote {out_dir}/results.json, report.md and {len(res['plots'])} plots")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: checks the machinery")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ops", "sweep", "optim", "memory", "e2e"])
    a = ap.parse_args(argv)
    out = a.out or os.path.join("benchmarks", "results", torch.device(a.device).type)
    t0 = time.time()
    run(torch.device(a.device), out, a.quick, set(a.skip))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
