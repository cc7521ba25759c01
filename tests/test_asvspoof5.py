"""ASVspoof 5: metrics on hand-computed cases and against brute force, protocol and score
files, and dpda-train / dpda-eval on a tiny ASVspoof 5 layout."""
import json
import math

import numpy as np
import pytest

from roga_cuda.apps.speech import asvspoof5 as a5
from roga_cuda.apps.speech import data as sdata

try:
    import soundfile as sf
except ImportError:  # only the end-to-end test needs it
    sf = None

# the challenge's Track 1 cost model: P_spoof 0.05, C_miss 1, C_fa 10 -> DCF = (0.95 P_miss + 0.5 P_fa) / 0.5
BONA = [2.0, 0.5, -1.0]
SPOOF = [-2.0, 0.0, 1.0, -0.5]


# --------------------------------------------------------------------- brute force

def brute_min_dcf(bona, spoof, p=0.05, c_miss=1.0, c_fa=10.0):
    """Every threshold t in the scores and +inf; accept when score >= t; explicit counting."""
    best = math.inf
    for t in sorted(set(bona) | set(spoof)) + [math.inf]:
        p_miss = sum(b < t for b in bona) / len(bona)
        p_fa = sum(s >= t for s in spoof) / len(spoof)
        best = min(best, (c_miss * (1 - p) * p_miss + c_fa * p * p_fa) / min(c_miss * (1 - p), c_fa * p))
    return best


def brute_min_a_dcf(tar, non, spf, cost):
    best = math.inf
    for t in sorted(set(tar) | set(non) | set(spf)) + [math.inf]:
        c = (cost.c_miss * cost.p_target * sum(x < t for x in tar) / len(tar)
             + cost.c_fa_nontarget * cost.p_nontarget * sum(x >= t for x in non) / len(non)
             + cost.c_fa_spoof * cost.p_spoof * sum(x >= t for x in spf) / len(spf))
        best = min(best, c / min(cost.c_fa_nontarget * cost.p_nontarget + cost.c_fa_spoof * cost.p_spoof,
                                 cost.c_miss * cost.p_target))
    return best


def package_sweep_min_dcf(bona, spoof, p=0.05, c_miss=1.0, c_fa=10.0):
    """The evaluation package's way, re-stated: sweep the scores sorted (stable, bona fide
    first), rejecting one more trial per step."""
    s = np.r_[bona, spoof]
    y = np.r_[np.ones(len(bona)), np.zeros(len(spoof))][np.argsort(s, kind="mergesort")]
    frr = np.r_[0, np.cumsum(y) / len(bona)]
    far = np.r_[1, (len(spoof) - np.cumsum(1 - y)) / len(spoof)]
    return np.min(c_miss * frr * (1 - p) + c_fa * far * p) / min(c_miss * (1 - p), c_fa * p)


# ------------------------------------------------------------------------- metrics

def test_min_dcf_hand_computed():
    # t = -1: nothing bona fide rejected, 3 of 4 spoofs accepted -> (0 + 0.5 * 0.75) / 0.5 = 0.75;
    # every other threshold costs more (t = 0.5: 1.9 / 3 + 0.25 = 0.883; accept all: 1; reject all: 1.9)
    m = a5.min_dcf(BONA, SPOOF)
    assert m.value == pytest.approx(0.75, abs=1e-15) and m.threshold == -1.0
    assert a5.min_dcf([1.0], [0.0]).value == 0.0                       # separable
    assert a5.min_dcf([0.0], [1.0]).value == pytest.approx(1.0)         # reversed: accept all costs 0.5 / 0.5
    # the default operating point costs at most 1 (min(accept all, reject all) after normalising)
    assert a5.min_dcf([0.0, 0.0], [0.0]).value == pytest.approx(1.0)


