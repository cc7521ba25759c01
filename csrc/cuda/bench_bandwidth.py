"""Quick bandwidth check of the CUDA kernels (a GPU smoke benchmark, not the benchmark suite:
benchmarks/ holds the recorded numbers).

    python3 csrc/cuda/bench_bandwidth.py [--sweep] [--json OUT.json]

Measures, in one run: device-to-device copy bandwidth (bytes read + written), then every
primitive on lists of >= 10M elements as achieved GB/s (bytes each step must move: each
input read once, each output written once) and the fraction of the copy bandwidth, the RoGA
per-domain cycle (norm + perturb_ + restore_accumulate_) on the ResNet-34 parameter list
against a per-parameter Python loop and the foreach backend, and launch-bound timings on a
~400-tensor/300k-element list. --sweep repeats the primitives for several chunk sizes.
Timing: CUDA events around R back-to-back calls, median of 7 trials; inputs rotate between
two sets so that consecutive calls do not hit L2 for lists over 50 MB.
"""
import argparse
import datetime
import json
import statistics

import torch

from roga_cuda import ops
from roga_cuda.ops import native

DEV = "cuda"


def timeit(fn, reps=20, trials=7, warmup=3):
    for _ in range(warmup):
        fn(0)
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for r in range(reps):
            fn(r)
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / reps * 1e-3)
    return statistics.median(out)


