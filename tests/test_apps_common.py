"""Shared app infrastructure: metrics vs scikit-learn, atomic checkpoints, config, exact resume."""
import math
import os

import numpy as np
import pytest
import torch

from roga_cuda.apps.common import checkpoint as ckpt_mod
from roga_cuda.apps.common import (BatchStream, CheckpointError, Checkpointer, ConfigError, EarlyStopping,
                                   EpochSampler, MetricLogger, accuracy, average_checkpoints, average_precision,
                                   binary_metrics, build_scheduler, capture_state, det_curve, eer,
                                   latest_checkpoint, load_checkpoint, load_config, lr_factor, read_log,
                                   restore_state, roc_auc, roc_curve, save_checkpoint, save_config, video_auc)



@pytest.fixture
def sk():
    """scikit-learn's metrics, the independent reference (only these tests need it)."""
    return pytest.importorskip("sklearn.metrics")


# ------------------------------------------------------------------------------ metrics
def _cases(seed):
    rs = np.random.RandomState(seed)
    out = []
    for n in (2, 7, 50, 501):
        y = rs.randint(0, 2, n)
        y[0], y[-1] = 0, 1  # both classes
        out.append((y, rs.rand(n)))  # continuous: no ties
        out.append((y, rs.randint(0, 5, n) / 4.0))  # heavy ties
        out.append((y, np.round(rs.randn(n) + y, 1)))  # informative, some ties
    out.append((np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.5, 0.5])))  # all tied
    out.append((np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])))  # perfect
    out.append((np.array([1, 0, 1, 0]), np.array([0.1, 0.9, 0.2, 0.8])))  # inverted
    return out


def _brute_eer(sk, y, s):
    """EER from scikit-learn's ROC points: linear interpolation where FNR - FPR changes sign."""
    fpr, tpr, thr = sk.roc_curve(y, s, drop_intermediate=False)
    fnr = 1 - tpr
    for i in range(1, len(fpr)):
        d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
        if d1 == 0:
            return fpr[i]
        if d0 > 0 > d1:
            t = d0 / (d0 - d1)
            return fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    raise AssertionError("no crossing")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed, sk):
    for y, s in _cases(seed):
        assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
        assert accuracy(y, s, 0.5) == pytest.approx(sk.accuracy_score(y, (s >= 0.5).astype(int)))
        fpr, tpr, thr = roc_curve(y, s)
        efpr, etpr, ethr = sk.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, efpr)
        np.testing.assert_allclose(tpr, etpr)
        np.testing.assert_allclose(thr[1:], ethr[1:])
        assert np.isinf(thr[0])
        e, t = eer(y, s)
        assert e == pytest.approx(_brute_eer(sk, y, s), abs=1e-12)
        # the returned threshold's own error rates straddle the EER within one step
        far = np.mean(s[y == 0] >= t)
        frr = np.mean(s[y == 1] < t)
        assert min(far, frr) - 1e-12 <= e <= max(far, frr) + 1e-12
        dfpr, dfnr, dthr = det_curve(y, s)
        sfpr, sfnr, sthr = sk.det_curve(y, s)
        # scikit-learn trims the flat ends of the DET curve; every point it keeps is ours
        ours = {(round(a, 12), round(b, 12), round(c, 12)) for a, b, c in zip(dfpr, dfnr, dthr)}
        for p in zip(sfpr, sfnr, sthr):
            assert tuple(round(float(v), 12) for v in p) in ours
        assert np.all(np.diff(dthr) > 0)


def test_eer_known_values():
    assert eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])[0] == 0.0
    assert eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])[0] == 1.0
    assert eer([0, 1], [0.5, 0.5])[0] == 0.5
    e, t = eer([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.7, 0.3, 0.8, 0.9])  # one error each way at 1/3
    assert e == pytest.approx(1 / 3)