def test_act_dcf_hand_computed():
    # threshold log(0.5 / 0.95) = -0.642: bona fide -1 rejected (1/3), spoofs -0.5, 0, 1 accepted (3/4)
    m = a5.act_dcf(BONA, SPOOF)
    assert m.threshold == pytest.approx(math.log(0.5 / 0.95), abs=1e-15)
    assert m.value == pytest.approx((0.95 / 3 + 0.5 * 0.75) / 0.5, abs=1e-15)
    # scores exactly at the threshold are accepted
    t = math.log(0.5 / 0.95)
    assert a5.act_dcf([t], [t]).value == pytest.approx(1.0, abs=1e-15)


def test_cllr_hand_computed():
    assert a5.cllr([0.0], [0.0]) == pytest.approx(1.0, abs=1e-15)                     # uninformative
    assert a5.cllr([math.log(3)], [-math.log(3)]) == pytest.approx(math.log2(4 / 3), abs=1e-15)
    assert a5.cllr([800.0], [-800.0]) == pytest.approx(0.0, abs=1e-300)               # no overflow
    assert a5.cllr([-800.0], [800.0]) == pytest.approx(800 / math.log(2), rel=1e-15)
    rs = np.random.RandomState(0)
    b, s = rs.randn(50) + 1, rs.randn(70) - 1
    want = 0.5 * (np.mean([math.log2(1 + math.exp(-x)) for x in b]) + np.mean([math.log2(1 + math.exp(x)) for x in s]))
    assert a5.cllr(b, s) == pytest.approx(want, rel=1e-13)


