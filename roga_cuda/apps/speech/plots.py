"""Speech-specific figure: gradient cosine, conflict flags and conflict rate over training."""
import math

from ..common.plots import _plt, _save


def plot_conflicts(steps, cosines, conflicts, running, epoch_rates, path, title="clean vs augmented gradients"):
    """steps/cosines/conflicts/running: per logged step (cos(g_clean, g_aug), 0/1 flag,
    running conflict rate); epoch_rates: [(epoch, rate)]."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    ax = axes[0]
    pts = [(s, c, f) for s, c, f in zip(steps, cosines, conflicts) if c is not None and not math.isnan(c)]
    if pts:
        s, c, f = zip(*pts)
        col = ["tab:red" if v else "tab:blue" for v in f]
        ax.scatter(s, c, s=4, c=col, alpha=0.6, lw=0)
    rs = [(s, r) for s, r in zip(steps, running) if r is not None and not math.isnan(r)]
    if rs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*rs), color="black", lw=1.2, label="running conflict rate")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("running conflict rate", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="cos(g_clean, g_aug)", title="cosine (red: conflict)")
    ax.grid(alpha=0.3)
    ax = axes[1]
    if epoch_rates:
        e, r = zip(*epoch_rates)
        ax.bar(e, r, color="tab:red", alpha=0.7)
    ax.set(xlabel="epoch", ylabel="conflict rate", title="steps with <g_clean, g_aug> < 0, per epoch",
           ylim=(0, 1))
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
