"""``python -m roga_cuda.apps.image [train] ...`` = roga-train; ``... eval ...`` = roga-eval."""
import sys

from .cli import main

sys.exit(main())
