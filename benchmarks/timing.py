"""Timing helpers shared by the benchmark scripts: one warm-up call (compilation), then repeated runs."""

import statistics
import time


def seconds(function, repeats: int, summary=min) -> float:
    """`summary` (min by default; statistics.median for noisy steps) of `repeats` timed calls after a warm-up."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return summary(times)


median = statistics.median
