"""Shared helpers for the benchmark scripts (peak matmul rate, timing, fixture lookup)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def fixtures_path() -> Path:
    env = os.environ.get("DISTILL_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


def published_student() -> Path | None:
    path = fixtures_path() / "published" / "mt30_1M_steps_045dist_fp16.pt"
    return path if path.is_file() else None


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of `fn` over `repeats` runs (seconds): the least disturbed measurement."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 GEMM rate with torch's current thread count (GFLOP/s)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = best_time(lambda: a @ b, repeats=repeats)
    return 2 * size**3 / seconds / 1e9