def test_single_class_gives_nan():
    y, s = np.ones(5, int), np.linspace(0, 1, 5)
    assert math.isnan(roc_auc(y, s))
    assert all(math.isnan(v) for v in eer(y, s))
    assert math.isnan(roc_auc(1 - y, s))
    assert math.isnan(average_precision(1 - y, s))
    assert math.isnan(video_auc(y, s, np.arange(5)))
    assert accuracy(y, s, 0.5) == pytest.approx(0.6)
    m = binary_metrics(y, s, video_ids=np.arange(5))
    assert math.isnan(m["auc"]) and math.isnan(m["eer"]) and math.isnan(m["video_auc"])


def test_metric_input_errors():
    with pytest.raises(ValueError, match="length"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="different labels"):
        video_auc([0, 1, 1], [0.1, 0.2, 0.3], ["a", "a", "b"])


def test_video_auc_matches_sklearn_on_frame_means(sk):
    rs = np.random.RandomState(3)
    vids = np.repeat(np.arange(40), rs.randint(1, 6, 40))
    vlab = rs.randint(0, 2, 40)
    vlab[:2] = (0, 1)
    y = vlab[vids]
    s = rs.rand(vids.size) + 0.3 * y
    names = np.array([f"video_{v:03d}" for v in vids])  # string ids
    means = np.array([s[vids == v].mean() for v in range(40)])
    assert video_auc(y, s, names) == pytest.approx(sk.roc_auc_score(vlab, means), abs=1e-12)
    # frame AUC differs from video AUC in general (averaging removes frame noise)
    assert binary_metrics(y, s, names)["n_videos"] == 40


def test_metrics_accept_tensors():
    y = torch.tensor([0, 1, 0, 1])
    s = torch.tensor([0.2, 0.7, 0.4, 0.6])
    assert roc_auc(y, s) == 1.0


# --------------------------------------------------------------------------- checkpoints
def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.arange(4.0)})
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the temp file, then the write dies
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(4)})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temp file left behind


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    save_checkpoint(bad, {"w": torch.ones(3)})
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(bad)