def test_min_a_dcf_hand_computed():
    # normaliser min(10 * 0.0095 + 10 * 0.05, 0.9405) = 0.595; at t = 1 only the spoof 2 is accepted:
    # 10 * 0.05 * 0.5 / 0.595 = 0.42; t = 0: 0.2975 / 0.595 = 0.5; t = 2: (0.47025 + 0.25) / 0.595
    m = a5.min_a_dcf([3.0, 1.0], [0.0, -1.0], [2.0, -2.0])
    assert m.value == pytest.approx(0.25 / 0.595, abs=1e-15) and m.threshold == 1.0
    assert a5.TRACK2_COST.p_target == pytest.approx(0.9405) and a5.TRACK2_COST.p_nontarget == pytest.approx(0.0095)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_with_ties(seed):
    rs = np.random.RandomState(seed)
    nb, ns = rs.randint(1, 30), rs.randint(1, 30)
    bona = np.round(rs.randn(nb) + 1, 1).tolist()      # rounded: ties within and across classes
    spoof = np.round(rs.randn(ns) - 0.5, 1).tolist()
    assert a5.min_dcf(bona, spoof).value == pytest.approx(brute_min_dcf(bona, spoof), abs=1e-14)
    cost = a5.DCFCost(p_spoof=0.3, c_miss=2.0, c_fa=1.0)
    assert a5.min_dcf(bona, spoof, cost).value == pytest.approx(brute_min_dcf(bona, spoof, 0.3, 2.0, 1.0), abs=1e-14)
    tar, non, spf = (np.round(rs.randn(rs.randint(1, 20)) + mu, 1).tolist() for mu in (1.5, -0.5, 0.5))
    for c in (a5.TRACK2_COST, a5.ADCFCost(p_target=0.5, p_nontarget=0.3, p_spoof=0.2, c_fa_spoof=20.0)):
        assert a5.min_a_dcf(tar, non, spf, c).value == pytest.approx(brute_min_a_dcf(tar, non, spf, c), abs=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_min_dcf_equals_the_package_sweep_without_ties(seed):
    rs = np.random.RandomState(seed + 100)
    bona, spoof = rs.randn(200) + 1.0, rs.randn(300)
    assert a5.min_dcf(bona, spoof).value == pytest.approx(package_sweep_min_dcf(bona, spoof), abs=1e-14)


def test_track1_breakdowns():
    rs = np.random.RandomState(3)
    n = 60
    labels = np.r_[np.ones(20, int), np.zeros(40, int)]
    scores = rs.randn(n) + labels
    attacks = np.r_[["-"] * 20, ["A01"] * 15, ["A02"] * 25]
    codecs = np.array(["-", "C01", "C02"] * 20)
    r = a5.track1_metrics(labels, scores, attacks, codecs)
    assert r["min_dcf"] == pytest.approx(brute_min_dcf(scores[:20].tolist(), scores[20:].tolist()), abs=1e-14)
    assert r["cost"] == {"p_spoof": 0.05, "c_miss": 1.0, "c_fa": 10.0}
    assert set(r["per_attack"]) == {"A01", "A02"} and set(r["per_codec"]) == {"-", "C01", "C02"}
    a2 = r["per_attack"]["A02"]
    assert a2["min_dcf"] == pytest.approx(brute_min_dcf(scores[:20].tolist(), scores[35:].tolist()), abs=1e-14)
    assert a2["n_bonafide"] == 20 and a2["n_spoof"] == 25
    c1 = r["per_codec"]["C01"]
    sel = codecs == "C01"
    assert c1["cllr"] == pytest.approx(a5.cllr(scores[sel & (labels == 1)], scores[sel & (labels == 0)]))
    assert c1["n_bonafide"] + c1["n_spoof"] == sel.sum()
    assert "per_codec" not in a5.track1_metrics(labels, scores)


def test_metric_errors():
    with pytest.raises(ValueError, match="no spoof"):
        a5.min_dcf([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        a5.cllr([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="p_spoof"):
        a5.DCFCost(p_spoof=1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        a5.ADCFCost(p_target=0.5)
    with pytest.raises(ValueError, match="one length"):
        a5.track1_metrics([1, 0], [0.5])


# ------------------------------------------------------------- protocols and scores

def test_protocol_readers(tmp_path):
    p = tmp_path / "ASVspoof5.eval.track_1.tsv"
    p.write_text("E_0001 E_0000000001 F C03 2 E_0000000077 AC1 A17 spoof -\n"
                 "E_0002 E_0000000002 M - - - - bonafide bonafide -\n\n")
    rows = a5.read_track1_protocol(str(p))
    assert rows[0] == a5.Track1Row("E_0001", "E_0000000001", "F", "C03", "2", "E_0000000077", "AC1", "A17", "spoof")
    assert rows[1].attack == "-" and rows[1].key == "bonafide" and rows[1].codec == "-"
    old = tmp_path / "ASVspoof5.train.metadata.txt"
    old.write_text("T_4850 T_0000000000 F - A05 spoof\nT_4850 T_0000000001 F - - bonafide\n")
    rows = a5.read_track1_protocol(str(old))
    assert [(r.file, r.attack, r.key) for r in rows] == [("T_0000000000", "A05", "spoof"),
                                                         ("T_0000000001", "-", "bonafide")]
    old.write_text("T_4850 T_0000000000 F - A05 spoof\nT_4850 T_0000000001 F - - maybe\n")
    with pytest.raises(ValueError, match="metadata.txt:2"):
        a5.read_track1_protocol(str(old))
    old.write_bytes(b"T_1 T_2 F - A05 spoof\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        a5.read_track1_protocol(str(old))
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        a5.read_track1_protocol(str(tmp_path / "nope.tsv"))
    tr = tmp_path / "trial.tsv"
    tr.write_text("E_0101 E_0000000001 F bonafide target\nE_0101 E_0000000002 F A20 spoof\n")
    t = a5.read_track2_trials(str(tr))
    assert t[0] == a5.Track2Trial("E_0101", "E_0000000001", "target", "-", "F") and t[1].attack == "A20"
    tr.write_text("D_0755 D_0000000022 spoof\n")
    assert a5.read_track2_trials(str(tr))[0].key == "spoof"
    en = tmp_path / "enroll.tsv"
    en.write_text("D_4660 D_A0000000316,D_A0000000725,D_A0000000343\n")
    assert a5.read_enrollment(str(en)) == {"D_4660": ["D_A0000000316", "D_A0000000725", "D_A0000000343"]}


def test_score_files(tmp_path):
    p = a5.write_track1_scores(str(tmp_path / "s" / "eval.tsv"), ["E_1", "E_2"], [0.25, -1.5])
    assert open(p).read() == "filename\tcm-score\nE_1\t0.25\nE_2\t-1.5\n"
    assert a5.read_track1_scores(p) == {"E_1": 0.25, "E_2": -1.5}
    with pytest.raises(ValueError, match="finite"):
        a5.write_track1_scores(str(tmp_path / "x.tsv"), ["E_1"], [float("nan")])
    bad = tmp_path / "bad.tsv"
    bad.write_text("filename\tcm-score\nE_1\t0.5\nE_1\t0.7\n")
    with pytest.raises(ValueError, match="bad.tsv:3: E_1 is scored twice"):
        a5.read_track1_scores(str(bad))
    bad.write_text("E_1 0.5\n")
    with pytest.raises(ValueError, match="header"):
        a5.read_track1_scores(str(bad))
    s = a5.write_sasv_scores(str(tmp_path / "sasv.tsv"), ["E_0101", "E_0101", "E_0203"], ["E_1", "E_2", "E_3"],
                             [2.0, 0.5, -1.0])
    assert open(s).read().splitlines()[:2] == ["spk\tfilename\tcm-score\tasv-score\tsasv-score",
                                               "E_0101\tE_1\t-\t-\t2.0"]
    assert a5.read_sasv_scores(s) == {("E_0101", "E_1"): 2.0, ("E_0101", "E_2"): 0.5, ("E_0203", "E_3"): -1.0}


def test_metrics_from_files_and_the_command_line(tmp_path, capsys):
    proto = tmp_path / "ASVspoof5.dev.track_1.tsv"
    lines, files, scores = [], [], []
    for i, (b, s, atk) in enumerate([(1, 2.0, "bonafide"), (1, 0.5, "bonafide"), (1, -1.0, "bonafide"),
                                     (0, -2.0, "A11"), (0, 0.0, "A11"), (0, 1.0, "A12"), (0, -0.5, "A12")]):
        f = f"D_{i:010d}"
        lines.append(f"D_0001 {f} F - - - {'-' if b else 'AC1'} {atk} {'bonafide' if b else 'spoof'} -")
        files.append(f)
        scores.append(s)
    proto.write_text("\n".join(lines) + "\n")
    sc = a5.write_track1_scores(str(tmp_path / "dev.tsv"), files, scores)
    r = a5.track1_from_files(sc, str(proto))
    assert r["min_dcf"] == pytest.approx(0.75) and set(r["per_attack"]) == {"A11", "A12"}
    assert a5.main(["--cm", sc, "--cm-keys", str(proto)]) == 0
    assert json.loads(capsys.readouterr().out)["min_dcf"] == pytest.approx(0.75)
    a5.write_track1_scores(str(tmp_path / "short.tsv"), files[:-1], scores[:-1])
    assert a5.main(["--cm", str(tmp_path / "short.tsv"), "--cm-keys", str(proto)]) == 2
    assert "1 protocol file(s) unscored" in capsys.readouterr().err
    trials = tmp_path / "trial.tsv"
    trials.write_text("E_1 T1 F bonafide target\nE_1 T2 F bonafide target\nE_1 N1 M bonafide nontarget\n"
                      "E_1 N2 M bonafide nontarget\nE_1 S1 F A20 spoof\nE_1 S2 F A21 spoof\n")
    sasv = a5.write_sasv_scores(str(tmp_path / "sasv.tsv"), ["E_1"] * 6, ["T1", "T2", "N1", "N2", "S1", "S2"],
                                [3.0, 1.0, 0.0, -1.0, 2.0, -2.0])
    r = a5.a_dcf_from_files(sasv, str(trials))
    assert r["min_a_dcf"] == pytest.approx(0.25 / 0.595) and (r["n_target"], r["n_spoof"]) == (2, 2)
    assert a5.main(["--sasv", sasv, "--sasv-keys", str(trials)]) == 0
    assert json.loads(capsys.readouterr().out)["min_a_dcf"] == pytest.approx(0.25 / 0.595)


# ----------------------------------------------------------------------- end to end

def _write_asvspoof5(root, n_per_split=8):
    (root / "ASVspoof5_protocols").mkdir(parents=True)
    rs = np.random.RandomState(0)
    for split, code, proto, audio in [("train", "T", "ASVspoof5.train.tsv", "flac_T"),
                                      ("dev", "D", "ASVspoof5.dev.track_1.tsv", "flac_D"),
                                      ("eval", "E", "ASVspoof5.eval.track_1.tsv", "flac_E_eval")]:
        (root / audio).mkdir()
        lines = []
        for i in range(n_per_split):
            f = f"{code}_{i:010d}"
            bona = i % 2 == 0
            codec = "-" if split != "eval" else ("C01" if i % 4 < 2 else "-")
            attack = "bonafide" if bona else ("A01" if split != "eval" else ("A17", "A18")[i % 4 == 3])
            lines.append(f"{code}_{i % 3:04d} {f} F {codec} - - {'-' if bona else 'AC1'} {attack} "
                         f"{'bonafide' if bona else 'spoof'} -")
            sf.write(str(root / audio / f"{f}.flac"), (0.1 * rs.randn(1500 + 100 * i)).astype(np.float32), 16000)
        (root / "ASVspoof5_protocols" / proto).write_text("\n".join(lines) + "\n")


@pytest.mark.skipif(sf is None, reason="soundfile is not installed")
def test_end_to_end_on_asvspoof5_layout(tmp_path, capsys):
    from roga_cuda.apps.speech.cli import eval_main, train_main
    root = tmp_path / "asvspoof5"
    _write_asvspoof5(root)
    ws = sdata.asvspoof5_set(str(root), "eval", n_samples=2000)
    assert ws.protocol == "asvspoof5" and ws.codecs[:4] == ["C01", "C01", "-", "-"] and ws.attacks[3] == "A18"
    out = tmp_path / "run"
    rc = train_main(["--preset", "smoke", "--out", str(out), "data.source=asvspoof5", f"data.root={root}",
                     "data.n_samples=2000", "train.epochs=1", "train.batch_size=4", "runtime.progress=false"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["sets"]) == {"dev", "eval"} and m["main_set"] == "eval"
    ev = m["sets"]["eval"]
    assert {"min_dcf", "act_dcf", "cllr", "eer", "asvspoof5"} <= set(ev)
    assert set(ev["asvspoof5"]["per_attack"]) == {"A17", "A18"} and set(ev["asvspoof5"]["per_codec"]) == {"-", "C01"}
    # the challenge-format score file gives the same metrics through the file API
    r = a5.track1_from_files(str(out / "scores" / "eval.tsv"), str(root / "ASVspoof5_protocols" /
                                                                    "ASVspoof5.eval.track_1.tsv"))
    for k in ("min_dcf", "act_dcf", "cllr", "eer"):
        assert r[k] == pytest.approx(ev[k], abs=1e-9), k
    # dpda-eval on the averaged model reports them too
    capsys.readouterr()
    assert eval_main([str(out / "model_avg.pt"), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "minDCF" in printed and "actDCF" in printed and "Cllr" in printed
    e = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert e["sets"]["eval"]["min_dcf"] == pytest.approx(ev["min_dcf"], abs=1e-6)
    assert (tmp_path / "ev" / "scores" / "eval.tsv").is_file()
    # a layout without the eval protocol tests on dev only; bad layouts get clear errors
    (root / "ASVspoof5_protocols" / "ASVspoof5.eval.track_1.tsv").unlink()
    from roga_cuda.apps.common import load_config
    cfg = load_config("smoke", overrides=["data.source=asvspoof5", f"data.root={root}"], app="speech")
    assert set(sdata.build_data(cfg.data, log=lambda *a: None).tests) == {"dev"}
    with pytest.raises(FileNotFoundError, match="eval protocol not found"):
        sdata.asvspoof5_set(str(root), "eval")
    cfg = load_config("smoke", overrides=["data.source=asvspoof5"], app="speech")
    with pytest.raises(ValueError, match="data.root"):
        sdata.build_data(cfg.data)
