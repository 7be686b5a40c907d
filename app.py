"""A Hugging Face Space's entry point: the demo of the run in RUN_DIR (default runs/demo)."""

import os
import sys

from flax_impl import cpu_setup

cpu_setup.configure()  # XLA:CPU's options for the flax column, before JAX starts

from demo import main  # noqa: E402

sys.exit(main(["--workdir", os.environ.get("RUN_DIR", "runs/demo"), "--host", "0.0.0.0"]))
