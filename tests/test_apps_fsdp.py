"""Both apps with ``train.fsdp=true`` (FSDP2): gloo, 2 processes on CPU.

One pair of processes runs every scenario (start-up and imports are most of the cost), as
tests/test_fsdp.py does: rendezvous through a file in a temporary directory (no TCP port),
each scenario caught on its own, a deadline for the whole run. Per app (image: RoGA over 2
domains on Meso4, a small CNN whose layers are sharded one by one; speech: DPDA with PCGrad
on a tiny AASIST, whose encoder blocks are sharded one by one):

* ``full``: an uninterrupted run with sharded checkpoints, validation, best-model files and
  the final evaluation;
* ``crash``: the same run, killed while writing a checkpoint (every rank's shards and DCP's
  metadata are on disk, the folder is not yet renamed into place): the half-written
  checkpoint is left behind;
* ``resume``: ``--resume`` in that folder: it continues from the last complete checkpoint
  and ends with the same weights, logs and metrics as ``full``.

Then rank 0 alone (a one-process group) resumes the image run from the checkpoint the two
processes wrote after step 2 (DCP reshards it), and the model files are scored by
``roga-eval`` / ``dpda-eval`` in this (single, non-distributed) test process.
"""
import json
import os
import shutil
import sys
import tempfile
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

from util import run_scenarios, spawn_and_wait

WORLD = 2
DEADLINE_S = 400
IMAGE_STEPS, IMAGE_KILL = 6, 4   # checkpoints every 2 steps; killed while writing step 4's
SPEECH_KILL = 6                  # speech: 4 steps/epoch, checkpoints every 2 steps and at epoch ends
IMAGE = ["method=roga", "model.arch=meso4", f"train.steps={IMAGE_STEPS}", "train.eval_every=3", "train.checkpoint_every=2",
         "train.keep_checkpoints=0", "train.log_every=1", "eval.select=best", "runtime.device=cpu",
         "runtime.threads=1", "runtime.progress=false", "data.synthetic.videos=[4,2,2]", "data.synthetic.frames=4",
         "train.fsdp=true"]
SPEECH = ["method=dpda", "optim.align=pcgrad", "data.n_samples=2000", "data.synthetic.scale=0.05", "train.epochs=2",
          "train.batch_size=8", "train.checkpoint_every=2", "train.log_every=3", "eval.batch_size=32",
          "runtime.device=cpu", "runtime.threads=1", "runtime.progress=false", "runtime.tensorboard=false",
          "train.fsdp=true"]


class _Killed(RuntimeError):
    """Stands for the processes dying in the middle of a checkpoint."""


def _config(app, tmp):
    from roga_cuda.apps.common.config import load_config
    over = IMAGE if app == "image" else SPEECH + [f"data.synthetic.cache_dir={os.path.join(tmp, 'cache')}"]
    return load_config("smoke", overrides=over, app=app)


def _train(app, tmp, out, resume=None):
    lines = []
    cfg = _config(app, tmp)
    if app == "image":
        from roga_cuda.apps.image.train import train
        train(cfg, out, resume=resume, log=lines.append)
    else:
        from roga_cuda.apps.speech.train import train
        train(cfg, out, resume=resume, log=lines.append)
    return lines


def _crash(app, tmp, out, kill_step):
    """A run that dies after the shards of step ``kill_step``'s checkpoint are written."""
    import torch.distributed.checkpoint as dcp
    real = dcp.save

    def dying(state, checkpoint_id=None, **kw):
        real(state, checkpoint_id=checkpoint_id, **kw)
        if os.path.basename(str(checkpoint_id)) == f".step_{kill_step:08d}.partial":
            raise _Killed(checkpoint_id)
    dcp.save = dying
    try:
        _train(app, tmp, out)
    except _Killed:
        return {"killed": True, "left": sorted(os.listdir(os.path.join(out, "checkpoints")))}
    finally:
        dcp.save = real
    return {"killed": False}


def _scenarios(rank, tmp):
    out = {}
    for app, kill in (("image", IMAGE_KILL), ("speech", SPEECH_KILL)):
        out[f"{app}-full"] = lambda app=app: {"log": _train(app, tmp, os.path.join(tmp, app, "full"))}
        out[f"{app}-crash"] = lambda app=app, kill=kill: _crash(app, tmp, os.path.join(tmp, app, "crash"), kill)
        out[f"{app}-resume"] = lambda app=app: {"log": _train(app, tmp, os.path.join(tmp, app, "crash"), "auto")}
    out["image-mismatch"] = lambda: _mismatch(tmp)
    return out


