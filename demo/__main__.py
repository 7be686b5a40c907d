import sys

from flax_impl import cpu_setup

cpu_setup.configure()  # XLA:CPU's options for the flax column, before JAX starts

from demo.app import main  # noqa: E402

sys.exit(main())
