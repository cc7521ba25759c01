"""ASVspoof 5: protocol files, score files and the challenge's metrics.

Sources: the challenge summary (Wang et al., "ASVspoof 5: crowdsourced speech data,
deepfakes, and adversarial attacks at scale", ASVspoof 2024 workshop, arXiv:2408.08739), its
evaluation plan (Delgado et al. 2024) and the organisers' evaluation package
(github.com/asvspoof-challenge/asvspoof5, ``evaluation-package/``: ``calculate_modules.py``,
``calculate_metrics.py``, ``a_dcf.py``), the database README (protocol columns).

Convention: a higher score = more bona fide; a trial is accepted (bona fide / target) when
its score is >= the threshold.

Track 1 (countermeasure alone), cost model ``TRACK1_COST``: P_spoof = 0.05, C_miss = 1,
C_fa = 10::

    DCF(t)  = [C_miss (1 - P_spoof) P_miss(t) + C_fa P_spoof P_fa(t)] / min(C_miss (1 - P_spoof), C_fa P_spoof)
    minDCF  = min over t of DCF(t)                          (the primary metric)
    actDCF  = DCF(t*), t* = log(C_fa P_spoof / (C_miss (1 - P_spoof))) = -log(beta)   (scores as LLRs)
    Cllr    = [mean_bona log2(1 + e^-s) + mean_spoof log2(1 + e^s)] / 2                 (bits)
    EER     = the repository's EER (the error rate where the piecewise-linear DET crosses P_miss = P_fa)

with P_miss(t) = fraction of bona fide scores < t and P_fa(t) = fraction of spoof scores >= t.
The minimum runs over every achievable operating point (each distinct score as t, and
"reject all"). The package sweeps the sorted scores instead, which equals this when no bona
fide and spoof scores tie; with such ties its sweep also visits splits of the tied group no
threshold achieves, so it can report a lower minimum. Its EER is the mean of P_miss and
P_fa at the swept point where they are closest, which equals ours whenever the rates cross
at a score. actDCF and Cllr read the scores as natural-log likelihood ratios: this app's
score (the bona fide logit minus the spoof logit) is not calibrated, so they measure
calibration too, as in the challenge.

Track 2 (spoofing-aware speaker verification), cost model ``TRACK2_COST`` (the package's
``tdcf_cost_model``): P_target = 0.95 x 0.99, P_nontarget = 0.95 x 0.01, P_spoof = 0.05,
C_miss = 1, C_fa,non = C_fa,spoof = 10; a-DCF (Shim et al., Odyssey 2024)::

    a-DCF(t) = [C_miss P_tar P_miss(t) + C_fa,non P_non P_fa,non(t) + C_fa,spoof P_spoof P_fa,spoof(t)]
               / min(C_fa,non P_non + C_fa,spoof P_spoof, C_miss P_tar),     min over t

on single SASV scores of target, non-target and spoof trials. This app trains a
countermeasure, not an SASV system: a-DCF is computed from SASV score files only.
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from ..common.metrics import eer as _eer


# ----------------------------------------------------------------------------- costs

@dataclass(frozen=True)
class DCFCost:
    """Track 1 cost model (the challenge's values by default)."""
    p_spoof: float = 0.05
    c_miss: float = 1.0
    c_fa: float = 10.0

    def __post_init__(self):
        if not 0 < self.p_spoof < 1 or self.c_miss <= 0 or self.c_fa <= 0:
            raise ValueError(f"DCFCost: need 0 < p_spoof < 1 and positive costs, got {self}")


@dataclass(frozen=True)
class ADCFCost:
    """Track 2 (a-DCF) cost model (the challenge's values by default)."""
    p_target: float = 0.95 * 0.99
    p_nontarget: float = 0.95 * 0.01
    p_spoof: float = 0.05
    c_miss: float = 1.0
    c_fa_nontarget: float = 10.0
    c_fa_spoof: float = 10.0

    def __post_init__(self):
        priors = (self.p_target, self.p_nontarget, self.p_spoof)
        if min(priors) < 0 or abs(sum(priors) - 1) > 1e-10:
            raise ValueError(f"ADCFCost: the priors must be >= 0 and sum to 1, got {priors}")
        if min(self.c_miss, self.c_fa_nontarget, self.c_fa_spoof) <= 0:
            raise ValueError(f"ADCFCost: costs must be positive, got {self}")


TRACK1_COST = DCFCost()
TRACK2_COST = ADCFCost()


class Metric(NamedTuple):
    value: float
    threshold: float


# --------------------------------------------------------------------------- metrics

def _scores(x, what):
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"ASVspoof 5 metrics: no {what} scores")
    if not np.isfinite(a).all():
        raise ValueError(f"ASVspoof 5 metrics: {what} scores contain NaN or inf")
    return a


