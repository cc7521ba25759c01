"""The apps under misuse and faults (issue 15): a lean library import, the message when the
apps' packages are missing, resumes that cannot continue, other apps' checkpoints, moved
and stale run folders, log exactness across resumes, and one-line errors naming the problem."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from roga_cuda.apps.common import read_log
from roga_cuda.apps.image import cli as icli
from roga_cuda.apps.speech import cli as scli

from util import interrupt_after_checkpoint

APP_PACKAGES = ("yaml", "matplotlib", "PIL", "sklearn", "soundfile", "tqdm", "scipy", "pandas")

# Makes the given top-level packages unimportable, as in an environment without them: a
# None entry in sys.modules fails their import and makes importlib.util.find_spec say None.
_BLOCK = textwrap.dedent("""
    import sys
    def _block(names):
        for n in names:
            sys.modules[n] = None
    """)


def _python(code, timeout=300):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_library_import_needs_none_of_the_app_packages():
    code = _BLOCK + textwrap.dedent(f"""
        import torch  # torch may import some of them itself (tqdm); only what roga_cuda adds counts
        before = set(sys.modules)
        _block({APP_PACKAGES!r})
        import roga_cuda, roga_cuda.optim, roga_cuda.ops
        from roga_cuda import SAM, RoGA, PCGrad
        p = torch.nn.Parameter(torch.ones(3))
        opt = SAM([p], torch.optim.SGD, lr=0.1, rho=0.05)
        added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {APP_PACKAGES!r}
                       and sys.modules[m] is not None)
        print("ADDED", added)
        """)
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ADDED []" in r.stdout
    # and in a plain interpreter: importing the library adds none of the app packages to sys.modules
    r = _python("import sys, torch; b = set(sys.modules); import roga_cuda.optim, roga_cuda.ops; "
                f"print(sorted(m for m in set(sys.modules) - b if m.split('.')[0] in {APP_PACKAGES!r}))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


def test_setup_puts_the_app_packages_in_the_apps_extra():
    import ast
    from roga_cuda.apps.launch import APP_PACKAGES as LAUNCH_CHECKS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}  # noqa: E731
    core, apps = names(kw["install_requires"]), names(kw["extras_require"]["apps"])
    assert core == {"torch", "numpy"}  # what ops/optim import
    assert {"pyyaml", "tqdm", "matplotlib", "pillow", "soundfile"} <= apps and not apps & core
    assert set(LAUNCH_CHECKS.values()) <= apps  # what the launcher checks is what the extra installs
    test = names(kw["extras_require"]["test"])
    assert apps <= test  # the app tests run with the test extra alone
    assert {"scikit-learn", "torchjd[quadprog-projector,cagrad]"} <= test  # the metrics / weighting tests' references


@pytest.mark.parametrize("entry,prog", [("roga_train", "roga-train"), ("dpda_eval", "dpda-eval")])
def test_apps_without_their_packages_say_how_to_install_them(tmp_path, entry, prog):
    code = _BLOCK + textwrap.dedent(f"""
        _block(["yaml", "matplotlib"])
        from roga_cuda.apps import launch
        sys.exit(launch.{entry}(["--preset", "smoke", "--out", {str(tmp_path / "run")!r}]))
        """)
    r = _python(code)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{prog}: error:" in r.stderr and "pyyaml, matplotlib" in r.stderr and '".[apps]"' in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


# -------------------------------------------------------------------------- image runs
TINY_IMAGE = ["--preset", "smoke", "runtime.threads=1", "runtime.progress=false", "train.eval_every=0",
              "data.synthetic.videos=[4,2,2]", "data.synthetic.frames=4"]


def _image(out, *extra):
    return icli.train_main([*TINY_IMAGE, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("image") / "run"
    assert _image(out, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1") == 0
    return out


def test_image_log_is_identical_after_a_resume_between_log_rows(tmp_path, monkeypatch):
    """log_every=3 with checkpoints every 2 steps: the resumed run starts inside a log window
    (the checkpoint at step 4 holds step 4's loss); the log must not change."""
    extra = ["method=roga", "train.steps=7", "train.log_every=3", "train.checkpoint_every=2", "train.eval_every=3",
             "train.keep_checkpoints=0"]
    assert _image(tmp_path / "full", *extra) == 0
    interrupt_after_checkpoint(monkeypatch, lambda: _image(tmp_path / "cut", *extra), step=4)
    assert _image(tmp_path / "cut", *extra, "--resume") == 0
    a, b = read_log(str(tmp_path / "full" / "log.csv")), read_log(str(tmp_path / "cut" / "log.csv"))
    assert a["step"] == b["step"] == [3, 3, 6, 6, 7, 7]  # windows of 3 (+ the last step) and validations
    for col in a:
        if col != "sec_per_step":  # a timing
            assert a[col] == b[col], col
    fa = torch.load(tmp_path / "full" / "final.pt", weights_only=True)["model"]
    fb = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_image_resume_errors_are_one_line(image_run, tmp_path, capsys):
    ck = image_run / "checkpoints" / "step_00000004.pt"
    cases = [
        (["train.steps=3", "--resume", str(ck)], "checkpoint is at step 4 but this run has only 3 steps"),
        (["method=sam", "--resume", str(ck)], "trained as 'roga'"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["train.steps=-5"], "train.steps must be >= 1"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert _image(tmp_path / "r", *extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    # a corrupt checkpoint is refused by its checksum
    bad = tmp_path / "step_00000004.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 3] ^= 0x20
    bad.write_bytes(bytes(data))
    assert _image(tmp_path / "r2", "train.steps=6", "--resume", str(bad)) == 2
    assert "is corrupt" in capsys.readouterr().err


def test_override_after_resume_is_an_override(image_run, tmp_path):
    for parser in (icli._train_parser(), scli.train_parser()):
        from roga_cuda.apps.common.cli import parse_args
        a = parse_args(parser, ["--out", "x", "--resume", "train.steps=8", "optim.lr=0.1"])
        assert a.resume == "auto" and a.overrides == ["train.steps=8", "optim.lr=0.1"]
        a = parse_args(parser, ["--out", "x", "--resume", "ck.pt", "optim.lr=0.1"])
        assert a.resume == "ck.pt" and a.overrides == ["optim.lr=0.1"]
    odd = tmp_path / "a=b.pt"  # an existing file whose name has '=' stays the path
    odd.write_bytes(b"")
    a = parse_args(icli._train_parser(), ["--out", "x", "--resume", str(odd)])
    assert a.resume == str(odd)
    # end to end: continue the 4-step run to 6 steps with the override right after --resume
    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    assert _image(run, "train.checkpoint_every=2", "train.log_every=1", "--resume", "train.steps=6") == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6


# ------------------------------------------------------------------------- speech runs
TINY_SPEECH = ["--preset", "smoke", "data.n_samples=2000", "data.synthetic.scale=0.05", "train.epochs=2",
               "train.batch_size=8", "runtime.progress=false", "runtime.tensorboard=false", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synth_cache")
    out = tmp_path_factory.mktemp("speech") / "run"
    assert scli.train_main([*TINY_SPEECH, f"data.synthetic.cache_dir={cache}", "--out", str(out)]) == 0
    return out, cache


def test_fresh_speech_run_refuses_a_folder_holding_another_run(speech_run, capsys):
    out, cache = speech_run
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert scli.train_main([*TINY_SPEECH, f"data.synthetic.cache_dir={cache}", "--out", str(out),
                            "--method", "baseline"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run" in err and "--resume" in err
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert before == after  # nothing of the earlier run was touched


def test_speech_resume_errors_are_one_line(speech_run, tmp_path, capsys):
    out, cache = speech_run
    base = [*TINY_SPEECH, f"data.synthetic.cache_dir={cache}"]
    ck = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    cases = [
        (["--out", str(tmp_path / "a"), "--resume", str(ck), "train.epochs=1"], "but this run has only"),
        (["--out", str(tmp_path / "b"), "--resume", str(ck), "--method", "baseline"], "trained as 'dpda-pcgrad'"),
        (["--out", str(tmp_path / "c"), "train.steps=-1"], "train.steps must be >= 0"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert scli.train_main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)


def test_another_apps_checkpoint_is_named(image_run, speech_run, tmp_path, capsys):
    sout, cache = speech_run
    image_ck = image_run / "checkpoints" / "step_00000004.pt"
    speech_ck = sorted((sout / "checkpoints").glob("step_*.pt"))[-1]
    runs = [
        (lambda: scli.train_main([*TINY_SPEECH, f"data.synthetic.cache_dir={cache}", "--out", str(tmp_path / "s"),
                                  "--resume", str(image_ck)]), "checkpoint of the image app"),
        (lambda: _image(tmp_path / "i", "--resume", str(speech_ck)), "checkpoint of the speech app"),
        (lambda: icli.eval_main([str(sout / "model_avg.pt"), "--out", str(tmp_path / "e1")]),
         "checkpoint of the speech app (dpda-train / dpda-eval)"),
        (lambda: scli.eval_main([str(image_run / "final.pt"), "--out", str(tmp_path / "e2")]),
         "checkpoint of the image app (roga-train / roga-eval)"),
    ]
    for run, message in runs:
        capsys.readouterr()
        assert run() == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
