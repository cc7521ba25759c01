"""PNG plots with matplotlib's Agg backend (no display needed): ROC and DET curves and
training curves from the CSV log."""
import math
import os

import numpy as np

from .metrics import det_curve, roc_auc, roc_curve, eer

__all__ = ["plot_roc", "plot_det", "plot_training_curves"]


def ndtri(p):
    """Inverse of the standard normal CDF (probit), elementwise; stdlib only (no scipy)."""
    from statistics import NormalDist
    inv = np.vectorize(NormalDist().inv_cdf, otypes=[float])
    return inv(np.asarray(p, dtype=float))


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def plot_roc(curves, path, title="ROC"):
    """curves: {name: (labels, scores)}; one line per entry with its AUC in the legend.
    Entries with a single class are listed as 'n/a' and not drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        auc = roc_auc(labels, scores)
        if math.isnan(auc):
            ax.plot([], [], label=f"{name} (n/a: one class)")
            continue
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_det(curves, path, title="DET"):
    """curves: {name: (labels, scores)}; DET curves on normal-deviate axes, EER in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    lo, hi = 1e-3, 0.5
    ticks = [0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95]
    errs = [eer(lab, sc)[0] for lab, sc in curves.values()]
    if any(e > 0.2 for e in errs if not math.isnan(e)):  # weak detectors: show the whole range
        hi = 0.99
    for name, (labels, scores) in curves.items():
        e, _ = eer(labels, scores)
        if math.isnan(e):
            ax.plot([], [], label=f"{name} (n/a: one class)")
            continue
        fpr, fnr, _ = det_curve(labels, scores)
        clip = lambda v: ndtri(np.clip(v, lo / 2, 1 - lo / 2))  # noqa: E731
        ax.plot(clip(fpr), clip(fnr), lw=1.5, label=f"{name} (EER {100 * e:.2f}%)")
    ticks = [t for t in ticks if t <= hi]
    t = ndtri(np.array(ticks))
    ax.set_xticks(t, [f"{100 * v:g}" for v in ticks])
    ax.set_yticks(t, [f"{100 * v:g}" for v in ticks])
    ax.set(xlim=(ndtri(lo), ndtri(hi)), ylim=(ndtri(lo), ndtri(hi)), title=title,
           xlabel="false positive rate (%)", ylabel="false negative rate (%)")
    ax.plot([ndtri(lo), ndtri(hi)], [ndtri(lo), ndtri(hi)], ls="--", c="grey", lw=0.8)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training_curves(columns, path, keys=None, x="step", title="training"):
    """columns: {name: [values or None]} (e.g. ``training.read_log``); one panel per key
    (default: every numeric column except ``x``), skipping missing values."""
    plt = _plt()
    xs = columns.get(x)
    if xs is None:
        raise ValueError(f"training curves: no {x!r} column (have {sorted(columns)})")
    keys = [k for k in (keys or columns) if k != x and k in columns and any(v is not None for v in columns[k])]
    if not keys:
        keys = []
    n = max(1, len(keys))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(a, b) for a, b in zip(xs, columns[k]) if a is not None and b is not None]
        if pts:
            px, py = zip(*pts)
            ax.plot(px, py, marker="." if len(pts) < 40 else None, lw=1.2)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
