"""One timer for the benchmark and the per-run speed figures: the median, with how it was taken.

GPU: `triton.testing.do_bench(..., return_mode="median")`, which flushes L2 before every
repetition; or, for launch-bound calls, `do_bench_cudagraph` (CUDA graph, no L2 flush: a
weight that fits in L2 stays there, which flatters small shapes). CPU: perf_counter around
each call, median of the repetitions (no cache flush either). Each result says which.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, graph: bool = False, repeats: int = 10,
              warmup: int = 1, budget_s: float = 2.0) -> tuple[float, dict]:
    """(median milliseconds of fn(), {"timer", "cuda_graph", "l2_flushed", "repeats"}).
    CPU: `repeats` calls after `warmup`, fewer (at least 3) when they exceed `budget_s`."""
    device = torch.device(device)
    fn()  # first call outside any timing or graph capture: caches are built here
    if device.type == "cuda":
        import triton.testing as tt

        if graph:
            ms = tt.do_bench_cudagraph(fn, return_mode="median")
            return ms, {"timer": "triton.testing.do_bench_cudagraph", "cuda_graph": True, "l2_flushed": False}
        ms = tt.do_bench(fn, return_mode="median")
        return ms, {"timer": "triton.testing.do_bench", "cuda_graph": False, "l2_flushed": True}
    for _ in range(warmup):
        fn()
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, {"timer": "perf_counter", "cuda_graph": False, "l2_flushed": False,
                                            "repeats": len(times)}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-memory copy bandwidth (read + write bytes over time), GB/s: the memory
    bound a weight-streaming kernel is held against."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), device, repeats=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9
