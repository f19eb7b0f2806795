"""Process-level CPU settings for fast inference and training (Linux/glibc; no-ops elsewhere)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed blocks to the OS (mmap/munmap per tensor).

    Planning and training allocate and free many ~1 MB activations per call; with glibc's defaults
    freed memory goes back to the OS and its pages fault in again (~6% of an act call; ~6,000
    faults, a third of the time, of a 1M-student update). Raising the mmap and trim thresholds
    makes malloc reuse its heap instead. Returns False where this is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 256 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


@contextlib.contextmanager
def flushed_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush float32 denormals to zero inside the block (SimNorm's exp yields them, and they are
    ~20x slower to multiply on x86); the flag is per thread and process-wide, so it is reset after."""
    if enabled:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)
