"""``python -m roga_cuda.apps.speech [train|eval] ...`` (default: train)."""
import sys

from .cli import eval_main, train_main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] in ("train", "eval"):
        cmd, argv = argv[0], argv[1:]
    else:
        cmd = "train"
    sys.exit((eval_main if cmd == "eval" else train_main)(argv))
