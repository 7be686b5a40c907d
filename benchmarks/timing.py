"""Wall-clock timing shared by the parity report and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 0) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones.

    `fn` must finish its work before it returns (block on JAX arrays; torch on CPU is synchronous).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))
