"""The image app end to end: training per optimizer, resume, loaders, corrupt files,
DDP with two gloo processes, roga-eval, backbones and the synthetic data."""
import json
import os
import socket

import numpy as np
import pytest
import torch

from roga_cuda.apps.common import load_checkpoint
from roga_cuda.apps.common.config import load_config
from roga_cuda.apps.image import cli, data as data_mod
from roga_cuda.apps.image.models import ResNet34, build_model
from roga_cuda.apps.image.synthetic import generate

from util import interrupt_after_checkpoint

CL = torch.channels_last

# Tiny runs: 3 steps, 32 px, a few videos; one synthetic dataset shared by the tests (in-process cache).
TINY = ["runtime.threads=1", "train.steps=3", "train.eval_every=0", "train.log_every=1", "runtime.progress=false",
        "data.synthetic.videos=[4,2,2]", "data.synthetic.frames=4"]


def _train(out, *extra, preset="smoke"):
    code = cli.train_main(["--preset", preset, "--out", str(out), *TINY, *extra])
    assert code == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _params(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("optimizer", ["erm", "sam", "gsam", "wsam", "fsam", "looksam", "roga"])
def test_end_to_end_per_optimizer(tmp_path, optimizer):
    m = _train(tmp_path, f"method={optimizer}")
    assert m["method"] == optimizer and m["steps"] == 3
    assert set(m["in_domain"]) == {"blend", "color"} and set(m["cross_domain"]) == {"upsample", "hq"}
    for part in ("in_domain", "cross_domain"):
        for dom, res in m[part].items():
            for k in ("auc", "video_auc", "eer", "ap", "acc"):
                assert 0.0 <= res[k] <= 1.0, (part, dom, k, res[k])
            assert res["n_pos"] > 0 and res["n_neg"] > 0 and res["n_videos"] == 4
    for f in ("config.yaml", "log.csv", "roc.png", "det.png", "training_curves.png", "final.pt", "best.pt",
              "scores/hq.csv"):
        assert (tmp_path / f).is_file(), f
    cfg = load_config(path=str(tmp_path / "config.yaml"), app="image")  # the resolved config round-trips
    assert cfg.method == optimizer and cfg.train.steps == 3
    # the parameters moved from the seed's initialisation and are finite; the loss was finite
    torch.manual_seed(0)
    init = build_model("resnet34", 32, 8).state_dict()
    from roga_cuda.apps.common import read_log
    losses = [v for v in read_log(str(tmp_path / "log.csv"))["train_loss"] if v is not None]
    assert len(losses) == 3 and all(np.isfinite(losses))
    final = _params(tmp_path / "final.pt")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert not torch.equal(final["conv1.weight"], init["conv1.weight"])


def test_roga_hvp_alignment_and_clipping_run(tmp_path):
    m = _train(tmp_path, "method=roga", "optim.alignment=hvp", "optim.max_grad_norm=1.0", "train.steps=2")
    assert m["steps"] == 2 and np.isfinite(m["summary"]["in_domain"]["auc_mean"])


def test_early_stopping(tmp_path):
    # lr 0: only BatchNorm statistics move, the validation AUC soon stops improving
    from roga_cuda.apps.common import read_log
    m = _train(tmp_path, "method=erm", "optim.lr=0.0", "train.steps=60", "train.eval_every=1",
               "train.patience=2", "eval.select=best")
    assert m["stopped_early"] and m["steps"] < 60
    log = read_log(str(tmp_path / "log.csv"))
    vals = [(int(s), v) for s, v in zip(log["step"], log["val_auc_mean"]) if v is not None]
    best_step, best = vals[0]
    for st, v in vals[1:]:  # the first strict improvement wins
        if v > best:
            best_step, best = st, v
    assert vals[-1][0] == m["steps"] == best_step + 2  # stopped after exactly `patience` evaluations without gain
    assert m["selected"]["which"] == "best" and m["selected"]["step"] == best_step
    assert m["selected"]["val_value"] == pytest.approx(best)


def test_python_m_entry_point(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "roga_cuda.apps.image", "--preset", "smoke", "--out", str(tmp_path),
                        *TINY, "train.steps=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| method |" in r.stdout and (tmp_path / "metrics.json").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (AMP is off on CPU)")
@pytest.mark.parametrize("optimizer", ["erm", "sam", "roga"])
def test_cuda_amp(tmp_path, optimizer):
    m = _train(tmp_path, f"method={optimizer}", "runtime.device=cuda", "runtime.amp=true", "train.steps=4")
    assert m["device"].startswith("cuda") and np.isfinite(m["summary"]["in_domain"]["auc_mean"])


def test_training_is_deterministic_and_optimizers_differ(tmp_path):
    _train(tmp_path / "a", "method=roga")
    _train(tmp_path / "b", "method=roga")
    _train(tmp_path / "c", "method=sam")
    pa, pb, pc = (_params(tmp_path / n / "final.pt") for n in "abc")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["fc.weight"], pc["fc.weight"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_resume_after_interruption_is_exact(tmp_path, monkeypatch, channels_last):
    extra = ["method=roga", "train.steps=6", "train.checkpoint_every=2", "train.eval_every=3",
             "train.keep_checkpoints=0", "data.synthetic.videos=[4,2,2]", f"runtime.channels_last={channels_last}"]
    _train(tmp_path / "full", *extra)
    # a fresh run into a folder with an earlier run's checkpoints is refused (they would mix)
    assert cli.train_main(["--preset", "smoke", "--out", str(tmp_path / "full"), *TINY, *extra]) == 2
    cut = ["--preset", "smoke", "--out", str(tmp_path / "cut"), *TINY, *extra]
    interrupt_after_checkpoint(monkeypatch, lambda: cli.train_main(cut), step=4)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step_00000002.pt", "step_00000004.pt"]
    m = _train(tmp_path / "cut", *extra, "--resume")
    full, resumed = _params(tmp_path / "full" / "final.pt"), _params(tmp_path / "cut" / "final.pt")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    convs = [v for v in full.values() if v.dim() == 4 and v.is_contiguous() != v.is_contiguous(memory_format=CL)]
    assert convs and all(v.is_contiguous(memory_format=CL) == channels_last for v in convs)  # the layout reached them
    with open(tmp_path / "full" / "metrics.json") as f:
        ref = json.load(f)
    assert m["in_domain"] == ref["in_domain"] and m["selected"] == ref["selected"]
    # the log holds each step once (rows after the step-4 checkpoint were dropped and rewritten)
    from roga_cuda.apps.common import read_log
    a, b = read_log(str(tmp_path / "full" / "log.csv")), read_log(str(tmp_path / "cut" / "log.csv"))
    assert a["step"] == b["step"] == [1, 2, 3, 3, 4, 5, 6, 6]  # train rows + validation rows at 3 and 6
    assert a["train_loss"] == b["train_loss"] and a["val_auc_mean"] == b["val_auc_mean"]


def test_cli_rejects_unknown_keys(tmp_path, capsys):
    assert cli.train_main(["--preset", "smoke", "--out", str(tmp_path), "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean optim.lr" in err
    assert cli.train_main(["--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "smoke" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- loaders
def _write_png(path, arr):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def faces():
    ds = generate(seed=3, image_size=32, videos=(2, 2, 2), frames=2, train_methods=["blend"], test_methods=[])
    return ds.images.permute(0, 2, 3, 1).numpy()


def _make_folder(root, faces, domains=("dfA", "dfB", "heldout"), videos=6, frames=3):
    k = 0
    for d in domains:
        for label in ("real", "fake"):
            for v in range(videos):
                for f in range(frames):
                    ext = "png" if f % 2 == 0 else "jpg"
                    _write_png(os.path.join(root, d, label, f"{d[:2]}{label}{v:02d}", f"{f:03d}.{ext}"),
                               faces[k % len(faces)])
                    k += 1


def test_folder_layout(tmp_path, faces):
    root = tmp_path / "faces"
    _make_folder(str(root), faces)
    cfg = load_config("smoke", overrides=[f"data.root={root}", "data.source=folder", "data.train_domains=[dfA,dfB]",
                                          "data.test_domains=[heldout]", "data.split=[0.5,0.25,0.25]"], app="image")
    data = data_mod.build_image_data(cfg)
    assert [d.name for d in data.train_domains] == ["dfA", "dfB"] and data.test_domains[0].name == "heldout"
    held = data.test_domains[0].splits["test"]
    assert len(held) == 36 and held.labels.sum() == 18 and len(set(held.videos)) == 12
    for dom in data.train_domains:
        seen = set()
        for split, fs in dom.splits.items():
            vids = set(fs.videos)
            assert not (vids & seen), "a video in two splits"
            seen |= vids
            for v in vids:  # every frame of a video has the video's label
                assert len(set(fs.labels[fs.videos == v])) == 1
        assert sum(len(fs) for fs in dom.splits.values()) == 36
    x, y = held[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y in (0, 1)
    big = load_config("smoke", overrides=[f"data.root={root}", "data.source=folder", "data.train_domains=[dfA]",
                                          "data.test_domains=[]", "data.image_size=48", "data.frames_per_video=2"],
                      app="image")
    fs = data_mod.build_image_data(big).train_domains[0]
    assert sum(len(s) for s in fs.splits.values()) == 24  # 2 of 3 frames per video
    assert fs.splits["train"][0][0].shape == (3, 48, 48)  # resized on load


def test_folder_layout_trains_and_roga_eval(tmp_path, faces):
    root = tmp_path / "faces"
    _make_folder(str(root), faces, videos=8)
    ov = [f"data.root={root}", "data.source=folder", "data.train_domains=[dfA,dfB]", "data.test_domains=[heldout]",
          "data.split=[0.5,0.25,0.25]", "data.workers=0", "method=roga", "eval.select=last"]
    m = _train(tmp_path / "run", *ov)
    assert set(m["cross_domain"]) == {"heldout"}
    assert "path" in (tmp_path / "run" / "scores" / "heldout.csv").read_text().splitlines()[0]
    # roga-eval on the final checkpoint reproduces the run's numbers (select=last: same weights)
    assert cli.eval_main([str(tmp_path / "run" / "final.pt"), "--out", str(tmp_path / "ev")]) == 0
    with open(tmp_path / "ev" / "metrics.json") as f:
        ev = json.load(f)
    assert ev["in_domain"] == m["in_domain"] and ev["cross_domain"] == m["cross_domain"]
    # ... and scores another dataset given by overrides
    assert cli.eval_main([str(tmp_path / "run" / "final.pt"), "--out", str(tmp_path / "ev2"),
                          "data.train_domains=[dfB]", "data.test_domains=[dfA]"]) == 0
    with open(tmp_path / "ev2" / "metrics.json") as f:
        assert set(json.load(f)["cross_domain"]) == {"dfA"}


def test_roga_eval_scores_in_the_runs_weight_layout(tmp_path, monkeypatch):
    """A run trained with runtime.channels_last is rescored by roga-eval in that layout (the
    checkpoint's config says so), so the rescored numbers are the run's own."""
    import roga_cuda.apps.image.train as T
    m = _train(tmp_path / "run", "runtime.channels_last=true", "eval.select=last", "method=sam")
    layouts, real = [], T.evaluate_domains

    def spy(model, *a, **k):
        w = [p for p in model.parameters() if p.dim() == 4 and p.is_contiguous() != p.is_contiguous(memory_format=CL)]
        layouts.append(bool(w) and all(p.is_contiguous(memory_format=CL) for p in w))
        return real(model, *a, **k)
    monkeypatch.setattr(T, "evaluate_domains", spy)
    assert cli.eval_main([str(tmp_path / "run" / "final.pt"), "--out", str(tmp_path / "ev")]) == 0
    with open(tmp_path / "ev" / "metrics.json") as f:
        ev = json.load(f)
    assert layouts == [True, True]  # in-domain and held-out sets
    assert ev["in_domain"] == m["in_domain"] and ev["cross_domain"] == m["cross_domain"]


def _dfb_json(tmp_path, faces):
    """A FaceForensics++-style JSON (compression level inside the split) and a Celeb-DF-style one,
    with frame paths relative to an rgb_dir."""
    rgb = tmp_path / "rgb"
    k = 0

    def frames(prefix, n=2):
        nonlocal k
        out = []
        for i in range(n):
            rel = f"{prefix}/{i:03d}.png"
            _write_png(str(rgb / rel), faces[k % len(faces)])
            k += 1
            out.append(rel)
        return out

    ff = {"FaceForensics++": {}}
    for lab in ("FF-real", "FF-DF", "FF-F2F"):
        ff["FaceForensics++"][lab] = {
            split: {"c23": {f"{lab}{split}{v}": {"label": lab, "frames": frames(f"ff/{lab}/{split}/{v}")}
                            for v in range(4)}}
            for split in ("train", "val", "test")}
    cdf = {"Celeb-DF-v2": {lab: {split: {f"{lab}{v}": {"label": lab, "frames": frames(f"cdf/{lab}/{split}/{v}")}
                                         for v in range(3)} for split in ("train", "test")}
                           for lab in ("CelebDFv2_real", "CelebDFv2_fake")}}
    paths = []
    for name, obj in (("FaceForensics++.json", ff), ("Celeb-DF-v2.json", cdf)):
        p = tmp_path / name
        p.write_text(json.dumps(obj))
        paths.append(str(p))
    return rgb, paths


def test_deepfakebench_json(tmp_path, faces):
    rgb, (ffj, cdfj) = _dfb_json(tmp_path, faces)
    cfg = load_config("smoke", overrides=["data.source=deepfakebench", f"data.root={rgb}", f"data.json=[{ffj},{cdfj}]",
                                          "data.train_domains=[FF-DF,FF-F2F]", "data.test_domains=[Celeb-DF-v2]"],
                      app="image")
    data = data_mod.build_image_data(cfg)
    df = data.train_domains[0]
    assert df.name == "FF-DF" and set(df.splits) == {"train", "val", "test"}
    tr = df.splits["train"]
    assert len(tr) == 16 and tr.labels.sum() == 8  # 4 real + 4 fake videos x 2 frames
    assert all(v.startswith("FaceForensics++/FF-") for v in tr.videos)
    real_df = set(tr.videos[tr.labels == 0])
    real_f2f = set(data.train_domains[1].splits["train"].videos[data.train_domains[1].splits["train"].labels == 0])
    assert real_df == real_f2f  # the real videos are shared by the FF++ domains
    cdf = data.test_domains[0].splits["test"]
    assert len(cdf) == 12 and cdf.labels.sum() == 6
    assert cdf[0][0].shape == (3, 32, 32)
    bad = load_config("smoke", overrides=["data.source=deepfakebench", f"data.root={rgb}", f"data.json=[{ffj}]",
                                          "data.compression=c40", "data.train_domains=[FF-DF]", "data.test_domains=[]"],
                      app="image")
    with pytest.raises(ValueError, match="c40"):
        data_mod.build_image_data(bad)
    unknown = load_config("smoke", overrides=["data.source=deepfakebench", f"data.root={rgb}", f"data.json=[{ffj}]",
                                              "data.train_domains=[FF-NT]", "data.test_domains=[]"], app="image")
    with pytest.raises(ValueError, match="FF-NT.*FF-DF"):
        data_mod.build_image_data(unknown)


def test_missing_and_corrupt_files(tmp_path, faces, capsys):
    rgb, (ffj, cdfj) = _dfb_json(tmp_path, faces)
    gone = rgb / "cdf" / "CelebDFv2_fake" / "test" / "1" / "001.png"
    os.unlink(gone)
    ov = ["data.source=deepfakebench", f"data.root={rgb}", f"data.json=[{ffj},{cdfj}]",
          "data.train_domains=[FF-DF]", "data.test_domains=[Celeb-DF-v2]"]
    with pytest.raises(FileNotFoundError, match="001.png"):
        data_mod.build_image_data(load_config("smoke", overrides=ov, app="image"))
    _write_png(str(gone), faces[0])
    corrupt = rgb / "ff" / "FF-DF" / "test" / "2" / "000.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = data_mod.build_image_data(load_config("smoke", overrides=ov, app="image"))
    fs = data.train_domains[0].splits["test"]
    i = fs.paths.index(os.path.normpath(str(corrupt)))
    with pytest.raises(data_mod.ImageReadError, match="000.png"):
        fs[i]
    # the CLI names the file too, and --skip-corrupt drops it and reports the count
    assert cli.train_main(["--preset", "smoke", "--out", str(tmp_path / "r1"), *TINY, *ov, "eval.select=last"]) == 2
    assert str(corrupt) in capsys.readouterr().err
    m = _train(tmp_path / "r2", *ov, "--skip-corrupt")
    assert m["skipped_corrupt"] == 1
    assert "skipped 1 unreadable" in capsys.readouterr().out


def _bomb_png(path, side):
    """A valid PNG header for a side x side 1-bit image with almost no data: Pillow knows its
    size as soon as it opens it (a 'decompression bomb' if it were decoded)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\0" + bytes((side + 7) // 8)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)) +
           chunk(b"IDAT", zlib.compress(row * 4)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def test_decompression_bomb_is_refused_and_skippable(tmp_path, faces):
    from PIL import Image
    assert 10000 ** 2 > Image.MAX_IMAGE_PIXELS  # Pillow warns above its limit and refuses above twice it
    for side in (20000, 10000):
        p = _bomb_png(tmp_path / f"bomb{side}.png", side)
        assert p.stat().st_size < 50_000
        with pytest.raises(data_mod.ImageReadError, match=f"bomb{side}.png.*decompression bomb"):
            data_mod.load_image(str(p), 32)
    rgb, (ffj, cdfj) = _dfb_json(tmp_path, faces)
    victim = rgb / "cdf" / "CelebDFv2_fake" / "test" / "1" / "001.png"
    _bomb_png(victim, 20000)
    ov = ["data.source=deepfakebench", f"data.root={rgb}", f"data.json=[{ffj},{cdfj}]",
          "data.train_domains=[FF-DF]", "data.test_domains=[Celeb-DF-v2]"]
    data = data_mod.build_image_data(load_config("smoke", overrides=ov + ["data.skip_corrupt=true"], app="image"))
    assert data.skipped == 1
    assert str(victim) not in data.test_domains[0].splits["test"].paths
    fs = data_mod.build_image_data(load_config("smoke", overrides=ov, app="image")).test_domains[0].splits["test"]
    with pytest.raises(data_mod.ImageReadError, match="001.png"):
        fs[fs.paths.index(os.path.normpath(str(victim)))]


# ------------------------------------------------------------------------------------- DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, optimizer, strategy, channels_last):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from roga_cuda.apps.image.train import train
    from roga_cuda.apps.common.runtime import cleanup_distributed
    cfg = load_config("smoke", overrides=TINY + [f"method={optimizer}", "train.eval_every=2", "runtime.device=cpu",
                                                 f"optim.strategy={strategy}", "eval.select=last",
                                                 f"runtime.channels_last={channels_last}"], app="image")
    try:
        import roga_cuda.apps.image.train as T
        model_holder = {}
        real_eval = T.evaluate_domains

        def spy(model, *a, **k):
            model_holder["m"] = model
            return real_eval(model, *a, **k)
        T.evaluate_domains = spy
        train(cfg, out)
        sd = model_holder["m"].module.state_dict()
        torch.save({k: v.clone() for k, v in sd.items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()


@pytest.mark.parametrize("optimizer,strategy,channels_last", [("roga", "swap", False), ("sam", "copy", False),
                                                             ("looksam", "copy", False), ("roga", "copy", True)])
def test_ddp_two_gloo_processes(tmp_path, optimizer, strategy, channels_last):
    out = str(tmp_path / "ddp")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), out, optimizer, strategy, channels_last), nprocs=2,
                                join=True)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["world_size"] == 2 and m["steps"] == 3
    r0, r1 = torch.load(os.path.join(out, "rank0.pt")), torch.load(os.path.join(out, "rank1.pt"))
    # identical parameters after training (eval.select=last: best.pt, which rank 0 writes and
    # every rank loads, would hide diverged replicas). BatchNorm running statistics are left out:
    # DDP broadcasts them at the start of a synchronised forward, so the last forward's local
    # updates (and RoGA's, whose passes all run under no_sync) differ per rank by design.
    keys = [k for k in r0 if "running_" not in k]
    for k in keys:
        assert torch.equal(r0[k], r1[k]), k


# --------------------------------------------------------------------------------- models
def test_resnet34_has_torchvision_layout(tmp_path):
    m = ResNet34(num_classes=1000)
    sd = m.state_dict()
    # torchvision.models.resnet34(): 218 state_dict entries, 21,797,672 parameters
    assert len(sd) == 218 and sum(p.numel() for p in m.parameters()) == 21_797_672
    for k, shape in {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                     "layer3.5.bn2.running_var": (256,), "layer4.2.conv2.weight": (512, 512, 3, 3),
                     "fc.weight": (1000, 512), "layer1.0.bn1.num_batches_tracked": ()}.items():
        assert tuple(sd[k].shape) == shape, k
    # a torchvision-style file (1000-class head, 'module.' prefix from DataParallel) loads; the head is skipped
    f = tmp_path / "resnet34.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, f)
    det = build_model("resnet34", 64, pretrained=str(f))
    assert torch.equal(det.state_dict()["layer4.2.conv2.weight"], sd["layer4.2.conv2.weight"])
    assert det.fc.weight.shape == (1, 512)
    with pytest.raises(ValueError, match="model.width"):
        build_model("resnet34", 64, width=32, pretrained=str(f))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model("resnet34", 64, pretrained=str(tmp_path / "none.pth"))


def test_other_backbones():
    x = torch.randn(2, 3, 64, 64)
    xc = build_model("xception", 64, width=0.125, middle_blocks=1)
    assert xc(x).shape == (2, 1) and "block5.rep.0.weight" not in xc.state_dict()
    assert "last_linear.weight" in xc.state_dict() and "block1.skipbn.running_mean" in xc.state_dict()
    full = build_model("xception", 299)  # Chollet's Xception: 22,855,952 parameters with 1000 classes
    assert sum(p.numel() for p in full.parameters()) == 22_855_952 - 2049 * 1000 + 2049
    meso = build_model("meso4", 256)
    assert meso(torch.randn(1, 3, 256, 256)).shape == (1, 1) and meso.fc1.in_features == 1024
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install timm"):
            build_model("efficientnet_b4", 64)
    with pytest.raises(ValueError, match="unknown model.arch"):
        build_model("vgg", 64)


# ------------------------------------------------------------------------------ synthetic
def test_synthetic_data_design():
    kw = dict(image_size=32, videos=(3, 2, 2), frames=3, train_methods=["blend", "noise"], test_methods=["warp", "hq"])
    a, b = generate(seed=1, **kw), generate(seed=1, **kw)
    assert torch.equal(a.images, b.images) and a.video_names == b.video_names
    c = generate(seed=2, **kw)
    assert not torch.equal(a.images, c.images)
    only = generate(seed=1, image_size=32, videos=(3, 2, 2), frames=3, train_methods=["noise"], test_methods=[])
    assert torch.equal(only.images[only.index[("noise", "test", 1)]], a.images[a.index[("noise", "test", 1)]])
    assert ("warp", "train", 1) not in a.index and ("warp", "test", 1) in a.index  # held out: test split only
    assert torch.equal(a.index[("blend", "test", 0)], a.index[("noise", "test", 0)])  # shared real videos
    assert not set(a.index[("hq", "test", 0)].tolist()) & set(a.index[("blend", "test", 0)].tolist())
    # a fake frame is its target real frame with the inner face swapped: the change sits in the centre
    real, fake = a.images[a.index[("noise", "test", 0)]].float(), a.images[a.index[("noise", "test", 1)]].float()
    diff = (real - fake).abs().mean((0, 1))
    assert diff[12:20, 12:20].mean() > 4 * diff[:4].mean()
    assert set(a.labels[a.index[("noise", "test", 1)]].tolist()) == {1}
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(image_size=30)
    with pytest.raises(ValueError, match="unknown synthetic method"):
        generate(train_methods=["nope"])


# ---------------------------------------------------------------- the SAM variants and interval (issue 17)
def _variant_cfg(*extra):
    return load_config("smoke", overrides=["optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=0.1",
                                           *extra], app="image")


def test_sam_variants_built_from_config():
    from roga_cuda.apps.image.train import build_optimizer
    from roga_cuda.optim import GSAM, WSAM, FriendlySAM, LookSAM
    model = torch.nn.Linear(4, 1)
    cases = {"gsam": (GSAM, "optim.gsam_alpha=0.25", {"alpha": 0.25}),
             "wsam": (WSAM, "optim.wsam_gamma=0.7", {"gamma": 0.7}),
             "fsam": (FriendlySAM, "optim.fsam_lmbda=0.5", {"lmbda": 0.5, "sigma": 1.0}),
             "looksam": (LookSAM, "optim.looksam_alpha=0.3", {"alpha": 0.3})}
    for name, (cls, override, group) in cases.items():
        opt = build_optimizer(_variant_cfg(f"method={name}", "optim.rho=0.03", override), model.parameters(), 2)
        assert type(opt) is cls, name
        assert opt.param_groups[0]["rho"] == 0.03 and opt.param_groups[0]["lr"] == 0.1
        for k, v in group.items():
            assert opt.param_groups[0][k] == v, (name, k)
    assert build_optimizer(_variant_cfg("method=looksam", "optim.looksam_k=3"), model.parameters(), 2).k == 3
    assert build_optimizer(_variant_cfg("method=gsam", "optim.interval=4"), model.parameters(), 2).interval == 4
    assert build_optimizer(_variant_cfg("method=roga", "optim.interval=2"), model.parameters(), 2).interval == 2
    with pytest.raises(ValueError, match="looksam_k"):
        build_optimizer(_variant_cfg("method=looksam", "optim.interval=2"), model.parameters(), 2)


@pytest.mark.parametrize("optimizer", ["sam", "fsam", "roga"])
def test_interval_plain_steps_take_one_pass_and_a_plain_update(optimizer):
    """optim.interval=2: steps 0 and 2 perturb (two forward passes per batch), steps 1 and 3
    are the base optimizer's plain SGD step on the first pass's gradient (one pass each),
    checked against p - lr * grad computed here with autograd."""
    from roga_cuda.apps.common.runtime import Amp
    from roga_cuda.apps.image.train import _Stepper, build_optimizer
    torch.manual_seed(0)
    cfg = _variant_cfg(f"method={optimizer}", "optim.interval=2", "optim.rho=0.5", "optim.alpha=0.01")
    model = torch.nn.Linear(6, 1)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    opt = build_optimizer(cfg, model.parameters(), 2)
    stepper = _Stepper(cfg, model, opt, Amp("cpu", enabled=False), ddp=False)
    batches = [(torch.randn(8, 6), torch.randint(0, 2, (8,))) for _ in range(2)]
    for step in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        ref = torch.nn.Linear(6, 1).double()
        with torch.no_grad():
            for r, p in zip(ref.parameters(), before):
                r.copy_(p)
        if optimizer == "roga":  # the mean over domains of each domain's gradient
            grads = [torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(
                ref(bx.double()).squeeze(1), by.double()), list(ref.parameters())) for bx, by in batches]
            grad = [sum(gs) / len(gs) for gs in zip(*grads)]
        else:
            grad = torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(
                ref(x.double()).squeeze(1), y.double()), list(ref.parameters()))
        calls.clear()
        stepper(batches)
        plain = step % 2 == 1
        cycles = len(batches) if optimizer == "roga" else 1  # RoGA: a cycle per domain; SAM: the batches concatenated
        assert len(calls) == (1 if plain else 2) * cycles, (step, len(calls))
        expect = [b.double() - 0.1 * g for b, g in zip(before, grad)]
        close = all(torch.allclose(p.double(), e, rtol=1e-5, atol=1e-6) for p, e in zip(model.parameters(), expect))
        assert close == plain, (step, optimizer)  # a perturbed step is not the plain one (rho is large)
    assert opt.state_dict()["wrapper"]["steps"] == 4