def _accept_rates(thresholds, scores):
    """Fraction of ``scores`` >= each threshold."""
    s = np.sort(scores)
    return (s.size - np.searchsorted(s, thresholds, side="left")) / s.size


def _operating_points(*score_sets):
    """Every achievable threshold: each distinct score (ascending) and +inf (reject all)."""
    return np.r_[np.unique(np.concatenate(score_sets)), np.inf]


def dcf_curve(bona, spoof, cost=TRACK1_COST):
    """(normalised DCF per threshold, thresholds) over every operating point."""
    bona, spoof = _scores(bona, "bona fide"), _scores(spoof, "spoof")
    t = _operating_points(bona, spoof)
    p_miss, p_fa = 1 - _accept_rates(t, bona), _accept_rates(t, spoof)
    a, b = cost.c_miss * (1 - cost.p_spoof), cost.c_fa * cost.p_spoof
    return (a * p_miss + b * p_fa) / min(a, b), t


def min_dcf(bona, spoof, cost=TRACK1_COST):
    """minDCF (Track 1's primary metric) and its threshold (the first, lowest, at ties)."""
    curve, t = dcf_curve(bona, spoof, cost)
    i = int(np.argmin(curve))
    return Metric(float(curve[i]), float(t[i]))


def act_dcf(bona, spoof, cost=TRACK1_COST):
    """actual DCF at the Bayes threshold for scores that are log-likelihood ratios."""
    bona, spoof = _scores(bona, "bona fide"), _scores(spoof, "spoof")
    a, b = cost.c_miss * (1 - cost.p_spoof), cost.c_fa * cost.p_spoof
    t = math.log(b / a)
    value = (a * np.mean(bona < t) + b * np.mean(spoof >= t)) / min(a, b)
    return Metric(float(value), t)


def cllr(bona, spoof):
    """Log-likelihood-ratio cost in bits (0: perfect and calibrated; 1: an uninformative 0 score)."""
    bona, spoof = _scores(bona, "bona fide"), _scores(spoof, "spoof")
    return float((np.mean(np.logaddexp(0, -bona)) + np.mean(np.logaddexp(0, spoof))) / (2 * math.log(2)))


def min_a_dcf(target, nontarget, spoof, cost=TRACK2_COST):
    """Minimum a-DCF (Track 2's primary metric) of SASV scores, and its threshold."""
    tar, non, spf = _scores(target, "target"), _scores(nontarget, "non-target"), _scores(spoof, "spoof")
    t = _operating_points(tar, non, spf)
    curve = (cost.c_miss * cost.p_target * (1 - _accept_rates(t, tar))
             + cost.c_fa_nontarget * cost.p_nontarget * _accept_rates(t, non)
             + cost.c_fa_spoof * cost.p_spoof * _accept_rates(t, spf))
    curve /= min(cost.c_fa_nontarget * cost.p_nontarget + cost.c_fa_spoof * cost.p_spoof, cost.c_miss * cost.p_target)
    i = int(np.argmin(curve))
    return Metric(float(curve[i]), float(t[i]))


def _track1_core(bona, spoof, cost):
    md, ad = min_dcf(bona, spoof, cost), act_dcf(bona, spoof, cost)
    y = np.r_[np.ones(len(bona)), np.zeros(len(spoof))]
    e, e_thr = _eer(y, np.r_[bona, spoof])
    return {"min_dcf": md.value, "min_dcf_threshold": md.threshold, "act_dcf": ad.value,
            "act_dcf_threshold": ad.threshold, "cllr": cllr(bona, spoof), "eer": e, "eer_threshold": e_thr,
            "n_bonafide": int(len(bona)), "n_spoof": int(len(spoof))}