def graph_time(fn, calls=10):
    """Per-call GPU time with host overhead removed: `calls` calls captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
        fn(1)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(calls):
            fn(r)
    t = timeit(lambda r: g.replay(), reps=3, trials=5, warmup=1) / calls
    del g
    return t


def copy_bandwidth():
    n = 1 << 28  # 1 GiB of float32
    x, y = torch.randn(n, device=DEV), torch.empty(n, device=DEV)
    t = timeit(lambda r: y.copy_(x), reps=10)
    return 2 * n * 4 / t


def resnet34_shapes():
    try:
        import torchvision
        m = torchvision.models.resnet34()
        return [tuple(p.shape) for p in m.parameters()], "torchvision resnet34"
    except Exception:  # noqa: BLE001 - any import/model failure: fall back to a synthetic list
        shapes = [(64, 3, 7, 7)]
        for cin, cout, n in [(64, 64, 3), (64, 128, 4), (128, 256, 6), (256, 512, 3)]:
            for i in range(n):
                shapes += [(cout, cin if i == 0 else cout, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
        shapes += [(1000, 512), (1000,)]
        return shapes, "synthetic resnet34-like"


def make(shapes, dtype=torch.float32, sets=2, k=6):
    """sets x k lists (params, grads, backup, acc, h, out) of fresh random tensors."""
    return [[[torch.randn(s, device=DEV, dtype=dtype) for s in shapes] for _ in range(k)] for _ in range(sets)]


def prim_table(shapes, dtype, backends, bw):
    S = make(shapes, dtype)
    n = sum(torch.Size(s).numel() for s in shapes)
    e = torch.empty((), dtype=dtype).element_size()
    rows = []
    cases = {
        "norm": (lambda s, be: ops.norm(s[1], backend=be), 1),
        "norm_asam": (lambda s, be: ops.norm(s[1], params=s[0], eta=0.01, backend=be), 2),
        "perturb_": (lambda s, be: ops.perturb_(s[0], s[1], s[2], 1e-3, backend=be), 4),
        "restore_": (lambda s, be: ops.restore_(s[0], s[2], backend=be), 2),
        "restore_accumulate_": (lambda s, be: ops.restore_accumulate_(s[0], s[2], s[3], s[4], 0.5, backend=be), 5),
        "gram_k2": (lambda s, be: ops.gram([s[1], s[4]], backend=be), 2),
        "gram_k4": (lambda s, be: ops.gram([s[1], s[4], s[3], s[0]], backend=be), 4),
        "combine_k2": (lambda s, be: ops.combine_(s[5], [s[1], s[4]], [0.5, 0.5], backend=be), 3),
        "combine_k2_alias": (lambda s, be: ops.combine_(s[3], [s[3], s[4]], [1.0, 0.25], backend=be), 3),
    }
    for name, (fn, passes) in cases.items():
        for be in backends:
            t = timeit(lambda r: fn(S[r % 2], be))
            gbs = passes * n * e / t / 1e9
            row = {"op": name, "backend": be, "us": t * 1e6, "GB/s": gbs, "frac_copy": gbs * 1e9 / bw}
            if be == "cuda":  # the kernels alone: host overhead removed by a CUDA graph
                tg = graph_time(lambda r: fn(S[r % 2], be))
                row.update(graph_us=tg * 1e6, graph_frac_copy=passes * n * e / tg / bw)
            rows.append(row)
    del S
    torch.cuda.empty_cache()
    return rows


def roga_cycle(shapes, bw, rho=0.05, alpha=0.01, k=3):
    S = make(shapes, torch.float32, k=5)

    def loop(s):  # what public SAM/RoGA code does: per-parameter ops from Python
        p, g, b, acc, h = s
        gn = torch.norm(torch.stack([x.norm(2) for x in g]), 2)
        sc = rho / (gn + 1e-12) - alpha
        for pi, gi, bi in zip(p, g, b):
            bi.copy_(pi)
            pi.add_(gi * sc)
        for pi, bi, ai, hi in zip(p, b, acc, h):
            pi.copy_(bi)
            ai.add_(hi, alpha=1.0 / k)

    def fused(s, be):
        p, g, b, acc, h = s
        sc = rho / (ops.norm(g, backend=be) + 1e-12) - alpha
        ops.perturb_(p, g, b, sc, backend=be)
        ops.restore_accumulate_(p, b, acc, h, 1.0 / k, backend=be)

    res = {"loop": timeit(lambda r: loop(S[r % 2]), reps=5)}
    for be in ("reference", "foreach", "cuda"):
        if ops.backends()[be]["available"]:
            try:
                res[be] = timeit(lambda r: fused(S[r % 2], be), reps=10)
            except Exception as ex:  # noqa: BLE001 - report, keep going
                res[be] = f"failed: {type(ex).__name__}: {ex}"
    # CUDA-graph replay of the fused cycle: what launch overhead costs
    s = S[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused(s, "cuda")
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fused(s, "cuda")
    res["cuda_graph"] = timeit(lambda r: g.replay(), reps=10)
    n = sum(torch.Size(x).numel() for x in shapes)
    res["bytes_per_cycle"] = 40 * n
    res["cuda_frac_copy"] = 40 * n / res["cuda"] / bw if isinstance(res["cuda"], float) else None
    del S
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    bw = copy_bandwidth()
    report["copy_GBps"] = bw / 1e9
    print(f"{props.name}, {report['date']}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")

    r34, src = resnet34_shapes()
    big = [(4 << 20,)] * 8 + [(3, 5), (1,)]  # 33.5M elements, mostly 16M-byte tensors
    small = [(96, 3, 3, 3) if i % 10 == 0 else ((i * 37) % 1000 + 1,) for i in range(400)]
    lists = {f"resnet34 ({src}, {sum(torch.Size(s).numel() for s in r34) / 1e6:.1f}M, {len(r34)} tensors)": r34,
             "big (33.5M, 10 tensors)": big}
    report["primitives"] = {}
    for name, shapes in lists.items():
        for dtype in (torch.float32, torch.bfloat16):
            rows = prim_table(shapes, dtype, ("cuda", "foreach"), bw)
            report["primitives"][f"{name} {dtype}"] = rows
            print(f"\n{name} {str(dtype)[6:]}:  op | cuda us GB/s frac | graph us frac | foreach us GB/s")
            for a, b in zip(rows[::2], rows[1::2]):
                print(f"  {a['op']:20s} {a['us']:8.1f} {a['GB/s']:6.0f} {a['frac_copy']:5.2f} | "
                      f"{a['graph_us']:7.1f} {a['graph_frac_copy']:5.2f} | {b['us']:8.1f} {b['GB/s']:6.0f}")
    if args.sweep:
        report["sweep"] = {}
        for chunk in (16384, 32768, 65536):
            old = native._C._cuda_launch_limits(chunk, 0, 0)
            try:
                rows = prim_table(r34, torch.float32, ("cuda",), bw) + prim_table(big, torch.bfloat16, ("cuda",), bw)
            finally:
                native._C._cuda_launch_limits(*old)
            report["sweep"][chunk] = rows
            print(f"chunk {chunk:6d}: " + " ".join(f"{r['op'][:8]}={r['graph_frac_copy']:.2f}" for r in rows))
    report["small"] = prim_table(small, torch.float32, ("cuda", "foreach"), bw)
    print("\nsmall (400 tensors, ~290k elements, float32): op | cuda us | cuda graph us | foreach us")
    for a, b in zip(report["small"][::2], report["small"][1::2]):
        print(f"  {a['op']:20s} {a['us']:8.1f} | {a['graph_us']:8.1f} | {b['us']:8.1f}")
    cyc = roga_cycle(r34, bw)
    report["roga_cycle_resnet34"] = cyc
    print("\nRoGA per-domain cycle, ResNet-34 float32 (us): "
          + ", ".join(f"{k}={v * 1e6:.0f}" if isinstance(v, float) and k not in ("cuda_frac_copy",) else f"{k}={v}"
                      for k, v in cyc.items() if k != "bytes_per_cycle"))
    if isinstance(cyc.get("cuda"), float):
        print(f"  cuda vs loop {cyc['loop'] / cyc['cuda']:.1f}x"
              + (f", vs foreach {cyc['foreach'] / cyc['cuda']:.2f}x" if isinstance(cyc.get("foreach"), float) else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
