"""Console-script entry points of the apps (``roga-train``, ``roga-eval``, ``dpda-train``,
``dpda-eval``).

The library installs with torch and numpy only; the apps' own packages come with the
``[apps]`` extra. This module imports nothing but the standard library, so a missing
package is reported in one line with the command that installs it, before any app module
is imported (and fails halfway with a traceback).
"""
import importlib
import importlib.util
import sys

__all__ = ["APP_PACKAGES", "missing_app_packages", "run", "roga_train", "roga_eval", "dpda_train", "dpda_eval"]

# import name -> pip name, for every package the apps import at start-up. (Pillow and
# soundfile are imported only for file-backed data and say so themselves when missing.)
APP_PACKAGES = {"yaml": "pyyaml", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def missing_app_packages():
    """pip names of the app packages that cannot be imported here."""
    out = []
    for mod, pip_name in APP_PACKAGES.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(pip_name)
    return out


def run(prog, module, func, argv=None):
    """Check the app packages, then call ``module.func(argv)``; exit status 2 when missing."""
    missing = missing_app_packages()
    if missing:
        print(f"{prog}: error: the training apps need packages that are not installed: {', '.join(missing)}.\n"
              f"Install them with the apps extra, from the roga_cuda source folder:\n"
              f"    pip install --no-build-isolation -e \".[apps]\"\n"
              f"(or: pip install {' '.join(missing)})", file=sys.stderr)
        return 2
    return getattr(importlib.import_module(module), func)(argv)


def roga_train(argv=None):
    return run("roga-train", "roga_cuda.apps.image.cli", "train_main", argv)


def roga_eval(argv=None):
    return run("roga-eval", "roga_cuda.apps.image.cli", "eval_main", argv)


def dpda_train(argv=None):
    return run("dpda-train", "roga_cuda.apps.speech.cli", "train_main", argv)


def dpda_eval(argv=None):
    return run("dpda-eval", "roga_cuda.apps.speech.cli", "eval_main", argv)
