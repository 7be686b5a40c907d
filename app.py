"""A Hugging Face Space's entry point: the demo of the run in RUN_DIR (default runs/demo)."""

import os
import sys

from demo import main

sys.exit(main(["--workdir", os.environ.get("RUN_DIR", "runs/demo"), "--host", "0.0.0.0"]))
