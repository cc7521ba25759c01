"""``python -m roga_cuda.apps.speech [train|eval] ...`` (default: train)."""
import sys

from ..launch import run

if __name__ == "__main__":
    sys.exit(run("dpda-train", "roga_cuda.apps.speech.cli", "main"))
