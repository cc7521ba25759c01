"""Markdown report and PNG plots from a benchmark results dict (see benchmarks/__main__.py)."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import bench_e2e, bench_ops, bench_optim  # noqa: E402

PRIMITIVES = ("norm", "perturb_", "restore_", "restore_accumulate_", "gram2", "combine2", "roga_cycle", "pcgrad_pair")


def markdown(res, command=None):
    m = res["machine"]
    bw = res["bandwidth"]
    lines = [f"# roga_cuda benchmark report — {m['device']}", "",
             f"- date: {m['date']}", f"- torch {m['torch']}, Python {m['python']}, threads {m['threads']}",
             f"- CPU: {m['cpu']} ({m['cores']} cores)" + (f"; GPU: {m['gpu']} ({m['sms']} SMs)" if "gpu" in m else ""),
             f"- load average at start: {tuple(round(x, 2) for x in m.get('load_avg', ()))}",
             f"- bandwidth measured in this run: streaming a.add_(b, alpha) {bw['axpy']:.1f} GB/s, copy {bw['copy']:.1f} GB/s"]
    if command:
        lines.append(f"- command: `{command}`")
    lines.append("\nGB/s counts the bytes each op must move (each input read once, each output written once: "
                 "benchmarks/timing.py). Ratios come from interleaved runs in this one process; medians.")
    for name, lst in res.get("ops", {}).items():
        lines.append(bench_ops.format_list(name, lst, bw))
    if "sweep" in res:
        lines.append(res["sweep"]["table"])
    for name, lst in res.get("optim", {}).get("lists", {}).items():
        lines.append(bench_optim.format_list(name, lst))
    if "memory_x_params" in res.get("optim", {}):
        lines.append("\n### Peak extra memory over the first steps (resnet34 list), in parameter-set sizes\n\n"
                     "Includes the base SGD's momentum buffer (the base row); see bench_optim.memory for the minimum.\n")
        lines.append("| optimizer | variant | peak extra memory |\n|---|---|---:|")
        for k, v in res["optim"]["memory_x_params"].items():
            o, var = k.split("|")
            lines.append(f"| {o} | {var} | {v:.2f} x |")
    if "e2e" in res:
        lines.append(bench_e2e.format_result(res["e2e"]))
    return "\n".join(lines) + "\n"


def plots(res, out_dir):
    """Three figures: GB/s vs size with the ceiling, speedup bars, time vs tensor count."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    bw = res["bandwidth"]
    ops_res = res.get("ops", {})
    if ops_res:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for ax, op in zip(axes.flat, ("norm", "perturb_", "restore_accumulate_", "roga_cycle")):
            sizes = sorted(ops_res, key=lambda n: ops_res[n]["numel"])
            backends = sorted({be for n in sizes for be in ops_res[n]["ops"].get(op, {})})
            for be in backends:
                xs = [ops_res[n]["numel"] for n in sizes if be in ops_res[n]["ops"].get(op, {})]
                ys = [ops_res[n]["ops"][op][be]["gbps"] for n in sizes if be in ops_res[n]["ops"].get(op, {})]
                ax.plot(xs, ys, "o-", label=be)
            ceil = [ops_res[n].get("stream_gbps", bw["axpy"]) for n in sizes]
            ax.plot([ops_res[n]["numel"] for n in sizes], ceil, "k--", label="axpy ceiling (same run)")
            if "copy" in bw:
                ax.axhline(bw["copy"], color="k", linestyle=":", label="copy (start of run)")
            ax.set_xscale("log")
            ax.set_title(op)
            ax.set_xlabel("parameters in the list")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"Achieved bandwidth vs list size ({res['machine']['device']})")
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "gbps_vs_size.png"))

        big = max(ops_res, key=lambda n: ops_res[n]["numel"])
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        ax = axes[0]
        prims = [op for op in PRIMITIVES if op in ops_res[big]["ops"]]
        backends = [be for be in ("foreach", "cpu", "cuda", "triton", "loop")
                    if any(be in ops_res[big]["ops"][op] for op in prims)]
        width = 0.8 / max(1, len(backends) - 1)
        bars = [be for be in backends if be != "foreach"]
        for j, be in enumerate(bars):
            vals = [ops_res[big]["ops"][op]["foreach"]["median_s"] / ops_res[big]["ops"][op][be]["median_s"]
                    if be in ops_res[big]["ops"][op] and "foreach" in ops_res[big]["ops"][op] else 0 for op in prims]
            ax.bar([i + j * width for i in range(len(prims))], vals, width, label=be)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(prims))], prims, rotation=30, ha="right")
        ax.set_ylabel("speedup vs foreach")
        ax.set_title(f"primitives, {big} list")
        ax.legend(fontsize=8)
        optim = res.get("optim", {}).get("lists", {})
        ax = axes[1]
        if optim:
            name = max(optim, key=lambda n: optim[n]["numel"])
            rows = optim[name]["median_s"]
            labels, vals = [], []
            for k, v in rows.items():
                o, var = k.split("|")
                if var != "public" and f"{o}|public" in rows:
                    labels.append(f"{o} {var}")
                    vals.append(rows[f"{o}|public"] / v)
            ax.bar(labels, vals, color="tab:green")
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_ylabel("speedup vs public-code approach")
            ax.set_title(f"optimizer step (no fwd/bwd), {name} list")
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "speedup.png"))

    if "sweep" in res:
        sw = res["sweep"]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for be, ys in sw["median_s"].items():
            ax.plot(sw["counts"], [y * 1e3 for y in ys], "o-", label=be)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"tensors (total {sw['total'] / 1e6:.1f}M elements)")
        ax.set_ylabel("RoGA cycle time [ms]")
        ax.set_title("Per-tensor overhead vs bandwidth")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "tensor_count.png"))
    return paths


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