def _mismatch(tmp):
    """Another model (ResNet-34 for Meso4) resuming a sharded checkpoint: the error."""
    from roga_cuda.apps.common.config import load_config
    from roga_cuda.apps.image.train import train
    cfg = load_config("smoke", overrides=IMAGE + ["model.arch=resnet34", "model.width=8"], app="image")
    try:
        train(cfg, os.path.join(tmp, "image", "mismatch"),
              resume=os.path.join(tmp, "image", "full", "checkpoints", "step_00000002"), log=lambda s: None)
    except ValueError as e:
        return {"message": str(e)}
    return {"message": None}


def _resharded(tmp):
    """Rank 0 alone, on a one-process group: resume the image run from the checkpoint two
    processes wrote after step 2; records the whole model right after the restore."""
    from roga_cuda.apps.common.sharding import full_state_dict
    from roga_cuda.apps.image.train import ImageTrainer
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(k, None)
    out = os.path.join(tmp, "image", "one")
    os.makedirs(os.path.join(out, "checkpoints"))
    src = os.path.join(tmp, "image", "full", "checkpoints", "step_00000002")
    shutil.copytree(src, os.path.join(out, "checkpoints", "step_00000002"))
    real_start = ImageTrainer.start

    def start(self):
        torch.save(full_state_dict(self.model), os.path.join(tmp, "resharded-loaded.pt"))
        return real_start(self)
    ImageTrainer.start = start
    try:
        lines = _train("image", tmp, out, "auto")
    finally:
        ImageTrainer.start = real_start
    return {"log": lines, "initialized_after": dist.is_initialized()}


def _no_render(fig, path):
    """Stands in for the PNG rendering (most of a tiny run's time here; drawing the plots is
    tested in tests/test_image_app.py and tests/test_speech_app.py): an empty file."""
    import matplotlib.pyplot as plt
    plt.close(fig)
    open(path, "wb").close()
    return path


def _worker(rank, tmp):
    import roga_cuda.apps.common.plots as common_plots
    import roga_cuda.apps.speech.plots as speech_plots
    common_plots._save = speech_plots._save = _no_render
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    run_scenarios(_scenarios(rank, tmp).items(), rank, tmp)
    dist.barrier()
    if rank == 0:
        dist.destroy_process_group()
        try:
            res = _resharded(tmp)
        except BaseException:
            res = {"error": traceback.format_exc()}
        torch.save(res, os.path.join(tmp, "resharded.0.pt"))
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown at exit (see tests/test_ddp.py)


@pytest.fixture(scope="module")
def runs():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("yaml")
    with tempfile.TemporaryDirectory() as tmp:
        spawn_and_wait(_worker, WORLD, (tmp,), DEADLINE_S, "the 2-process FSDP app runs")
        res = {}
        for name in list(_scenarios(0, tmp)) + ["resharded"]:
            ranks = range(1) if name == "resharded" else range(WORLD)
            res[name] = [torch.load(os.path.join(tmp, f"{name}.{r}.pt"), weights_only=False) for r in ranks]
        yield tmp, res


def _ok(res, name):
    for r, x in enumerate(res[name]):
        assert "error" not in x, f"rank {r}, {name}:\n{x['error']}"
    return res[name]


def _load(path):
    from roga_cuda.apps.common import load_checkpoint
    return load_checkpoint(path)


def _same_weights(a, b, what):
    assert a.keys() == b.keys(), what
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{what}: {k} differs"


def _metrics(path):
    with open(path) as f:
        return json.load(f)


def test_image_resume_after_a_crash_equals_the_uninterrupted_run(runs):
    tmp, res = runs
    _ok(res, "image-full")
    crashed = _ok(res, "image-crash")
    assert all(r["killed"] for r in crashed)
    # the half-written checkpoint was left behind (shards and DCP metadata, not renamed) ...
    assert crashed[0]["left"] == [f".step_{IMAGE_KILL:08d}.partial", "step_00000002"], crashed[0]["left"]
    resumed = _ok(res, "image-resume")
    full, crash = os.path.join(tmp, "image", "full"), os.path.join(tmp, "image", "crash")
    # ... and passed over: the run went on from step 2
    assert any("continuing roga at step 2 of 6" in line for line in resumed[0]["log"]), resumed[0]["log"]
    for f in ("final.pt", "best.pt"):
        a, b = _load(os.path.join(full, f)), _load(os.path.join(crash, f))
        assert a["step"] == b["step"] and a["which"] == b["which"]
        _same_weights(a["model"], b["model"], f)
    ma, mb = _metrics(os.path.join(full, "metrics.json")), _metrics(os.path.join(crash, "metrics.json"))
    assert ma["world_size"] == 2 and ma["steps"] == IMAGE_STEPS
    assert ma["in_domain"] == mb["in_domain"] and ma["cross_domain"] == mb["cross_domain"]
    assert ma["selected"] == mb["selected"]
    from roga_cuda.apps.common import read_log
    la, lb = read_log(os.path.join(full, "log.csv")), read_log(os.path.join(crash, "log.csv"))
    assert la["train_loss"] == lb["train_loss"] and la["val_auc_mean"] == lb["val_auc_mean"]
    assert len([v for v in la["train_loss"] if v is not None]) == IMAGE_STEPS
    # checkpoints are sharded folders: one file of shards per rank, DCP's metadata, trainer.pt
    ck = os.path.join(full, "checkpoints", f"step_{IMAGE_STEPS:08d}")
    names = set(os.listdir(ck))
    assert {".metadata", "trainer.pt"} <= names and len([n for n in names if n.endswith(".distcp")]) == WORLD


