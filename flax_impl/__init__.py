"""flax_impl: the JAX/Flax port. Importing it sets XLA:CPU's multi-output fusion and one host device
per core (up to two) before JAX starts its backends, unless told otherwise
(flax_impl/cpu_setup.py)."""

from flax_impl import cpu_setup as _cpu_setup

_cpu_setup.configure()
