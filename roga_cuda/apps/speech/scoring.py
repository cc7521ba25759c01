"""Speech countermeasure scoring: per-attack EER, the ASVspoof 2019 min t-DCF, score files.

Convention: label 1 = bona fide, a higher score = more bona fide (the EER and ROC/DET
functions of :mod:`roga_cuda.apps.common.metrics` with bona fide as the positive class).

min t-DCF (ASVspoof 2019, Kinnunen et al., Odyssey 2018 — the challenge's official
"legacy" formulation) for a CM threshold s::

    Pmiss_cm(s) = P(bona fide score < s),  Pfa_cm(s) = P(spoof score >= s)
    C1 = Ptar (Cmiss_cm - Cmiss_asv Pmiss_asv) - Pnon Cfa_asv Pfa_asv
    C2 = Cfa_cm Pspoof (1 - Pmiss_spoof_asv)
    t-DCF_norm(s) = (C1 Pmiss_cm(s) + C2 Pfa_cm(s)) / min(C1, C2)

with the ASV error rates at the ASV system's EER threshold (the evaluation package's
operating point, from the organisers' ASV scores of target, non-target and spoof trials;
``Pfa_asv = P(non-target >= t)``, ``Pmiss_asv = P(target < t)``, ``Pmiss_spoof_asv = P(spoof < t)``) and the official cost model
Pspoof = 0.05, Ptar = 0.99 (1 - Pspoof), Pnon = 0.01 (1 - Pspoof), Cmiss_asv = Cmiss_cm = 1,
Cfa_asv = Cfa_cm = 10. The minimum runs over every threshold (every distinct score, plus
"accept all" and "reject all"). ``formulation="revised"`` gives the later TASLP 2020 form
(C0 + C1 Pmiss_cm + C2 Pfa_cm, normalised by C0 + min(C1, C2)).
"""
import math
import os

import numpy as np

from ..common.metrics import eer as _eer, det_curve

LEGACY_COST_MODEL = {"Pspoof": 0.05, "Ptar": (1 - 0.05) * 0.99, "Pnon": (1 - 0.05) * 0.01,
                     "Cmiss_asv": 1.0, "Cfa_asv": 10.0, "Cmiss_cm": 1.0, "Cfa_cm": 10.0}
REVISED_COST_MODEL = {"Pspoof": 0.05, "Ptar": (1 - 0.05) * 0.99, "Pnon": (1 - 0.05) * 0.01,
                      "Cmiss": 1.0, "Cfa": 10.0, "Cfa_spoof": 10.0}


def eer_bona_spoof(bona, spoof):
    """(EER, threshold) with bona fide as the positive class."""
    bona, spoof = np.asarray(bona, np.float64), np.asarray(spoof, np.float64)
    y = np.r_[np.ones(len(bona)), np.zeros(len(spoof))]
    return _eer(y, np.r_[bona, spoof])


