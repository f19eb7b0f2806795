"""Compiling kernels.c: the system C compiler, flags, and a cache of built libraries keyed by
source, compiler, flags and CPU (`$DISTILL_NATIVE_CACHE`, default ~/.cache/distill-sweeps/native).

Builds are staged aside and renamed into the cache, so concurrent builders are safe. Where torch
runs on GNU OpenMP (its Linux wheels) the library is built with -fopenmp and shares torch's thread
pool.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]


def cache_dir() -> Path:
    env = os.environ.get("DISTILL_NATIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "distill-sweeps" / "native"


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags (one line each)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def torch_uses_gnu_openmp() -> bool:
    """Whether this process already has GNU OpenMP (libgomp.so.1) loaded, as torch's Linux wheels
    do: a -fopenmp build then shares torch's thread pool instead of starting a second one."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def supported_platform() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")


def build(force: bool = False) -> Path:
    """Compile kernels.c (if not cached) and return the shared library's path. Raises on failure.
    Multi-threaded (-fopenmp) where torch runs on GNU OpenMP and the compiler supports it."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    attempts = ([FLAGS + ["-fopenmp"]] if torch_uses_gnu_openmp() else []) + [FLAGS]
    errors = []
    for flags in attempts:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(flags), platform.machine(),
                                         cpu_signature()]).encode()).hexdigest()[:20]
        target = cache_dir() / f"kernels-{key}.so"
        if target.is_file() and not force:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, rename: safe for concurrent builders
            staged = Path(tmp) / target.name
            result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(staged), "-lm"], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode == 0:
                os.replace(staged, target)
                return target
            errors.append(result.stderr.strip()[:400])
    raise RuntimeError(f"{cc} failed: {errors[-1]}")
