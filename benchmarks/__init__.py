"""Speed and memory benchmarks (never timed tests): `python -m benchmarks [--quick]` on this
machine, `python -m benchmarks.gpu` on a GPU. See BENCHMARKS.md for recorded runs."""
