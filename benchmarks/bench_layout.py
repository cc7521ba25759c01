"""The apps' demo models trained with row-major vs channels-last weights (``runtime.channels_last``).

One training step's compute: forward, loss, backward (the optimizer step is the same in
both layouts and left out), on the demo presets' models and batch sizes, each layout a
fresh model from the same seed, interleaved medians in one process.

    python -m benchmarks.bench_layout [--threads 1] [--reps 20]

The demos train two runs at a time with one thread each, hence the default of one thread.
"""
import argparse
import json

import torch
import torch.nn.functional as F

from .timing import interleaved, machine, median


def _image(batch, size):
    from roga_cuda.apps.image.models import build_model
    model = build_model("meso4", size, dropout=0.2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 2, (batch,), generator=g).float()
    return model, lambda m: F.binary_cross_entropy_with_logits(m(x).reshape(-1), y)


def _speech(batch, samples):
    from roga_cuda.apps.speech.models import build_model
    model = build_model("aasist_ssl_readout", sinc_channels=20, sinc_kernel=128, filts=[8, 16, 16, 32],
                        gat_dims=[32, 16], branches=2, dropout=0.2, front_log=True)  # the demo preset's widths
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, samples, generator=g), torch.randint(0, 2, (batch,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), y)


# (name, builder, arguments): the demo presets' shapes (image: one domain's batch, as RoGA's
# per-domain passes, and the four domains' batch, as ERM's step; speech: a baseline batch, or
# DPDA's forward over both paths of 8 utterances)
CASES = [("meso4 64px batch 16", _image, (16, 64)), ("meso4 64px batch 64", _image, (64, 64)),
         ("aasist_ssl_readout 0.4 s batch 16", _speech, (16, 6400))]


def run(threads=1, reps=20, cases=CASES, log=print):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(threads, reps, cases, log)
    finally:
        torch.set_num_threads(before)


def _run(threads, reps, cases, log):
    res = {"machine": machine("cpu"), "threads": threads, "reps": reps, "cases": {}}
    for name, build, args in cases:
        variants = {}
        for layout in ("row-major", "channels-last"):
            torch.manual_seed(0)
            model, loss = build(*args)
            if layout == "channels-last":
                model.to(memory_format=torch.channels_last)

            def step(model=model, loss=loss):
                model.zero_grad(set_to_none=True)
                loss(model).backward()
            variants[layout] = step
        t = {k: median(v) for k, v in interleaved(variants, reps=reps).items()}
        res["cases"][name] = {**{k: v * 1e3 for k, v in t.items()}, "speedup": t["row-major"] / t["channels-last"]}
        c = res["cases"][name]
        log(f"| {name} | {c['row-major']:.1f} ms | {c['channels-last']:.1f} ms | {c['speedup']:.2f}x |")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    print(f"# {machine('cpu')}, {a.threads} thread(s), {a.reps} interleaved reps, medians\n")
    print("| model, batch | row-major | channels-last | speedup |\n|---|---:|---:|---:|")
    res = run(a.threads, a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