def test_checkpoint_checksum_detects_flipped_bytes(tmp_path):
    import hashlib
    import zipfile
    path = tmp_path / "ck.pt"
    state = {"model": {"w": torch.randn(300, generator=torch.Generator().manual_seed(0))}, "step": 7}
    save_checkpoint(path, state)
    data = path.read_bytes()
    # the file is a plain torch zip whose archive comment holds the SHA-256 of everything before it
    comment = zipfile.ZipFile(path).comment
    assert comment.startswith(b"roga_cuda-sha256:")
    assert comment[len(b"roga_cuda-sha256:"):] == hashlib.sha256(data[:-len(comment)]).hexdigest().encode()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], state["model"]["w"])
    assert ckpt_mod.verify_checkpoint(path) is True
    rs = np.random.RandomState(0)
    body = len(data) - len(comment)
    for pos in sorted(set(rs.randint(0, body, 40).tolist()) | {0, body // 2, body - 1}):
        bad = bytearray(data)
        bad[pos] ^= 1 << rs.randint(8)
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="ck.pt"):
            load_checkpoint(path)
    # a file without the checksum (torchvision weights, torch.save) loads unverified
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    assert ckpt_mod.verify_checkpoint(plain) is False
    assert load_checkpoint(plain)["step"] == 7


def test_latest_and_average(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step, v in [(10, 1.0), (200, 3.0), (30, 2.0)]:
        save_checkpoint(tmp_path / f"step_{step:08d}.pt",
                        {"model": {"w": torch.full((2,), v), "n": torch.tensor(step)}})
    (tmp_path / ".step_00000999.pt.abc.tmp").write_bytes(b"junk")  # an interrupted write
    assert latest_checkpoint(tmp_path).endswith("step_00000200.pt")
    avg = average_checkpoints([tmp_path / "step_00000010.pt", tmp_path / "step_00000030.pt"])
    assert torch.equal(avg["w"], torch.full((2,), 1.5))
    assert avg["n"].item() == 30 and avg["n"].dtype == torch.int64
    save_checkpoint(tmp_path / "other.pt", {"model": {"v": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="other.pt"):
        average_checkpoints([tmp_path / "step_00000010.pt", tmp_path / "other.pt"])


# -------------------------------------------------------------------------------- config
@pytest.fixture
def presets(tmp_path):
    d = tmp_path / "presets"
    d.mkdir()
    (d / "default.yaml").write_text(
        "seed: 0\nname: run\nmodel:\n  arch: resnet34\n  pretrained: null\n"
        "optim:\n  lr: 0.005\n  momentum: 0.9\n  nesterov: false\n  steps: 100\n"
        "data:\n  domains: [a, b]\n")
    (d / "small.yaml").write_text("optim:\n  steps: 5\nmodel:\n  arch: meso4\n")
    (d / "typo.yaml").write_text("optim:\n  lrr: 0.1\n")
    return str(d)


def test_config_presets_and_overrides(presets, tmp_path):
    cfg = load_config(app=presets)
    assert cfg.optim.lr == 0.005 and cfg.model.arch == "resnet34"
    cfg = load_config("small", overrides=["optim.lr=1e-3", "nesterov=yes", "data.domains=[x, y, z]",
                                          "model.pretrained=/w.pt", "seed=7", "optim.momentum=0"], app=presets)
    assert cfg.optim.steps == 5 and cfg.model.arch == "meso4"
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.nesterov is True and cfg.data.domains == ["x", "y", "z"]
    assert cfg.model.pretrained == "/w.pt" and cfg.seed == 7 and cfg.optim.momentum == 0.0
    # keys whose default is null take YAML values: numbers become numbers
    assert load_config(overrides=["model.pretrained=5e-1"], app=presets).model.pretrained == 0.5
    assert load_config(overrides=["model.pretrained=[1, 2]"], app=presets).model.pretrained == [1, 2]
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  steps: 9\n")
    assert load_config("small", path=str(user), app=presets).optim.steps == 9
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(path=str(out), app=presets)
    assert again.to_dict() == cfg.to_dict()


def test_config_errors(presets):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean optim\.lr"):
        load_config("typo", app=presets)
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(overrides=["optim.lrr=1"], app=presets)
    with pytest.raises(ConfigError, match="int"):
        load_config(overrides=["optim.steps=many"], app=presets)
    with pytest.raises(ConfigError, match="bool"):
        load_config(overrides=["optim.nesterov=maybe"], app=presets)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["optim.lr"], app=presets)
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*small"):
        load_config("nope", app=presets)


def test_renamed_keys_still_work_with_a_warning(tmp_path):
    old = tmp_path / "old.yaml"  # an image run's config.yaml from before the shared vocabulary
    old.write_text("optimizer: sam\nnum_threads: 1\noptim:\n  base: adam\ntrain:\n  schedule: step\n"
                   "  early_stopping_patience: 3\n  num_workers: 0\nlog:\n  tensorboard: false\n")
    with pytest.warns(FutureWarning) as got:
        cfg = load_config(path=str(old), overrides=["train.amp=false", "device=cpu"], app="image")
    assert any("'optimizer'" in str(w.message) and "'method'" in str(w.message) for w in got)
    assert len(got) == 9  # one per old name
    assert cfg.method == "sam" and cfg.runtime.threads == 1 and cfg.optim.name == "adam"
    assert cfg.optim.schedule == "step" and cfg.train.patience == 3 and cfg.data.workers == 0
    assert cfg.runtime.tensorboard is False and cfg.runtime.amp is False and cfg.runtime.device == "cpu"
    assert "log" not in cfg and "optimizer" not in cfg
    with pytest.warns(FutureWarning) as got:
        sp = load_config(overrides=["mode=baseline", "align=gradvac", "train.ckpt_every_steps=4"], app="speech")
    assert any("'align'" in str(w.message) and "'optim.align'" in str(w.message) for w in got) and len(got) == 3
    assert sp.method == "baseline" and sp.optim.align == "gradvac" and sp.train.checkpoint_every == 4
    # every rename points at a key of the schema, and no old name is still one
    import yaml
    from roga_cuda.apps.common.config import RENAMED_FILE, _leaves, preset_dir
    for app in ("image", "speech"):
        schema = yaml.safe_load(open(os.path.join(preset_dir(app), "default.yaml")))
        leaves = set(_leaves(schema))
        renamed = yaml.safe_load(open(os.path.join(preset_dir(app), RENAMED_FILE)))
        assert set(renamed.values()) <= leaves and not set(renamed) & leaves, app
        assert "_renamed_keys" not in __import__("roga_cuda.apps.common.config", fromlist=["x"]).list_presets(app)


def test_both_apps_share_one_vocabulary():
    img, sp = load_config(app="image"), load_config(app="speech")
    assert set(img.runtime) == set(sp.runtime) == {"device", "threads", "amp", "amp_dtype", "deterministic",
                                                    "progress", "tensorboard", "channels_last"}
    shared_optim = {"name", "lr", "momentum", "nesterov", "weight_decay", "betas", "max_grad_norm", "schedule",
                    "warmup_steps", "min_lr_ratio", "step_size", "gamma", "backend"}
    assert shared_optim <= set(img.optim) and shared_optim <= set(sp.optim)
    shared_train = {"steps", "batch_size", "log_every", "patience", "monitor", "checkpoint_every", "keep_checkpoints"}
    assert shared_train <= set(img.train) and shared_train <= set(sp.train)
    assert "batch_size" in img.eval and "batch_size" in sp.eval and "workers" in img.data and "workers" in sp.data
    assert img.method in ("erm", "sam", "roga") and sp.method in ("baseline", "dpda")


def test_scheduler_warning_filter_matches_torchs_message():
    import re
    import warnings
    from roga_cuda.apps.common.trainer import SCHEDULER_WARNING
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sched.step()  # before any optimizer.step(): what a GradScaler-skipped first step looks like
    msgs = [str(w.message) for w in got if "lr_scheduler.step()" in str(w.message)]
    assert msgs, "torch no longer warns; the filter can go"
    assert all(re.match(SCHEDULER_WARNING, m) for m in msgs)  # filterwarnings matches at the start
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=SCHEDULER_WARNING)
        torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=0.1), lambda s: 1.0).step()
    assert not [w for w in got if "lr_scheduler.step()" in str(w.message)]


