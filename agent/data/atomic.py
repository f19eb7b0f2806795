"""Atomic publication of a directory: build the new version in a hidden sibling, then swap it in
with one rename, so readers only ever see a complete version.

One builder per path at a time (a file lock beside it). A builder that dies leaves only its hidden
`.NAME.tmp-PID-*` directory, which the next builder of that path removes. Replacing an existing
directory uses Linux's renameat2(RENAME_EXCHANGE) (one atomic swap) where the platform and the
filesystem support it, else two renames (the old version is moved aside first).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout


class PathBusy(Exception):
    """Another process holds the build lock of this path."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE).
    Returns False where the platform or filesystem cannot do it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


class StagedDirectory:
    """A new version of the directory `path`, built in `self.tmp` and published by `publish()`.

    Takes the build lock (raises PathBusy when another builder has it) and removes dead builders'
    temp dirs. `abort()` discards the temp dir and releases the lock; `publish()` releases it on
    success (and leaves the lock held on failure, for the caller's `abort()`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        self.tmp: Path | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path.parent / f".{self.path.name}.write.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise PathBusy(str(self.path)) from None

    def begin(self) -> Path:
        """Remove dead builders' temp dirs (we hold the lock) and create ours; returns it."""
        for entry in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            shutil.rmtree(entry, ignore_errors=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def publish(self, exchange: Callable[[Path, Path], bool] = exchange_paths) -> None:
        """fsync the temp dir and make it `path`: a rename when `path` is absent, else an atomic
        exchange (`exchange`, False where unsupported) or two renames. Raises OSError on failure."""
        fsync_dir(self.tmp)
        if not self.path.exists():
            os.rename(self.tmp, self.path)
        elif exchange(self.tmp, self.path):
            shutil.rmtree(self.tmp)  # now holds the previous version
        else:
            aside = self.tmp.with_name(self.tmp.name + "-old")
            os.rename(self.path, aside)
            try:
                os.rename(self.tmp, self.path)
            except OSError:
                os.rename(aside, self.path)
                raise
            shutil.rmtree(aside)
        fsync_dir(self.path.parent)
        self.tmp = None
        self._lock.release()

    def abort(self) -> None:
        """Discard the temp dir (if any) and release the lock; the published directory is untouched."""
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        if self._lock.is_locked:
            self._lock.release()