def test_image_outputs_and_roga_eval_in_one_process(runs):
    tmp, res = runs
    _ok(res, "image-full")
    full = os.path.join(tmp, "image", "full")
    for f in ("metrics.json", "log.csv", "roc.png", "det.png", "scores/hq.csv", "config.yaml"):
        assert os.path.isfile(os.path.join(full, f)), f
    m = _metrics(os.path.join(full, "metrics.json"))
    assert m["selected"]["which"] == "best"
    # best.pt holds the whole model (gathered from the shards): roga-eval scores it in one process
    from roga_cuda.apps.image import cli
    best = _load(os.path.join(full, "best.pt"))
    assert all(not type(v).__name__ == "DTensor" for v in best["model"].values())
    assert cli.eval_main([os.path.join(full, "best.pt"), "--out", os.path.join(tmp, "image-eval")]) == 0
    e = _metrics(os.path.join(tmp, "image-eval", "metrics.json"))
    for part in ("in_domain", "cross_domain"):
        for dom, r in m[part].items():
            assert e[part][dom]["auc"] == pytest.approx(r["auc"], abs=1e-6), (part, dom)
    # a sharded checkpoint folder is not a model file: a clear error
    assert cli.eval_main([os.path.join(full, "checkpoints", "step_00000002"), "--out",
                          os.path.join(tmp, "image-eval-bad")]) == 2


def test_image_resumes_resharded_on_one_process(runs):
    """The checkpoint two processes wrote after step 2, resumed by one: the restored model
    is the one that was saved (DCP reshards it), and the run finishes."""
    tmp, res = runs
    one = _ok(res, "resharded")[0]
    assert any("written by 2 process(es), this run has 1: resharded" in line for line in one["log"]), one["log"]
    assert not one["initialized_after"], "the one-process group the run started was not ended"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    saved = os.path.join(tmp, "saved-step2.pt")
    dcp_to_torch_save(os.path.join(tmp, "image", "full", "checkpoints", "step_00000002"), saved)
    want = torch.load(saved, weights_only=False)["model"]
    got = torch.load(os.path.join(tmp, "resharded-loaded.pt"), weights_only=False)
    _same_weights({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in got.items()}, want,
                  "restored on one process")
    m = _metrics(os.path.join(tmp, "image", "one", "metrics.json"))
    assert m["world_size"] == 1 and m["steps"] == IMAGE_STEPS


def test_speech_resume_after_a_crash_equals_the_uninterrupted_run(runs):
    tmp, res = runs
    _ok(res, "speech-full")
    crashed = _ok(res, "speech-crash")
    assert all(r["killed"] for r in crashed)
    assert crashed[0]["left"] == [f".step_{SPEECH_KILL:08d}.partial", "step_00000002", "step_00000004"], \
        crashed[0]["left"]
    resumed = _ok(res, "speech-resume")
    full, crash = os.path.join(tmp, "speech", "full"), os.path.join(tmp, "speech", "crash")
    assert any("at step 4 of 8" in line for line in resumed[0]["log"]), resumed[0]["log"]
    _same_weights(_load(os.path.join(full, "model_avg.pt"))["model"], _load(os.path.join(crash, "model_avg.pt"))["model"],
                  "model_avg.pt")
    assert sorted(os.listdir(os.path.join(full, "best"))) == sorted(os.listdir(os.path.join(crash, "best")))
    for f in os.listdir(os.path.join(full, "best")):
        _same_weights(_load(os.path.join(full, "best", f))["model"], _load(os.path.join(crash, "best", f))["model"], f)
    with open(os.path.join(full, "steps.csv")) as a, open(os.path.join(crash, "steps.csv")) as b:
        sa = a.read()
        assert sa == b.read()
    assert sa.count("\n") == 1 + 8
    ma, mb = _metrics(os.path.join(full, "metrics.json")), _metrics(os.path.join(crash, "metrics.json"))
    for k in ("eer", "conflict_rate", "conflict_rate_by_epoch", "averaged_epochs", "sets"):
        assert ma[k] == mb[k], k
    assert ma["steps"] == 8 and ma["steps_per_epoch"] == 4 and 0 <= ma["conflict_rate"] <= 1