def track1_metrics(labels, scores, attacks=None, codecs=None, cost=TRACK1_COST):
    """Track 1 report: pooled minDCF, actDCF, Cllr, EER (+ thresholds, counts); ``per_attack``:
    every bona fide trial vs each attack's spoofs; ``per_codec``: bona fide vs spoof trials of
    each codec condition ('-': none) that has both. Labels: 1 bona fide, 0 spoof."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"track1_metrics: labels and scores must be 1-D of one length, got {labels.shape}, "
                         f"{scores.shape}")
    bona, spoof = scores[labels == 1], scores[labels == 0]
    out = _track1_core(bona, spoof, cost)
    out["cost"] = asdict(cost)
    if attacks is not None:
        att = np.asarray(attacks)
        out["per_attack"] = {a: _track1_core(bona, spoof[att[labels == 0] == a], cost)
                             for a in sorted(set(att[labels == 0].tolist()))}
    if codecs is not None:
        cod = np.asarray(codecs)
        out["per_codec"] = {}
        for c in sorted(set(cod.tolist())):
            b, s = scores[(labels == 1) & (cod == c)], scores[(labels == 0) & (cod == c)]
            if b.size and s.size:
                out["per_codec"][c] = _track1_core(b, s, cost)
    return out


def summary(m):
    """', minDCF x, actDCF y, Cllr z bits' for a set's metrics dict holding them, else ''."""
    if "min_dcf" not in m:
        return ""
    return f", minDCF {m['min_dcf']:.4f}, actDCF {m['act_dcf']:.4f}, Cllr {m['cllr']:.4f} bits"


# ------------------------------------------------------------------------- protocols

class Track1Row(NamedTuple):
    """One line of ASVspoof5.{train,dev.track_1,eval.track_1}.tsv (attack '-' for bona fide)."""
    speaker: str
    file: str
    gender: str
    codec: str
    codec_q: str
    codec_seed: str
    attack_tag: str
    attack: str
    key: str


class Track2Trial(NamedTuple):
    """One line of ASVspoof5.*.track_2.trial.tsv (or the challenge-phase trial.txt)."""
    target_speaker: str
    file: str
    key: str           # target | nontarget | spoof
    attack: str        # '-' for bona fide; '-' when the file does not say
    gender: str        # '-' when the file does not say


