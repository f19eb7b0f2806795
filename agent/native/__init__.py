"""Fused CPU kernels (kernels.c) for the element-wise work between the world model's GEMMs, and
the planner's whole value estimate in one call.

Between two small matrix products TD-MPC2 runs LayerNorm, Mish, SimNorm and the two-hot decode as
chains of separate torch ops, each a full pass over memory; on CPU they cost about as much as the
GEMMs themselves. kernels.c does each chain in one pass per row, forward and backward, for single
layers and for ensembles with one affine per head (`ln_act`, `layer_norm_act`; under torch.func,
with K population members as K heads: `member_layer_norm_act`). `ValueNet` runs
MPPI's value estimate (horizon dynamics/reward steps, the policy's terminal action, two Q heads of
any depth) for every sampled row in one call: GEMMs through torch's own BLAS (`sgemm_`, MKL in the
x86 wheels), epilogues fused, blocks of rows on OpenMP threads.

The package is split by job: `build` compiles kernels.c with the system C compiler on first use
(-O3 -march=native, ~1 s) into a cache; `bindings` declares the ctypes signatures and mirrors the
C structs, both checked against the library at load time (a mismatch raises NativeABIError);
`blas` finds torch's BLAS entry points; `ops` and `value_net` are the Python faces of the kernels.
The functions release the GIL. Where torch runs on GNU OpenMP (its Linux wheels) the library is
built with -fopenmp and shares torch's thread pool: large calls use torch.get_num_threads() threads.

Everything here is optional: `available()` is False when there is no compiler, the platform is not
supported, or `DISTILL_NATIVE=0` (one warning says what falls back to torch ops), and
`value_kernel_available()` also needs torch's BLAS entry points; callers then use the equivalent
torch ops. Inputs must be contiguous float32 CPU tensors (checked).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from agent.native import build as _build
from agent.native.bindings import Library, NativeABIError, load

# below this many elements a call runs on one thread (waking the others costs more than it saves)
PARALLEL_MIN_ELEMENTS = 1 << 16
# what runs on torch ops instead when the library cannot be built (named in the warning)
FALLBACK = ("LayerNorm+Mish (training and planning), LayerNorm+SimNorm, the two-hot decode and the "
            "one-call MPPI value estimate")


@functools.lru_cache(maxsize=1)
def _library() -> Library | None:
    if os.environ.get("DISTILL_NATIVE", "1") == "0" or not _build.supported_platform():
        return None
    try:
        path = _build.build()
    except Exception as exc:  # no compiler, read-only home, unsupported toolchain...
        warnings.warn(f"native CPU kernels unavailable ({type(exc).__name__}: {str(exc)[:200]}): using torch ops for "
                      f"{FALLBACK}", stacklevel=2)
        return None
    try:
        return load(str(path))
    except NativeABIError:
        raise  # kernels.c and bindings.py disagree: a bug to fix, never a silent fallback
    except OSError as exc:  # the built library cannot be loaded here
        warnings.warn(f"native CPU kernels unavailable (cannot load {path.name}: {str(exc)[:200]}): using torch ops "
                      f"for {FALLBACK}", stacklevel=2)
        return None


def available() -> bool:
    """Whether the fused kernels can be used in this process (compiles them on the first call)."""
    return _library() is not None


def _fits(t: torch.Tensor) -> bool:
    # is_cpu / `is` instead of device.type / ==: this runs several times per kernel call
    return t.is_cpu and t.dtype is torch.float32 and t.is_contiguous()


def usable(*tensors: torch.Tensor) -> bool:
    """available() and every tensor is a contiguous float32 CPU tensor."""
    return all(_fits(t) for t in tensors) and available()


def _threads(items: int, width: int) -> int:
    """Threads for a call: torch.get_num_threads() (1 inside the planner's single-threaded workers)
    when the work is large enough to pay for waking them."""
    return 1 if items * width < PARALLEL_MIN_ELEMENTS else max(1, min(torch.get_num_threads(), items))


from agent.native.ops import (MISH, NO_ACT, LayerNormAct, layer_norm_act, ln_act, ln_simnorm_,  # noqa: E402
                              member_layer_norm_act, two_hot_decode)
from agent.native.value_net import Dense, ValueNet, value_kernel_available, value_kernel_unavailable  # noqa: E402

__all__ = ["available", "usable", "ln_act", "ln_simnorm_", "two_hot_decode", "layer_norm_act", "LayerNormAct",
           "member_layer_norm_act",
           "MISH", "NO_ACT", "Dense", "ValueNet", "value_kernel_available", "value_kernel_unavailable", "NativeABIError", "PARALLEL_MIN_ELEMENTS"]