def _t_quantile_975(df):
    """Student t 97.5% quantile by bisection on the CDF, integrated numerically (Simpson)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x, n=4000):
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return (lo + hi) / 2


def test_seed_noise_intervals():
    from roga_cuda.apps.common.cli import _T975, mean_sd, paired_interval, seed_noise_report
    for df in (1, 2, 3, 5, 10, 30):
        assert _T975[df - 1] == pytest.approx(_t_quantile_975(df), abs=6e-4), df
    rs = np.random.RandomState(1)
    for n in (2, 3, 5, 12):
        a, b = rs.rand(n), rs.rand(n)
        d = a.astype(np.float64) - b
        half = _t_quantile_975(n - 1) * d.std(ddof=1) / math.sqrt(n)
        m, lo, hi = paired_interval(a.tolist(), b.tolist())
        assert m == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - half, abs=1e-3)
        assert hi == pytest.approx(d.mean() + half, abs=1e-3)
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert math.isnan(mean_sd([1.0])[1]) and all(math.isnan(v) for v in paired_interval([1.0], [0.5])[1:])
    # a consistent gain over seeds exceeds the noise; the same mean gain with a wild spread does not
    clear = seed_noise_report({"erm": [0.70, 0.72, 0.71], "roga": [0.75, 0.77, 0.76]}, "AUC", True)
    assert any("roga - erm" in ln and "exceeds seed noise" in ln for ln in clear)
    noisy = seed_noise_report({"erm": [0.70, 0.80, 0.60], "roga": [0.80, 0.70, 0.75]}, "AUC", True)
    assert any("roga - erm" in ln and "within seed noise" in ln for ln in noisy)
    assert "differences between the methods are within seed noise" in noisy[-1]
    one = seed_noise_report({"erm": [0.7], "roga": [0.8]}, "AUC", True)
    assert len(one) == 1 and "cannot be told apart from seed noise" in one[0] and "--seeds" in one[0]


def test_comparisons_start_the_longest_runs_first(monkeypatch, tmp_path):
    """Two-pass methods (SAM, RoGA, DPDA) take about twice ERM's time: started last, one of
    them would run alone on a core at the end of a comparison."""
    from roga_cuda.apps.common.cli import RunSpec, launch_order
    from roga_cuda.apps.image import cli as image_cli
    from roga_cuda.apps.speech import cli as speech_cli
    specs = [RunSpec(f"{m}, seed {s}", "image", "x:y", {}, "out", cost=c)
             for s in (0, 1) for m, c in (("erm", 1.0), ("sam", 2.0), ("roga", 2.0))]
    order = [specs[i].name for i in launch_order(specs)]
    assert order == ["sam, seed 0", "roga, seed 0", "sam, seed 1", "roga, seed 1", "erm, seed 0", "erm, seed 1"]
    assert launch_order([]) == [] and RunSpec("a", "b", "c", {}, "d").cost == 1.0

    class Planned(Exception):
        pass

    def plan(specs, jobs, **kw):  # the apps' comparisons, stopped before anything trains
        raise Planned([(s.name.split(",")[0], s.cost) for s in specs])

    for mod, main, methods, want in (
            (image_cli, image_cli.train_main, "erm,sam,roga", {"erm": 1.0, "sam": 2.0, "roga": 2.0}),
            (speech_cli, speech_cli.train_main, "baseline,dpda", {"baseline": 1.0, "dpda-pcgrad": 2.0})):
        monkeypatch.setattr(mod, "run_all", plan)
        with pytest.raises(Planned) as e:
            main(["--preset", "smoke", "--compare", methods, "--seeds", "0,1", "--out", str(tmp_path / methods)])
        assert dict(e.value.args[0]) == want and len(e.value.args[0]) == 2 * len(want)


# ----------------------------------------------------------------------- loop utilities
def test_schedule_and_early_stopping():
    assert lr_factor(0, 100, "cosine", warmup_steps=4) == pytest.approx(0.2)
    assert lr_factor(4, 100, "cosine", warmup_steps=4) == pytest.approx(1.0)
    assert lr_factor(100, 100, "cosine", warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(25, 100, "step", step_size=10, gamma=0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(0, 10, "linear-ish")
    es = EarlyStopping(patience=2, mode="min")
    assert es.update(0.5) and not es.update(0.6) and not es.should_stop
    assert not es.update(float("nan")) and es.should_stop and es.best == 0.5
    # ties on the monitored value go to the lower tiebreak (the speech app: dev EER, then dev loss)
    es = EarlyStopping(patience=3, mode="min")
    assert es.update(0.2, 1, tiebreak=0.9) and es.update(0.2, 2, tiebreak=0.8)
    assert not es.update(0.2, 3, tiebreak=0.8) and not es.update(0.2, 4, tiebreak=float("nan"))
    assert es.best_step == 2 and es.bad == 2
    es2 = EarlyStopping(patience=3, mode="min")
    es2.load_state_dict(es.state_dict())
    assert not es2.update(0.2, 5, tiebreak=0.85) and es2.update(0.2, 6, tiebreak=0.1)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)


def test_batch_stream_is_a_function_of_the_step():
    s = BatchStream(23, 4, seed=1, key="d0")
    seen = np.concatenate([s.indices(k) for k in range(s.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 20  # an epoch without repeats
    assert np.array_equal(BatchStream(23, 4, seed=1, key="d0").indices(13), s.indices(13))
    assert not np.array_equal(s.indices(0), s.indices(s.steps_per_epoch))  # reshuffled per epoch
    r0, r1 = BatchStream(23, 2, 1, "d0", rank=0, world_size=2), BatchStream(23, 2, 1, "d0", rank=1, world_size=2)
    assert np.array_equal(np.r_[r0.indices(3), r1.indices(3)], s.indices(3))  # ranks split the global batch
    es = EpochSampler(10, seed=0, rank=1, world_size=2)
    es.set_epoch(3)
    full = list(es)
    es.set_start(2)
    assert list(es) == full[2:] and len(es) == 3


def test_metric_logger_resume_drops_later_rows(tmp_path):
    log = MetricLogger(str(tmp_path), tensorboard=False)
    for s in range(1, 6):
        log.log(s, loss=1.0 / s, **({"auc": 0.5} if s == 3 else {}))
    log.close()
    cols = read_log(str(tmp_path / "log.csv"))
    assert cols["step"] == [1, 2, 3, 4, 5] and cols["auc"] == [None, None, 0.5, None, None]
    log = MetricLogger(str(tmp_path), tensorboard=False, resume_step=3)
    log.log(4, loss=9.0)
    log.close()
    assert read_log(str(tmp_path / "log.csv"))["loss"] == [1.0, 0.5, 1 / 3, 9.0]


# ------------------------------------------------------------------------ exact resume
def _resume_run(folder, total, stop_after=None, resume=False, optimizer="roga"):
    """A tiny multi-domain loop built only from the shared pieces (RNG-consuming dropout,
    BatchNorm, momentum, LR schedule, checkpoints every 2 steps)."""
    from roga_cuda.optim import RoGA, SAM, freeze_bn_stats
    from roga_cuda.apps.common import seed_everything
    seed_everything(5)
    if resume:  # a different init: everything must come from the checkpoint
        torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Dropout(0.3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    model(torch.zeros(1, 3, 6, 6))
    if optimizer == "roga":
        opt = RoGA(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.1, alpha=1e-3)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05)
    sched = build_scheduler(opt, "cosine", total_steps=total, warmup_steps=2)
    es = EarlyStopping(patience=100)
    ck = Checkpointer(str(folder), every=2, keep=0)
    data = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 3, 6, 6, generator=data) + d for d in range(2)]
    ys = [(torch.rand(30, generator=data) > 0.5).float() for _ in range(2)]
    streams = [BatchStream(30, 8, seed=5, key=f"d{d}") for d in range(2)]
    step = 0
    if resume:
        state, _ = ck.load("auto")
        step = restore_state(state, model=model, optimizer=opt, scheduler=sched, early_stopping=es)["step"]
    lossf = torch.nn.BCEWithLogitsLoss()
    while step < total:
        opt.zero_grad()
        batches = [(xs[d][streams[d].indices(step)], ys[d][streams[d].indices(step)]) for d in range(2)]
        if optimizer == "roga":
            for x, y in batches:
                lossf(model(x).squeeze(1), y).backward()
                opt.perturb()
                with freeze_bn_stats(model):
                    lossf(model(x).squeeze(1), y).backward()
                opt.accumulate()
            opt.step()
        else:
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            lossf(model(x).squeeze(1), y).backward()
            opt.first_step(zero_grad=True)
            with freeze_bn_stats(model):
                lossf(model(x).squeeze(1), y).backward()
            opt.second_step(zero_grad=True)
        sched.step()
        step += 1
        es.update(-step, step)
        if ck.due(step):
            ck.save(step, capture_state(model=model, optimizer=opt, scheduler=sched, early_stopping=es,
                                        counters={"step": step}))
        if stop_after is not None and step >= stop_after:
            break
    return model, opt


@pytest.mark.parametrize("optimizer", ["roga", "sam"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    full, full_opt = _resume_run(tmp_path / "a", total=7, optimizer=optimizer)
    _resume_run(tmp_path / "b", total=7, stop_after=5, optimizer=optimizer)  # last checkpoint: step 4
    assert latest_checkpoint(tmp_path / "b").endswith("step_00000004.pt")
    resumed, res_opt = _resume_run(tmp_path / "b", total=7, resume=True, optimizer=optimizer)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = full_opt.state_dict()["base"]["state"], res_opt.state_dict()["base"]["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert full_opt.param_groups[0]["lr"] == res_opt.param_groups[0]["lr"]


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from roga_cuda.apps.common.plots import plot_det, plot_roc, plot_training_curves
    rs = np.random.RandomState(0)
    y = rs.randint(0, 2, 200)
    curves = {"a": (y, rs.rand(200) + y), "one class": (np.ones(5, int), rs.rand(5))}
    for fn, name in ((plot_roc, "roc.png"), (plot_det, "det.png")):
        p = fn(curves, str(tmp_path / name))
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    p = plot_training_curves({"step": [1, 2, 3], "loss": [1.0, 0.5, None], "auc": [None, 0.7, 0.8]},
                             str(tmp_path / "curves.png"))
    assert os.path.getsize(p) > 1000