def test_speech_model_avg_scores_the_same_in_one_process(runs):
    """dpda-eval (one process, no torch.distributed) on model_avg.pt, which the two processes
    gathered from their shards: the same test-set EER as the run's final evaluation."""
    tmp, res = runs
    _ok(res, "speech-full")
    full = os.path.join(tmp, "speech", "full")
    from roga_cuda.apps.speech.cli import eval_main
    out = os.path.join(tmp, "speech-eval")
    assert eval_main(["--checkpoint", os.path.join(full, "model_avg.pt"), "--out", out]) == 0
    m, e = _metrics(os.path.join(full, "metrics.json")), _metrics(os.path.join(out, "metrics.json"))
    assert e["main_set"] == m["main_set"]
    for name, r in m["sets"].items():
        assert e["sets"][name]["eer"] == pytest.approx(r["eer"], abs=1e-6), name
    assert os.path.isfile(os.path.join(full, "det.png")) and os.listdir(os.path.join(full, "scores"))


def test_bad_fsdp_settings_are_refused():
    from roga_cuda.apps.common.config import load_config
    from roga_cuda.apps.image.train import ImageTrainer
    from roga_cuda.apps.speech.train import validate
    for over, text in ((["optim.sam_sync_first_pass=true", "method=sam"], "is a DDP setting"),
                       (["method=roga", "optim.alignment=hvp"], "use optim.alignment=first_order"),
                       (["optim.strategy=swap"], "optim.strategy=swap is not possible")):
        cfg = load_config("smoke", overrides=over + ["train.fsdp=true"], app="image")
        with pytest.raises(ValueError, match=text):
            ImageTrainer.check_config(ImageTrainer.__new__(ImageTrainer), cfg)
    cfg = load_config("smoke", overrides=["method=baseline", "train.probe_conflict_every=2", "train.fsdp=true"],
                      app="speech")
    with pytest.raises(ValueError, match="probe_conflict_every is not supported with train.fsdp"):
        validate(cfg)
    # FSDP2 shards contiguous parameters only: refused before anything is built
    cfg = load_config("smoke", overrides=["runtime.channels_last=true", "train.fsdp=true"], app="image")
    with pytest.raises(ValueError, match="runtime.channels_last is not supported with train.fsdp"):
        ImageTrainer(cfg, "/nonexistent-run-folder")


def test_a_checkpoint_that_does_not_fit_gets_a_clear_error(runs):
    tmp, res = runs
    for r in _ok(res, "image-mismatch"):
        assert r["message"] and "the checkpoint does not fit this run's model/optimizer" in r["message"], r


def test_sharded_and_whole_checkpoints_are_not_mixed(runs, tmp_path):
    """A run without train.fsdp refuses a sharded checkpoint folder, and a train.fsdp run
    (here one process, on the one-process group it starts and ends) a whole-model
    checkpoint, in one line, before anything is loaded."""
    tmp, _ = runs
    from roga_cuda.apps.common.config import load_config
    from roga_cuda.apps.image.train import train
    cfg = load_config("smoke", overrides=[o for o in IMAGE if o != "train.fsdp=true"], app="image")
    with pytest.raises(ValueError, match="is sharded .written with train.fsdp=true.: resume it with train.fsdp=true"):
        train(cfg, str(tmp_path / "plain"), resume=os.path.join(tmp, "image", "full", "checkpoints", "step_00000002"),
              log=lambda s: None)
    plain = str(tmp_path / "whole")
    train(load_config("smoke", overrides=[o for o in IMAGE if o != "train.fsdp=true"] + ["train.steps=2"], app="image"),
          plain, log=lambda s: None)
    with pytest.raises(ValueError, match="is a whole-model checkpoint .written without train.fsdp.: resume it without"):
        train(load_config("smoke", overrides=IMAGE, app="image"), str(tmp_path / "sharded"),
              resume=os.path.join(plain, "checkpoints", "step_00000002.pt"), log=lambda s: None)
    assert not dist.is_initialized(), "the one-process group was left behind"
