"""``python -m roga_cuda.apps.image [train] ...`` = roga-train; ``... eval ...`` = roga-eval."""
import sys

from ..launch import run

sys.exit(run("roga-train", "roga_cuda.apps.image.cli", "main"))
