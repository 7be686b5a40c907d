"""flax_impl: the JAX/Flax port. Importing it turns on XLA:CPU's multi-output fusion before JAX
starts its backends, unless told otherwise (see flax_impl/cpu_fusion.py)."""

from flax_impl import cpu_fusion as _cpu_fusion

_cpu_fusion.configure()