def per_attack_eer(labels, scores, attacks):
    """{attack: EER of all bona fide trials vs that attack's spoofs} (attacks of spoofs only)."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    attacks = np.asarray(attacks)
    bona = scores[labels == 1]
    out = {}
    for a in sorted(set(attacks[labels == 0].tolist())):
        out[a] = eer_bona_spoof(bona, scores[(labels == 0) & (attacks == a)])[0]
    return out


def cm_error_curves(bona, spoof):
    """(Pmiss_cm, Pfa_cm, thresholds) over every operating point, thresholds ascending,
    from 'accept all' (Pmiss 0, Pfa 1) to 'reject all' (Pmiss 1, Pfa 0)."""
    bona, spoof = np.asarray(bona, np.float64), np.asarray(spoof, np.float64)
    y = np.r_[np.ones(len(bona)), np.zeros(len(spoof))]
    fpr, fnr, thr = det_curve(y, np.r_[bona, spoof])   # accept (bona fide) when score >= threshold
    return fnr, fpr, thr


def asv_error_rates(tar, non, spoof, threshold):
    """(Pfa_asv, Pmiss_asv, Pmiss_spoof_asv, Pfa_spoof_asv) at an ASV threshold (accept >= threshold)."""
    tar, non, spoof = (np.asarray(a, np.float64) for a in (tar, non, spoof))
    pfa = float(np.mean(non >= threshold))
    pmiss = float(np.mean(tar < threshold))
    pmiss_spoof = float(np.mean(spoof < threshold)) if spoof.size else math.nan
    return pfa, pmiss, pmiss_spoof, 1.0 - pmiss_spoof


def asv_eer_threshold(tar, non):
    """The ASV operating point as the ASVspoof 2019 evaluation package defines it:
    (EER, threshold) at the operating point minimising |Pmiss - Pfa|, where a trial is
    accepted when its score exceeds the threshold and the candidate thresholds are every
    score plus one just below the lowest (ties ordered targets first, as a stable sort
    of [targets, non-targets] gives)."""
    tar, non = np.asarray(tar, np.float64), np.asarray(non, np.float64)
    if tar.size == 0 or non.size == 0:
        raise ValueError("ASV EER needs target and non-target scores")
    s = np.r_[tar, non]
    y = np.r_[np.ones(tar.size), np.zeros(non.size)]
    order = np.argsort(s, kind="mergesort")
    s, y = s[order], y[order]
    pmiss = np.r_[0.0, np.cumsum(y) / tar.size]
    pfa = np.r_[1.0, (non.size - np.cumsum(1 - y)) / non.size]
    thr = np.r_[s[0] - 0.001, s]
    i = int(np.argmin(np.abs(pmiss - pfa)))
    return float((pmiss[i] + pfa[i]) / 2), float(thr[i])


def tdcf_curve(bona_cm, spoof_cm, pfa_asv, pmiss_asv, pmiss_spoof_asv, cost_model=None, formulation="legacy"):
    """(normalised t-DCF per CM threshold, thresholds). Raises on a cost model / ASV rates
    that make the normalisation meaningless (as the official script does)."""
    if formulation not in ("legacy", "revised"):
        raise ValueError(f"t-DCF formulation must be 'legacy' (ASVspoof 2019) or 'revised', got {formulation!r}")
    cm = dict(LEGACY_COST_MODEL if formulation == "legacy" else REVISED_COST_MODEL)
    cm.update(cost_model or {})
    if len(bona_cm) == 0 or len(spoof_cm) == 0:
        raise ValueError("t-DCF needs both bona fide and spoof CM scores")
    pmiss_cm, pfa_cm, thr = cm_error_curves(bona_cm, spoof_cm)
    if formulation == "legacy":
        c1 = cm["Ptar"] * (cm["Cmiss_cm"] - cm["Cmiss_asv"] * pmiss_asv) - cm["Pnon"] * cm["Cfa_asv"] * pfa_asv
        c2 = cm["Cfa_cm"] * cm["Pspoof"] * (1 - pmiss_spoof_asv)
        if c1 < 0 or c2 < 0:
            raise ValueError(f"t-DCF: negative weights C1={c1:.4g}, C2={c2:.4g}; check the ASV error rates/cost model")
        return (c1 * pmiss_cm + c2 * pfa_cm) / min(c1, c2), thr
    pfa_spoof_asv = 1 - pmiss_spoof_asv
    c0 = cm["Ptar"] * cm["Cmiss"] * pmiss_asv + cm["Pnon"] * cm["Cfa"] * pfa_asv
    c1 = cm["Ptar"] * cm["Cmiss"] - c0
    c2 = cm["Pspoof"] * cm["Cfa_spoof"] * pfa_spoof_asv
    if c1 < 0 or c2 < 0:
        raise ValueError(f"t-DCF: negative weights C1={c1:.4g}, C2={c2:.4g}; check the ASV error rates/cost model")
    return (c0 + c1 * pmiss_cm + c2 * pfa_cm) / (c0 + min(c1, c2)), thr


def min_tdcf(bona_cm, spoof_cm, asv_tar, asv_non, asv_spoof, cost_model=None, formulation="legacy"):
    """min t-DCF of CM scores given the ASV scores of target / non-target / spoof trials.
    Returns dict(min_tdcf, threshold, asv_eer, pfa_asv, pmiss_asv, pmiss_spoof_asv)."""
    asv_eer, asv_thr = asv_eer_threshold(asv_tar, asv_non)
    pfa, pmiss, pmiss_spoof, _ = asv_error_rates(asv_tar, asv_non, asv_spoof, asv_thr)
    curve, thr = tdcf_curve(bona_cm, spoof_cm, pfa, pmiss, pmiss_spoof, cost_model, formulation)
    i = int(np.argmin(curve))
    return {"min_tdcf": float(curve[i]), "threshold": float(thr[i]), "asv_eer": float(asv_eer),
            "pfa_asv": pfa, "pmiss_asv": pmiss, "pmiss_spoof_asv": pmiss_spoof}


def read_asv_scores(path):
    """(target, nontarget, spoof) score arrays from an ASV score file: one trial per line, the
    score last and the key ('target' | 'nontarget' | 'spoof') the last key word before it
    (the ASVspoof 2019 files: ``SOURCE KEY SCORE``, e.g. ``A07 spoof -3.2``, or 6-column)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ASV score file not found: {path}")
    out = {"target": [], "nontarget": [], "spoof": []}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            keys = [p for p in parts[:-1] if p in out]
            try:
                score = float(parts[-1])
            except ValueError:
                keys = []
            if not keys:
                raise ValueError(f"{path}:{ln}: expected a key (target/nontarget/spoof) and a final score, "
                                 f"got {line.strip()!r}")
            out[keys[-1]].append(score)  # the key is the last key word before the score
    if not out["target"] or not out["nontarget"]:
        raise ValueError(f"{path}: needs target and nontarget trials (found {len(out['target'])} and "
                         f"{len(out['nontarget'])})")
    return tuple(np.asarray(out[k]) for k in ("target", "nontarget", "spoof"))


