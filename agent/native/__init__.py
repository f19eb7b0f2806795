"""Fused CPU kernels (kernels.c) for the element-wise work between the world model's GEMMs.

Between two small matrix products TD-MPC2 runs LayerNorm, Mish, SimNorm and the two-hot decode as
chains of separate torch ops, each a full pass over memory; on CPU they cost about as much as the
GEMMs themselves. kernels.c does each chain in one pass per row. It is compiled with the system C
compiler on first use (-O3 -march=native, ~1 s) into a cache keyed by source, compiler and CPU
(`$DISTILL_NATIVE_CACHE`, default ~/.cache/distill-sweeps/native) and loaded with ctypes.

Everything here is optional: `available()` is False when there is no compiler, the platform is not
supported, or `DISTILL_NATIVE=0`; callers then use the equivalent torch ops. Inputs must be
contiguous float32 CPU tensors (checked). The C functions release the GIL while they run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
MISH, NO_ACT = 1, 0

_f32p = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    "ln_act_forward": [_f32p, _f32p, _i64, _i64, _f32p, _i64, _f32p, _f32p, ctypes.c_float, ctypes.c_int, _f32p, _f32p],
    "ln_act_backward": [_f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _i64, _i64, ctypes.c_int, _f32p, _f32p, _f32p],
    "two_hot_decode": [_f32p, _i64, _f32p, _i64, _i64, ctypes.c_float, ctypes.c_float],
    "ln_simnorm": [_f32p, _i64, _i64, _f32p, _f32p, ctypes.c_float, _i64],
}


def _cache_dir() -> Path:
    env = os.environ.get("DISTILL_NATIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "distill-sweeps" / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags (one line each)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(force: bool = False) -> Path:
    """Compile kernels.c (if not cached) and return the shared library's path. Raises on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), platform.machine(),
                                     _cpu_signature()]).encode()).hexdigest()[:20]
    target = _cache_dir() / f"kernels-{key}.so"
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, rename: safe for concurrent builders
        staged = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(staged), "-lm"], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:400]}")
        os.replace(staged, target)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("DISTILL_NATIVE", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        return lib
    except Exception as exc:  # no compiler, read-only home, unsupported toolchain...
        warnings.warn(f"native CPU kernels unavailable, using torch ops ({type(exc).__name__}: {str(exc)[:200]})")
        return None


def available() -> bool:
    """Whether the fused kernels can be used in this process (compiles them on the first call)."""
    return _library() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """available() and every tensor is a contiguous float32 CPU tensor."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and available()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()):
            raise ValueError("native kernels take contiguous float32 CPU tensors")


def ln_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5, act: int = MISH,
           add: torch.Tensor | None = None, out: torch.Tensor | None = None,
           stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """act(LayerNorm(x + add) * gamma + beta) over the last dim, no autograd.

    x: (N, D); add: (N / k, D), row i gets add[i // k] (per-environment constants), or None;
    out: (N, D) destination, may be x itself (default: a new tensor); stats: (mean, rstd) (N,)
    buffers to receive the row statistics. act: MISH or NO_ACT."""
    width = x.shape[-1]
    rows = x.numel() // width
    out = torch.empty_like(x) if out is None else out
    add_every = 1
    if add is not None:
        add_rows = add.numel() // width
        if add_rows == 0 or rows % add_rows:
            raise ValueError(f"add has {add_rows} rows, which does not divide x's {rows}")
        add_every = rows // add_rows
    mean, rstd = stats if stats is not None else (None, None)
    _check(x, out, add, gamma, beta, mean, rstd)
    _library().ln_act_forward(_ptr(x), _ptr(out), rows, width, _ptr(add), add_every, _ptr(gamma), _ptr(beta),
                              float(eps), int(act), _ptr(mean), _ptr(rstd))
    return out


def ln_simnorm_(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, group: int, eps: float = 1e-5) -> torch.Tensor:
    """In place: SimNorm(LayerNorm(x) * gamma + beta) with simplex groups of `group`; x: (N, D)."""
    width = x.shape[-1]
    if width % group:
        raise ValueError(f"width {width} is not a multiple of the SimNorm group {group}")
    _check(x, gamma, beta)
    _library().ln_simnorm(_ptr(x), x.numel() // width, width, _ptr(gamma), _ptr(beta), float(eps), int(group))
    return x


def two_hot_decode(logits: torch.Tensor, vmin: float, vmax: float, bins: int | None = None) -> torch.Tensor:
    """logits (N, width) -> (N, 1) symexp of the expected bin centre (= agent.math.two_hot_inv) over
    the first `bins` columns (default: all; more columns are padding for a faster GEMM)."""
    _check(logits)
    width = logits.shape[-1]
    bins = width if bins is None else bins
    if not 1 < bins <= width:
        raise ValueError(f"bins must be in (1, {width}], got {bins}")
    rows = logits.numel() // width
    out = torch.empty(rows, 1)
    _library().two_hot_decode(_ptr(logits), width, _ptr(out), rows, bins, float(vmin), float(vmax))
    return out


class LayerNormAct(torch.autograd.Function):
    """act(LayerNorm(x) * gamma + beta) with a fused forward and backward (training).

    Saves x and the row statistics, recomputes the rest in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, act: int) -> torch.Tensor:
        x = x.contiguous()
        rows = x.numel() // x.shape[-1]
        mean, rstd = torch.empty(rows), torch.empty(rows)
        out = ln_act(x, gamma.contiguous(), beta.contiguous(), eps, act, stats=(mean, rstd))
        ctx.save_for_backward(x, gamma, beta, mean, rstd)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gamma, beta, mean, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        width = x.shape[-1]
        grad_x = torch.empty_like(x)
        grad_gamma, grad_beta = torch.zeros(width), torch.zeros(width)
        gamma, beta = gamma.contiguous(), beta.contiguous()
        _check(grad_out, gamma, beta)
        _library().ln_act_backward(_ptr(x), _ptr(grad_out), _ptr(mean), _ptr(rstd), _ptr(gamma), _ptr(beta),
                                   x.numel() // width, width, ctx.act, _ptr(grad_x), _ptr(grad_gamma), _ptr(grad_beta))
        return grad_x, grad_gamma, grad_beta, None, None


def layer_norm_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
                   act: int = MISH) -> torch.Tensor:
    """Differentiable act(LayerNorm(x) * gamma + beta) over the last dim through the fused kernels."""
    return LayerNormAct.apply(x, gamma, beta, eps, act)
