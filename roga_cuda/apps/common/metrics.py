"""Binary detection metrics, vectorised numpy (no scikit-learn at run time).

Convention everywhere: label 1 is the positive class (for the image app: fake; the
speech app picks its own and says so), a higher score means "more positive", and a
sample is predicted positive when ``score >= threshold``. Inputs are array-likes
(numpy, lists, CPU tensors); results are Python floats or numpy arrays. A metric that
needs both classes returns NaN (it does not raise) when only one class is present.

Ties are handled exactly: every curve has one operating point per *distinct* score.

* :func:`roc_curve` / :func:`det_curve` — operating points (as scikit-learn's with
  ``drop_intermediate=False``).
* :func:`roc_auc` — Mann-Whitney U with average ranks (= the trapezoidal ROC area).
* :func:`eer` — equal error rate: where the piecewise-linear ROC crosses FNR = FPR.
* :func:`average_precision` — scikit-learn's step-wise (non-interpolated) AP.
* :func:`accuracy` — at a fixed threshold.
* :func:`video_auc` — ROC AUC of per-video mean scores.
"""
import math

import numpy as np

__all__ = ["roc_curve", "det_curve", "roc_auc", "eer", "average_precision", "accuracy", "video_auc",
           "binary_metrics"]


def _as_1d(x, name):
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        a = a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _check(labels, scores):
    y = _as_1d(labels, "labels")
    s = _as_1d(scores, "scores").astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0/1 (1 = positive), found {bad.tolist()}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    return y.astype(np.int64), s


def _counts(y, s):
    """Cumulative (fps, tps, thresholds) at each distinct score, thresholds descending."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each tie group
    tps = np.cumsum(y)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1) - tps
    return fps, tps, s[last_of_run]


def roc_curve(labels, scores):
    """``(fpr, tpr, thresholds)``: one point per distinct score, thresholds descending, plus
    a first point ``(0, 0)`` at threshold ``+inf``. NaN rates where a class is absent."""
    y, s = _check(labels, scores)
    fps, tps, thr = _counts(y, s) if y.size else (np.zeros(0), np.zeros(0), np.zeros(0))
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thr = np.r_[np.inf, thr]
    n_pos, n_neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / n_neg if n_neg > 0 else np.full_like(fps, np.nan)
        tpr = tps / n_pos if n_pos > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, thr


def det_curve(labels, scores):
    """``(fpr, fnr, thresholds)`` with thresholds ascending (fpr decreasing): the ROC's
    points reversed, one per distinct score and the last at ``+inf`` (fpr 0, fnr 1)."""
    fpr, tpr, thr = roc_curve(labels, scores)
    return fpr[::-1].copy(), (1.0 - tpr)[::-1].copy(), thr[::-1].copy()


def roc_auc(labels, scores):
    """Area under the ROC curve: P(score of a positive > score of a negative) + 0.5 P(tie)."""
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # average ranks (1-based) of the tie groups, vectorised
    uniq, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(cnt)
    avg_rank = ends - (cnt - 1) / 2.0
    rank_sum = avg_rank[inv][y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def eer(labels, scores):
    """Equal error rate ``(eer, threshold)``.

    The operating points (FPR, FNR) at the distinct thresholds, joined by straight lines
    (the ROC's usual linear interpolation), cross the line FPR = FNR exactly once; the EER
    is the error rate there. ``threshold`` is the score threshold of the operating point
    closest to the crossing. ``(nan, nan)`` when a class is absent.
    """
    fpr, tpr, thr = roc_curve(labels, scores)
    if fpr.size == 0 or np.isnan(fpr[-1]) or np.isnan(tpr[-1]):
        return math.nan, math.nan
    fnr = 1.0 - tpr
    d = fnr - fpr  # 1 at the +inf point, -1 at the last point: decreasing
    i = int(np.flatnonzero(d <= 0)[0])  # first point on or past the crossing (i >= 1)
    if d[i] == 0:
        return float(fpr[i]), float(thr[i])
    t = d[i - 1] / (d[i - 1] - d[i])  # fraction of the segment i-1 -> i
    rate = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    j = i - 1 if t < 0.5 else i
    if not np.isfinite(thr[j]):
        j = i
    return float(rate), float(thr[j])


def average_precision(labels, scores):
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (as
    scikit-learn's ``average_precision_score``); NaN without positives."""
    y, s = _check(labels, scores)
    n_pos = y.sum()
    if n_pos == 0 or n_pos == y.size:
        return math.nan if n_pos == 0 else 1.0
    fps, tps, _ = _counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accuracy(labels, scores, threshold=0.5):
    """Fraction of samples with ``(score >= threshold) == label``; NaN for no samples."""
    y, s = _check(labels, scores)
    if y.size == 0:
        return math.nan
    return float(np.mean((s >= threshold).astype(np.int64) == y))


def video_scores(labels, scores, video_ids):
    """Per-video ``(labels, mean scores, ids)``; a video whose frames disagree on the label
    is an error (it would make video-level metrics meaningless)."""
    y, s = _check(labels, scores)
    v = _as_1d(video_ids, "video_ids")
    if v.shape != y.shape:
        raise ValueError(f"video_ids and labels differ in length: {v.shape[0]} vs {y.shape[0]}")
    uniq, inv = np.unique(v, return_inverse=True)
    counts = np.bincount(inv, minlength=uniq.size)
    mean_s = np.bincount(inv, weights=s, minlength=uniq.size) / counts
    pos = np.bincount(inv, weights=y, minlength=uniq.size)
    mixed = (pos != 0) & (pos != counts)
    if mixed.any():
        raise ValueError(f"{int(mixed.sum())} video(s) have frames with different labels, e.g. {uniq[mixed][0]!r}")
    return (pos > 0).astype(np.int64), mean_s, uniq


def video_auc(labels, scores, video_ids):
    """ROC AUC over videos, each scored by the mean of its frame scores."""
    vy, vs, _ = video_scores(labels, scores, video_ids)
    return roc_auc(vy, vs)


def binary_metrics(labels, scores, video_ids=None, threshold=0.5):
    """The standard report: auc, eer (+ eer_threshold), ap, acc, n_pos, n_neg and, with
    video ids, video_auc and n_videos. Floats (NaN where undefined)."""
    y, s = _check(labels, scores)
    e, t = eer(y, s)
    out = {"auc": roc_auc(y, s), "eer": e, "eer_threshold": t, "ap": average_precision(y, s),
           "acc": accuracy(y, s, threshold), "n_pos": int(y.sum()), "n_neg": int(y.size - y.sum())}
    if video_ids is not None:
        vy, vs, vids = video_scores(y, s, video_ids)
        out["video_auc"] = roc_auc(vy, vs)
        out["n_videos"] = int(vids.size)
    return out
