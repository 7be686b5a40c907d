"""flax_impl: the JAX/Flax port. Importing it changes nothing in the process: its entry points
(`python -m flax_impl.train`, `.predict`, `.lr_find`, the benchmarks, the demo, the test session)
call `flax_impl.cpu_setup.configure()` first, before JAX starts its backends, to set XLA:CPU's
multi-output fusion and one host device per core (up to two) unless told otherwise
(flax_impl/cpu_setup.py)."""