def write_score_file(path, utt_ids, attacks, labels, scores):
    """ASVspoof CM score format: ``UTT_ID ATTACK KEY SCORE`` (attack '-' for bona fide)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for u, a, y, s in zip(utt_ids, attacks, labels, scores):
            f.write(f"{u} {a} {'bonafide' if int(y) == 1 else 'spoof'} {float(s):.6f}\n")
    os.replace(tmp, path)
    return path


def read_score_file(path):
    """(utt_ids, attacks, labels, scores) from a CM score file in the format above."""
    ids, atk, lab, sc = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            p = line.split()
            if not p:
                continue
            if len(p) != 4 or p[2] not in ("bonafide", "spoof"):
                raise ValueError(f"{path}:{ln}: expected 'UTT_ID ATTACK bonafide|spoof SCORE', got {line.strip()!r}")
            ids.append(p[0]), atk.append(p[1]), lab.append(1 if p[2] == "bonafide" else 0), sc.append(float(p[3]))
    return ids, atk, np.asarray(lab), np.asarray(sc)


def set_metrics(labels, scores, attacks, asv_scores=None):
    """EER, per-attack EER, AUC, counts and (with an ASV score file) min t-DCF of one test set."""
    from ..common.metrics import roc_auc
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    e, thr = _eer(labels, scores)
    out = {"eer": e, "eer_threshold": thr, "auc": roc_auc(labels, scores),
           "per_attack_eer": per_attack_eer(labels, scores, attacks),
           "n_bonafide": int((labels == 1).sum()), "n_spoof": int((labels == 0).sum())}
    if asv_scores:
        tar, non, spf = read_asv_scores(asv_scores)
        r = min_tdcf(scores[labels == 1], scores[labels == 0], tar, non, spf)
        out["min_tdcf"] = r["min_tdcf"]
        out["tdcf_asv"] = {k: r[k] for k in ("asv_eer", "pfa_asv", "pmiss_asv", "pmiss_spoof_asv")}
        out["asv_scores"] = asv_scores
    return out


def wave_set_metrics(ws, scores, asv_scores=None):
    """:func:`set_metrics` of a WaveSet's scores, plus its challenge's metrics: for ASVspoof 5
    sets minDCF, actDCF and Cllr at the top level and the full Track 1 report (thresholds,
    cost model, per attack and per codec) under ``asvspoof5``."""
    labels = ws.labels.numpy()
    out = set_metrics(labels, scores, ws.attacks, asv_scores)
    if ws.protocol == "asvspoof5":
        from .asvspoof5 import track1_metrics
        rep = track1_metrics(labels, scores, ws.attacks, ws.codecs)
        out.update(min_dcf=rep["min_dcf"], act_dcf=rep["act_dcf"], cllr=rep["cllr"], asvspoof5=rep)
    elif ws.protocol is not None:
        raise ValueError(f"set {ws.name!r}: unknown protocol {ws.protocol!r}")
    return out


def write_set_scores(out_dir, name, ws, scores):
    """``<out_dir>/scores/<name>.txt`` (the ASVspoof CM score format above) and, for ASVspoof 5
    sets, ``<name>.tsv`` in the challenge's submission format. Returns the paths."""
    paths = [write_score_file(os.path.join(out_dir, "scores", f"{name}.txt"), ws.utt_ids, ws.attacks,
                              ws.labels.numpy(), scores)]
    if ws.protocol == "asvspoof5":
        from .asvspoof5 import write_track1_scores
        paths.append(write_track1_scores(os.path.join(out_dir, "scores", f"{name}.tsv"), ws.utt_ids, scores))
    return paths