def _lines(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ASVspoof 5 {what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return [(ln, line.split()) for ln, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"ASVspoof 5 {what} {path} is not UTF-8 text: {e}") from None


def read_track1_protocol(path):
    """[Track1Row] from a Track 1 protocol: the released 10-column format
    ``SPEAKER FILE GENDER CODEC CODEC_Q CODEC_SEED ATTACK_TAG ATTACK_LABEL KEY TMP`` or the
    challenge-phase 6-column metadata ``SPEAKER FILE GENDER CODEC ATTACK KEY``."""
    rows = []
    for ln, p in _lines(path, "protocol file"):
        if len(p) == 10 and p[8] in ("bonafide", "spoof"):
            spk, f, g, codec, q, seed, tag, attack, key, _ = p
        elif len(p) == 6 and p[5] in ("bonafide", "spoof"):
            (spk, f, g, codec, attack, key), q, seed, tag = p, "-", "-", "-"
        else:
            raise ValueError(f"{path}:{ln}: expected 'SPEAKER FILE GENDER CODEC CODEC_Q CODEC_SEED ATTACK_TAG "
                             f"ATTACK KEY -' (or 'SPEAKER FILE GENDER CODEC ATTACK KEY'), KEY bonafide|spoof; got "
                             f"{' '.join(p)!r}")
        rows.append(Track1Row(spk, f, g, codec, q, seed, tag, "-" if key == "bonafide" else attack, key))
    if not rows:
        raise ValueError(f"ASVspoof 5 protocol file {path} is empty")
    return rows


def read_track2_trials(path):
    """[Track2Trial] from ``TARGET_SPEAKER FILE TARGET_GENDER ATTACK_LABEL ASV_KEY`` (released)
    or ``TARGET_SPEAKER FILE ASV_KEY`` (challenge phase)."""
    keys = ("target", "nontarget", "spoof")
    trials = []
    for ln, p in _lines(path, "trial file"):
        if len(p) == 5 and p[4] in keys:
            spk, f, g, attack, key = p
        elif len(p) == 3 and p[2] in keys:
            (spk, f, key), g, attack = p, "-", "-"
        else:
            raise ValueError(f"{path}:{ln}: expected 'TARGET_SPEAKER FILE GENDER ATTACK target|nontarget|spoof' "
                             f"(or 'TARGET_SPEAKER FILE KEY'); got {' '.join(p)!r}")
        trials.append(Track2Trial(spk, f, key, "-" if attack == "bonafide" else attack, g))
    if not trials:
        raise ValueError(f"ASVspoof 5 trial file {path} is empty")
    return trials


def read_enrollment(path):
    """{target speaker: [enrolment files]} from ``TARGET_SPEAKER FILE1,FILE2,...``."""
    out = {}
    for ln, p in _lines(path, "enrolment file"):
        if len(p) != 2:
            raise ValueError(f"{path}:{ln}: expected 'TARGET_SPEAKER FILE1,FILE2,...', got {' '.join(p)!r}")
        out[p[0]] = [f for f in p[1].split(",") if f]
    return out


# ------------------------------------------------------------------------ score files

def _atomic_write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _check_score(s, what):
    s = float(s)
    if not math.isfinite(s):
        raise ValueError(f"ASVspoof 5 score files take finite scores only; {what} has {s}")
    return s


def write_track1_scores(path, files, scores):
    """The Track 1 submission format: tab-separated with the header ``filename	cm-score``."""
    files = list(files)
    scores = list(scores)
    if len(files) != len(scores):
        raise ValueError(f"write_track1_scores: {len(files)} files, {len(scores)} scores")
    lines = ["filename\tcm-score"] + [f"{f}\t{_check_score(s, f)!r}" for f, s in zip(files, scores)]
    return _atomic_write(path, "\n".join(lines) + "\n")


def _table(path, header, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ASVspoof 5 {what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if not rows or [c.strip() for c in rows[0]] != header:
        raise ValueError(f"{path}: expected a tab-separated {what} with the header {' '.join(header)!r}")
    for ln, r in enumerate(rows[1:], 2):
        if len(r) != len(header):
            raise ValueError(f"{path}:{ln}: expected {len(header)} tab-separated columns, got {len(r)}")
    return [[c.strip() for c in r] for r in rows[1:]]


def read_track1_scores(path):
    """{file: score} from a Track 1 score file (``filename	cm-score``)."""
    out = {}
    for ln, (f, s) in enumerate(_table(path, ["filename", "cm-score"], "CM score file"), 2):
        try:
            score = float(s)
        except ValueError:
            raise ValueError(f"{path}:{ln}: score {s!r} is not a number") from None
        if f in out:
            raise ValueError(f"{path}:{ln}: {f} is scored twice")
        out[f] = _check_score(score, f"{path}:{ln}")
    return out


def write_sasv_scores(path, speakers, files, sasv, cm=None, asv=None):
    """The Track 2 submission format: ``spk filename cm-score asv-score sasv-score`` (tabs,
    header), '-' for a sub-system's missing scores."""
    n = len(files)
    cols = [list(speakers), list(files), list(cm) if cm is not None else ["-"] * n,
            list(asv) if asv is not None else ["-"] * n, list(sasv)]
    if any(len(c) != n for c in cols):
        raise ValueError("write_sasv_scores: speakers, files and scores differ in length")
    fmt = lambda v, w: v if isinstance(v, str) else repr(_check_score(v, w))  # noqa: E731
    lines = ["spk\tfilename\tcm-score\tasv-score\tsasv-score"]
    lines += ["\t".join([s, f, fmt(c, f), fmt(a, f), fmt(v, f)]) for s, f, c, a, v in zip(*cols)]
    return _atomic_write(path, "\n".join(lines) + "\n")


def read_sasv_scores(path):
    """{(target speaker, file): SASV score} from a Track 2 score file."""
    out = {}
    for ln, (spk, f, _, _, s) in enumerate(_table(path, ["spk", "filename", "cm-score", "asv-score", "sasv-score"],
                                                  "SASV score file"), 2):
        try:
            out[(spk, f)] = _check_score(float(s), f"{path}:{ln}")
        except ValueError as e:
            raise ValueError(f"{path}:{ln}: bad sasv-score {s!r} ({e})") from None
    return out


def track1_from_files(score_path, protocol_path, cost=TRACK1_COST):
    """Track 1 metrics of a score file against a Track 1 protocol (the keys and metadata)."""
    scores = read_track1_scores(score_path)
    rows = read_track1_protocol(protocol_path)
    missing = [r.file for r in rows if r.file not in scores]
    extra = set(scores) - {r.file for r in rows}
    if missing or extra:
        raise ValueError(f"{score_path} does not match {protocol_path}: {len(missing)} protocol file(s) unscored "
                         f"(e.g. {missing[:1]}), {len(extra)} unknown file(s) (e.g. {sorted(extra)[:1]})")
    return track1_metrics([1 if r.key == "bonafide" else 0 for r in rows], [scores[r.file] for r in rows],
                          [r.attack for r in rows], [r.codec for r in rows], cost)


def a_dcf_from_files(score_path, trial_path, cost=TRACK2_COST):
    """Minimum a-DCF of a SASV score file against a Track 2 trial file."""
    scores = read_sasv_scores(score_path)
    trials = read_track2_trials(trial_path)
    missing = [(t.target_speaker, t.file) for t in trials if (t.target_speaker, t.file) not in scores]
    if missing or len(scores) != len(trials):
        raise ValueError(f"{score_path} does not match {trial_path}: {len(missing)} trial(s) unscored "
                         f"(e.g. {missing[:1]}), {len(scores)} scores for {len(trials)} trials")
    by_key = {k: [scores[(t.target_speaker, t.file)] for t in trials if t.key == k]
              for k in ("target", "nontarget", "spoof")}
    m = min_a_dcf(by_key["target"], by_key["nontarget"], by_key["spoof"], cost)
    return {"min_a_dcf": m.value, "threshold": m.threshold, "cost": asdict(cost),
            **{f"n_{k}": len(v) for k, v in by_key.items()}}


def main(argv=None):
    """``python -m roga_cuda.apps.speech.asvspoof5 --cm SCORES.tsv --cm-keys PROTOCOL`` (Track 1)
    or ``--sasv SCORES.tsv --sasv-keys TRIALS`` (a-DCF); prints JSON."""
    import json
    p = argparse.ArgumentParser(prog="python -m roga_cuda.apps.speech.asvspoof5",
                                description="ASVspoof 5 metrics of a score file (Track 1: minDCF, actDCF, Cllr, "
                                            "EER per attack and codec; Track 2: a-DCF)")
    p.add_argument("--cm", help="Track 1 score file (filename<TAB>cm-score)")
    p.add_argument("--cm-keys", help="Track 1 protocol with keys, e.g. ASVspoof5.eval.track_1.tsv")
    p.add_argument("--sasv", help="Track 2 score file (spk filename cm-score asv-score sasv-score)")
    p.add_argument("--sasv-keys", help="Track 2 trial file with keys, e.g. ASVspoof5.eval.track_2.trial.tsv")
    a = p.parse_args(argv)
    if bool(a.cm) == bool(a.sasv) or bool(a.cm) != bool(a.cm_keys) or bool(a.sasv) != bool(a.sasv_keys):
        p.error("give --cm with --cm-keys, or --sasv with --sasv-keys")
    try:
        res = track1_from_files(a.cm, a.cm_keys) if a.cm else a_dcf_from_files(a.sasv, a.sasv_keys)
    except (ValueError, FileNotFoundError) as e:
        print(f"asvspoof5: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
