"""torch's own BLAS entry points (MKL in the x86 wheels), handed to the native value estimate so
its GEMMs run on the same library as torch's: `sgemm_` (Fortran ABI) and, where MKL provides it,
`MKL_Set_Num_Threads_Local` (to keep each OpenMP worker's GEMMs single-threaded)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

TORCH_LIBRARIES = ("libtorch_cpu.so", "libtorch.so")


@functools.lru_cache(maxsize=1)
def torch_blas() -> tuple[int, int | None] | None:
    """Addresses of sgemm_ and MKL_Set_Num_Threads_Local (None if absent) in torch's library, or
    None when torch's library does not export sgemm_."""
    for name in TORCH_LIBRARIES:
        path = Path(torch.__file__).parent / "lib" / name
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            sgemm = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        try:
            local = ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value  # C ABI (int by value)
        except AttributeError:
            local = None
        return sgemm, local
    return None
