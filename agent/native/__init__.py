"""Fused CPU kernels (kernels.c) for the element-wise work between the world model's GEMMs, and
the planner's whole value estimate in one call.

Between two small matrix products TD-MPC2 runs LayerNorm, Mish, SimNorm and the two-hot decode as
chains of separate torch ops, each a full pass over memory; on CPU they cost about as much as the
GEMMs themselves. kernels.c does each chain in one pass per row, forward and backward, for single
layers and for ensembles with one affine per head (`ln_act`, `layer_norm_act`). `ValueNet` runs
MPPI's value estimate (horizon dynamics/reward steps, the policy's terminal action, two Q heads)
for every sampled row in one call: GEMMs through torch's own BLAS (`sgemm_`, MKL in the x86
wheels), epilogues fused, blocks of rows on OpenMP threads.

The library is compiled with the system C compiler on first use (-O3 -march=native, ~1 s) into a
cache keyed by source, compiler, flags and CPU (`$DISTILL_NATIVE_CACHE`, default
~/.cache/distill-sweeps/native) and loaded with ctypes; its functions release the GIL. Where torch
runs on GNU OpenMP (its Linux wheels) the library is built with -fopenmp and shares torch's
thread pool: large calls use torch.get_num_threads() threads.

Everything here is optional: `available()` is False when there is no compiler, the platform is not
supported, or `DISTILL_NATIVE=0`, and `value_kernel_available()` also needs torch's BLAS entry
points; callers then use the equivalent torch ops. Inputs must be contiguous float32 CPU tensors
(checked).
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
_f32 = ctypes.c_float
_SIGNATURES = {
    "ln_act_forward": [_f32p, _f32p, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32p, _i64, _f32p, _f32p, _f32, _f32,
                       ctypes.c_int, _f32p, _f32p, ctypes.c_int],
    "ln_act_backward": [_f32p, _f32p, _f32p, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32,
                        ctypes.c_int, _f32p, ctypes.c_int],
    "two_hot_decode": [_f32p, _i64, _f32p, _i64, _i64, _f32, _f32],
    "ln_simnorm": [_f32p, _i64, _i64, _f32p, _f32p, _f32, _i64],
    "plan_values": [ctypes.c_void_p, _f32p, _f32p, _f32p, _f32p, _f32p, _i64, _i64, ctypes.c_int],
    "gemm_selftest": [ctypes.c_void_p],
}
_RESTYPES = {"plan_values": ctypes.c_int, "gemm_selftest": ctypes.c_int}
# below this many elements a call runs on one thread (waking the others costs more than it saves)
PARALLEL_MIN_ELEMENTS = 1 << 16


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


def _torch_uses_gnu_openmp() -> bool:
    """Whether this process already has GNU OpenMP (libgomp.so.1) loaded, as torch's Linux wheels
    do: a -fopenmp build then shares torch's thread pool instead of starting a second one."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def build(force: bool = False) -> Path:
    """Compile kernels.c (if not cached) and return the shared library's path. Raises on failure.
    Multi-threaded (-fopenmp) where torch runs on GNU OpenMP and the compiler supports it."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    attempts = ([FLAGS + ["-fopenmp"]] if _torch_uses_gnu_openmp() else []) + [FLAGS]
    errors = []
    for flags in attempts:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(flags), platform.machine(),
                                         _cpu_signature()]).encode()).hexdigest()[:20]
        target = _cache_dir() / f"kernels-{key}.so"
        if target.is_file() and not force:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, rename: safe for concurrent builders
            staged = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(staged), "-lm"], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode == 0:
                os.replace(staged, target)
                return target
            errors.append(result.stderr.strip()[:400])
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


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
            getattr(lib, name).restype = _RESTYPES.get(name)
        return lib
    except Exception as exc:  # no compiler, read-only home, unsupported toolchain...
        warnings.warn(f"native CPU kernels unavailable, using torch ops ({type(exc).__name__}: {str(exc)[:200]})")
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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not _fits(t):
            raise ValueError("native kernels take contiguous float32 CPU tensors")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _threads(items: int, width: int) -> int:
    """Threads for a call: torch.get_num_threads() (1 inside the planner's single-threaded workers)
    when the work is large enough to pay for waking them."""
    return 1 if items * width < PARALLEL_MIN_ELEMENTS else max(1, min(torch.get_num_threads(), items))


def _layout(x: torch.Tensor, heads: int, transpose_heads: bool) -> tuple[int, int, int, int]:
    """(rows per head, width, row stride, head stride) of x in elements."""
    width = x.shape[-1]
    rows = x.numel() // (width * heads)
    if heads == 1:
        return rows, width, width, 0
    if transpose_heads:      # (rows, heads, width)
        return rows, width, heads * width, width
    return rows, width, width, rows * width  # (heads, rows, width)


def ln_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5, act: int = MISH,
           add: torch.Tensor | None = None, out: torch.Tensor | None = None,
           stats: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float = 1.0,
           transpose_heads: bool = False) -> torch.Tensor:
    """act(LayerNorm(scale * (x + add)) * gamma + beta) over the last dim, no autograd.

    gamma, beta: (D,) for one LayerNorm, or (H, D) for H heads, each with its own affine; then x
    is (H, ..., D) (out likewise) or, with `transpose_heads`, (..., H, D) and out (H, ..., D).
    add: (N / k, D), row i of x (N, D) gets add[i // k] (per-environment constants), or None
    (one head only); out: destination, may be x itself unless transposing (default: new tensor);
    stats: (mean, rstd) buffers (x.numel() / D,) receiving the row statistics, head-major.
    act: MISH or NO_ACT. Large inputs are split over torch.get_num_threads() threads."""
    heads = gamma.shape[0] if gamma.dim() == 2 else 1
    rows, width, x_rs, x_hs = _layout(x, heads, transpose_heads)
    if out is None:
        out = torch.empty((heads, *x.shape[:-2], width) if transpose_heads else x.shape)
    _, _, o_rs, o_hs = _layout(out, heads, False)
    add_every = 1
    if add is not None:
        add_rows = add.numel() // width
        if heads != 1 or add_rows == 0 or rows % add_rows:
            raise ValueError(f"add has {add_rows} rows, which does not divide x's {rows} (or x has several heads)")
        add_every = rows // add_rows
    if transpose_heads and out.data_ptr() == x.data_ptr():
        raise ValueError("a transposing ln_act cannot write in place")
    mean, rstd = stats if stats is not None else (None, None)
    _check(x, out, add, gamma, beta, mean, rstd)
    _library().ln_act_forward(_ptr(x), _ptr(out), rows, heads, width, x_rs, x_hs, o_rs, o_hs, _ptr(add), add_every,
                              _ptr(gamma), _ptr(beta), float(scale), float(eps), int(act), _ptr(mean), _ptr(rstd),
                              _threads(heads * rows, width))
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
    """act(LayerNorm(scale * x) * gamma + beta) with a fused forward and backward (training); gamma
    (D,) or (H, D) per head, layouts as `ln_act`. `dropped`: flat positions of x to zero first
    (dropout; x is zeroed there in place, so it must be a temporary). Saves x and the row
    statistics, recomputes the rest in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, act: int, scale: float,
                transpose_heads: bool, dropped: torch.Tensor | None) -> torch.Tensor:
        x, gamma, beta = _contiguous(x), _contiguous(gamma), _contiguous(beta)
        if dropped is not None:
            x.view(-1).index_fill_(0, dropped, 0.0)
        items = x.numel() // x.shape[-1]
        mean, rstd = torch.empty(items), torch.empty(items)
        out = ln_act(x, gamma, beta, eps, act, stats=(mean, rstd), scale=scale, transpose_heads=transpose_heads)
        ctx.save_for_backward(x, gamma, beta, mean, rstd, dropped)
        ctx.act, ctx.scale, ctx.transpose_heads = act, scale, transpose_heads
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gamma, beta, mean, rstd, dropped = ctx.saved_tensors
        grad_out = _contiguous(grad_out)
        heads = gamma.shape[0] if gamma.dim() == 2 else 1
        rows, width, x_rs, x_hs = _layout(x, heads, ctx.transpose_heads)
        _, _, g_rs, g_hs = _layout(grad_out, heads, False)
        grad_x = torch.empty_like(x)
        want_affine = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        threads = _threads(heads * rows, width)
        # one gamma / beta accumulator per thread (threads must not add into the same rows)
        grad_affine = torch.zeros(threads, 2, *gamma.shape) if want_affine else None
        _check(grad_out)
        _library().ln_act_backward(_ptr(x), _ptr(grad_out), _ptr(grad_x), rows, heads, width, x_rs, x_hs, g_rs, g_hs,
                                   _ptr(mean), _ptr(rstd), _ptr(gamma), _ptr(beta), float(ctx.scale), ctx.act,
                                   _ptr(grad_affine), threads)
        if dropped is not None:
            grad_x.view(-1).index_fill_(0, dropped, 0.0)
        none = (None,) * 5
        if not want_affine:
            return (grad_x, None, None) + none
        grad_gamma, grad_beta = grad_affine.sum(0) if threads > 1 else grad_affine[0]
        return (grad_x, grad_gamma, grad_beta) + none


def layer_norm_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
                   act: int = MISH, scale: float = 1.0, transpose_heads: bool = False,
                   dropped: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable act(LayerNorm(scale * x) * gamma + beta) over the last dim through the fused
    kernels; gamma / beta (D,) or (H, D) for H heads (layouts as `ln_act`); dropped: flat positions
    of x zeroed first, in place (see LayerNormAct)."""
    return LayerNormAct.apply(x, gamma, beta, eps, act, scale, transpose_heads, dropped)


# -- MPPI value estimation in one call ----------------------------------------------------------
class _Layer(ctypes.Structure):
    _fields_ = [("w", _f32p), ("bias", _f32p), ("gamma", _f32p), ("beta", _f32p),
                ("in_features", _i64), ("out_features", _i64), ("per_env", _i64)]


class _ValueNet(ctypes.Structure):
    _fields_ = [("sgemm", ctypes.c_void_p), ("set_threads_local", ctypes.c_void_p),
                ("first", _Layer), ("reward1", _Layer), ("reward_out", _Layer), ("next1", _Layer), ("next_out", _Layer),
                ("pi0", _Layer), ("pi1", _Layer), ("pi_out", _Layer),
                ("q0", _Layer * 2), ("q1", _Layer * 2), ("q_out", _Layer * 2),
                ("latent", _i64), ("action", _i64), ("mlp", _i64), ("bins", _i64), ("simnorm", _i64),
                ("rows_per_env", _i64), ("horizon", _i64), ("discount", ctypes.c_double),
                ("vmin", _f32), ("vmax", _f32), ("log_std_min", _f32), ("log_std_max", _f32), ("ln_eps", _f32)]


@functools.lru_cache(maxsize=1)
def _blas() -> tuple[int, int | None] | None:
    """Addresses of sgemm_ and MKL_Set_Num_Threads_Local in torch's own BLAS (MKL in the x86 wheels),
    or None when torch's library does not export them."""
    for name in ("libtorch_cpu.so", "libtorch.so"):
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


@functools.lru_cache(maxsize=1)
def value_kernel_available() -> bool:
    """Whether `ValueNet` can run here: the fused kernels plus torch's BLAS entry points, checked
    on a small product."""
    return available() and _blas() is not None and _library().gemm_selftest(_blas()[0]) == 1


class Dense:
    """One layer for `ValueNet`: w (in, out) (the weight transposed), bias (out,) or per environment
    (E, out), LayerNorm gamma / beta (out,) for hidden layers. Tensors are made contiguous float32."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None):
        self.w, self.bias = w.contiguous(), bias.contiguous()
        self.gamma = None if gamma is None else gamma.contiguous()
        self.beta = None if beta is None else beta.contiguous()
        _check(self.w, self.bias, self.gamma, self.beta)

    def struct(self) -> _Layer:
        return _Layer(_ptr(self.w), _ptr(self.bias), _ptr(self.gamma), _ptr(self.beta), self.w.shape[0], self.w.shape[1],
                      int(self.bias.dim() == 2))


class ValueNet:
    """The planner's value estimate (PlanningKernels.step x horizon, pi, mean of two Q heads) as one
    native call over all rows. `layers`: Dense for first (reward | dynamics first layers side by
    side, per-env bias), reward1, reward_out, next1, next_out, pi0 (per-env bias), pi1, pi_out, and
    lists of two for q0 (per-env bias), q1, q_out. Keeps the tensors alive."""

    def __init__(self, layers: dict, *, latent: int, action: int, mlp: int, bins: int, simnorm: int,
                 rows_per_env: int, horizon: int, discount: float, vmin: float, vmax: float, log_std_min: float,
                 log_std_max: float, ln_eps: float = 1e-5):
        sgemm, local = _blas()
        self.layers = layers
        net = _ValueNet(sgemm=sgemm, set_threads_local=local)
        for name, layer in layers.items():
            if isinstance(layer, (list, tuple)):
                getattr(net, name)[:] = [item.struct() for item in layer]
            else:
                setattr(net, name, layer.struct())
        for name, value in dict(latent=latent, action=action, mlp=mlp, bins=bins, simnorm=simnorm,
                                rows_per_env=rows_per_env, horizon=horizon, discount=discount, vmin=vmin, vmax=vmax,
                                log_std_min=log_std_min, log_std_max=log_std_max, ln_eps=ln_eps).items():
            setattr(net, name, value)
        self.net = net

    def __call__(self, z: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor,
                 block: int = 128, threads: int | None = None) -> torch.Tensor:
        """z (N, latent), actions (horizon, N, action), mask / eps (N, action) -> values (N, 1)."""
        rows = z.shape[0]
        _check(z, actions, mask, eps)
        if actions.shape != (self.net.horizon, rows, self.net.action) or z.shape[1] != self.net.latent:
            raise ValueError(f"ValueNet: z {tuple(z.shape)} / actions {tuple(actions.shape)} do not match the net")
        threads = max(1, torch.get_num_threads() if threads is None else threads)
        block = max(1, min(block, -(-rows // threads)))
        out = torch.empty(rows, 1)
        if _library().plan_values(ctypes.byref(self.net), _ptr(z), _ptr(actions), _ptr(mask), _ptr(eps), _ptr(out),
                                  rows, block, threads) != 0:
            raise MemoryError("native plan_values: could not allocate scratch memory")
        return out
