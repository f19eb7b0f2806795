"""Teacher-target cache: a teacher's per-entry predictions over a whole store, computed once.

For store entry t >= 1 of episode n (the transition obs[n, t-1] --action[n, t]--> reward[n, t]):

    teacher_reward[n, t] = two_hot_inv(teacher.reward(teacher.encode(obs[n, t-1], task[n]),
                                                      action[n, t], task[n]))
    teacher_reward[n, 0] = NaN

so it is aligned with the store's `reward` array. For a sampled window starting at entry s, step h
(the batch's obs[h] --action[h]--> reward[h]) uses teacher_reward[n, s+1+h]; h = 0 is exactly the
TD-MPC-Opt distillation target (teacher encodes the batch's obs[0], predicts the reward of
action[0]). For h > 0 the teacher encodes the true obs[h] (not a latent rollout from obs[0]).

Optionally (pca_dim=k) the cache also holds teacher latents encode(obs[n, t], task[n]) for every
entry, projected onto the top-k principal components fitted on a random sample of entries.

Layout (keyed by the teacher file's sha256; each part is built aside and renamed into place, and
concurrent requesters wait on a file lock for the single builder):

    STORE/teacher_cache/<sha256[:16]>/
      reward/   meta.json, teacher_reward.npy (N, L) float32
      pca<k>/   meta.json, latent.npy (N, L, k) float32, mean.npy (Z,), components.npy (k, Z),
                explained_variance_ratio.npy (k,)
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from agent.data.sampler import window_rows
from agent.data.store import TEACHER_CACHE_DIR, EpisodeStore, StoreError

KEY_CHARS = 16
# store entries per teacher call: a GPU is kept busy only by large batches (a 317M teacher at
# 65536 rows holds a few GB of activations)
DEFAULT_BATCH_ROWS = {"cpu": 4096, "cuda": 65536}


@dataclass(frozen=True)
class TeacherFunctions:
    """What the cache needs from a teacher (the seam tests use to inject stand-ins).

    reward(obs (B, D), action (B, A), task (B,) int64) -> predicted reward (B, 1)
    latent(obs (B, D), task (B,) int64) -> latent (B, Z); only needed for PCA latents
    """

    reward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    latent: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


TeacherFactory = Callable[[Path, str], TeacherFunctions]


def world_model_teacher(model) -> TeacherFunctions:
    """TeacherFunctions of an `agent.WorldModel` (put in eval mode)."""
    from agent.math import two_hot_inv

    model.eval()

    def reward(obs: torch.Tensor, action: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        logits = model.reward(model.encode(obs, task), action, task)
        return two_hot_inv(logits, model.cfg.vmin, model.cfg.vmax)

    return TeacherFunctions(reward=reward, latent=model.encode)


def load_teacher(path: Path, device: str) -> TeacherFunctions:
    """Default factory: the world model in `path` (any layout `agent.checkpoint` reads)."""
    from agent.checkpoint import load_world_model

    return world_model_teacher(load_world_model(path, device))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PcaLatents:
    """Teacher latents of every entry projected to k dims: latent[n, t] = (z - mean) @ components.T."""

    latent: np.ndarray                    # (N, L, k) float32 memmap
    mean: np.ndarray                      # (Z,) float32
    components: np.ndarray                # (k, Z) float32, orthonormal rows
    explained_variance_ratio: np.ndarray  # (k,) float32, on the fitting sample


@dataclass(frozen=True)
class TeacherCache:
    """A built cache, mapped read-only. See the module docstring for the exact definitions."""

    directory: Path
    teacher_sha256: str
    store: EpisodeStore
    teacher_reward: np.ndarray  # (N, L) float32 memmap, NaN at entry 0
    pca: PcaLatents | None = None

    @classmethod
    def get_or_build(
        cls,
        store: EpisodeStore | str | os.PathLike,
        teacher_path: str | os.PathLike,
        pca_dim: int | None = None,
        device: str = "cpu",
        *,
        cache_root: str | os.PathLike | None = None,
        batch_rows: int | None = None,
        prefetch: int = 2,
        pca_fit_rows: int = 65536,
        seed: int = 0,
        teacher_factory: TeacherFactory | None = None,
        lock_timeout: float = -1,
        progress: bool = False,
    ) -> "TeacherCache":
        """Open the cache of (teacher file, store), building missing parts first (once, under a lock).

        cache_root defaults to STORE/teacher_cache; pass another directory for a read-only store.
        teacher_factory(path, device) -> TeacherFunctions is called only if something must be built.
        lock_timeout: seconds to wait for another builder (-1 = forever).
        batch_rows: store entries per teacher call (None: DEFAULT_BATCH_ROWS of the device type).
        prefetch: blocks read ahead (and written behind) on background threads while the teacher
        runs (0: one block after another in this thread; the cache bytes are the same).
        """
        store = store if isinstance(store, EpisodeStore) else EpisodeStore(store)
        teacher_path = Path(teacher_path)
        if not teacher_path.is_file():
            raise StoreError(f"teacher checkpoint {teacher_path}: no such file")
        if pca_dim is not None and pca_dim < 1:
            raise ValueError(f"pca_dim must be >= 1, got {pca_dim}")
        teacher_sha = file_sha256(teacher_path)
        root = Path(cache_root) if cache_root is not None else store.path / TEACHER_CACHE_DIR
        directory = root / teacher_sha[:KEY_CHARS]
        directory.mkdir(parents=True, exist_ok=True)

        teacher: list[TeacherFunctions] = []  # loaded at most once, only when a part is built

        def get_teacher() -> TeacherFunctions:
            if not teacher:
                teacher.append((teacher_factory or load_teacher)(teacher_path, device))
            return teacher[0]

        if batch_rows is None:
            batch_rows = DEFAULT_BATCH_ROWS.get(torch.device(device).type, DEFAULT_BATCH_ROWS["cpu"])
        if batch_rows < 1 or prefetch < 0:
            raise ValueError(f"batch_rows must be >= 1 and prefetch >= 0, got {batch_rows} and {prefetch}")
        build = _Builder(store, device, batch_rows, progress, prefetch)
        meta = {"teacher_sha256": teacher_sha, "teacher_file": str(teacher_path.absolute()),
                "store_uid": store.uid, "episodes": store.num_episodes, "episode_length": store.episode_length}
        reward_dir = _ensure_part(directory / "reward", meta, lock_timeout,
                                  lambda tmp: build.teacher_reward(tmp, get_teacher()))
        pca = None
        if pca_dim is not None:
            pca_dir = _ensure_part(directory / f"pca{pca_dim}", {**meta, "pca_dim": pca_dim}, lock_timeout,
                                   lambda tmp: build.pca_latents(tmp, get_teacher(), pca_dim, pca_fit_rows, seed))
            pca = PcaLatents(
                latent=np.load(pca_dir / "latent.npy", mmap_mode="r"),
                mean=np.load(pca_dir / "mean.npy"),
                components=np.load(pca_dir / "components.npy"),
                explained_variance_ratio=np.load(pca_dir / "explained_variance_ratio.npy"),
            )
        return cls(directory, teacher_sha, store, np.load(reward_dir / "teacher_reward.npy", mmap_mode="r"), pca)

    def gather(self, episode: np.ndarray, start: np.ndarray, horizon: int) -> torch.Tensor:
        """Teacher rewards (H, B, 1) aligned with a sampler batch's action/reward for these windows."""
        rows = window_rows(episode, start, self.store.episode_length, horizon, offset=1)
        return torch.from_numpy(np.ascontiguousarray(self.teacher_reward.reshape(-1)[rows][..., None]))

    def gather_latent(self, episode: np.ndarray, start: np.ndarray, horizon: int) -> torch.Tensor:
        """PCA teacher latents (H+1, B, k) aligned with a sampler batch's obs."""
        if self.pca is None:
            raise StoreError(f"teacher cache {self.directory}: built without PCA latents (pass pca_dim)")
        rows = window_rows(episode, start, self.store.episode_length, horizon + 1)
        k = self.pca.latent.shape[-1]
        return torch.from_numpy(np.ascontiguousarray(self.pca.latent.reshape(-1, k)[rows]))


def _part_ready(part: Path, expected: dict) -> bool:
    """True if `part` is published and matches; raises if it belongs to another store version."""
    meta_file = part / "meta.json"
    if not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text())
    stale = [k for k, v in expected.items() if k != "teacher_file" and meta.get(k) != v]
    if stale:
        raise StoreError(
            f"teacher cache {part}: was built for different data ({', '.join(stale)} differ); delete it to rebuild"
        )
    return True


def _ensure_part(part: Path, meta: dict, lock_timeout: float, build: Callable[[Path], dict]) -> Path:
    """Publish `part` if absent: one process builds into a temp dir and renames; others wait."""
    if _part_ready(part, meta):
        return part
    with FileLock(str(part.parent / f".{part.name}.lock"), timeout=lock_timeout):
        if _part_ready(part, meta):  # built by whoever held the lock before us
            return part
        tmp = part.parent / f".{part.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            started = time.monotonic()
            extra = build(tmp)
            info = {**meta, **extra, "created": _utc_now(), "build_seconds": round(time.monotonic() - started, 3),
                    "torch": torch.__version__}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
            os.rename(tmp, part)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return part


_END = object()
POLL_S = 0.05


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item`, waiting for room unless `stop` is set (then False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    """The next item, or _END once `stop` is set and nothing is left."""
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            if stop.is_set():
                return _END


def pipelined(blocks: Sequence, read: Callable, compute: Callable, write: Callable, depth: int) -> None:
    """write(b, compute(b, read(b))) for every block b, in order.

    depth 0: one after another in this thread. depth >= 1: a reader thread runs up to `depth`
    blocks ahead (read: memmap -> host tensors) and a writer thread up to `depth` blocks behind
    (write: waits for the block's device->host copy, then stores it), so `compute` (the teacher,
    in this thread) never waits for the disk. The same calls on the same blocks either way, so the
    results are identical. An error in any of the three stops the others and is raised here."""
    if depth <= 0:
        for b in blocks:
            write(b, compute(b, read(b)))
        return
    stop = threading.Event()
    errors: list[BaseException] = []
    loaded: queue.Queue = queue.Queue(depth)
    computed: queue.Queue = queue.Queue(depth)

    def reader() -> None:
        try:
            for b in blocks:
                if not _put(loaded, (b, read(b)), stop):
                    return
        except BaseException as exc:
            errors.append(exc)
        finally:
            _put(loaded, _END, stop)

    def writer() -> None:
        try:
            while (item := _get(computed, stop)) is not _END:
                write(*item)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, name="teacher-cache-reader", daemon=True),
               threading.Thread(target=writer, name="teacher-cache-writer", daemon=True)]
    for thread in threads:
        thread.start()
    finished = False
    try:
        while not errors and (item := _get(loaded, stop)) is not _END:
            b, host = item
            _put(computed, (b, compute(b, host)), stop)
        finished = not errors
    finally:
        if finished:
            _put(computed, _END, stop)  # the writer stores everything queued, then exits
            threads[1].join()
        stop.set()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class _Builder:
    """Batched teacher forward passes over the store (no_grad, blocks of whole episodes).

    The store is streamed through `pipelined`: with `prefetch` >= 1 the next blocks are read from
    the memmap (into pinned host memory on CUDA, copied to the device without blocking) while the
    teacher runs the current one, and finished blocks are copied back and written behind it."""

    store: EpisodeStore
    device: str
    batch_rows: int
    progress: bool
    prefetch: int = 2

    @property
    def _cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def _blocks(self, rows_per_episode: int) -> list[tuple[int, int]]:
        per_block = max(1, self.batch_rows // rows_per_episode)
        N = self.store.num_episodes
        return [(lo, min(lo + per_block, N)) for lo in range(0, N, per_block)]

    def _host(self, x: np.ndarray) -> torch.Tensor:
        """A host tensor of `x` (a copy: memmap slices are read-only), pinned for a CUDA device."""
        t = torch.from_numpy(np.array(x))
        return t.pin_memory() if self._cuda else t

    def _tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else self._host(x)
        return t.to(self.device, non_blocking=True)

    def _to_host(self, t: torch.Tensor):
        """(host tensor, event or None): a non-blocking copy into pinned memory on CUDA; `_stored` waits for it."""
        if not self._cuda:
            return t.cpu(), None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def _stored(result) -> np.ndarray:
        host, event = result
        if event is not None:
            event.synchronize()
        return host.numpy()

    def _run(self, blocks, read, compute, write, desc: str) -> None:
        with tqdm(total=len(blocks), desc=desc, unit="block", disable=not self.progress) as bar:
            def write_and_count(b, result):
                write(b, result)
                bar.update(1)

            pipelined(blocks, read, compute, write_and_count, self.prefetch)

    @torch.no_grad()
    def teacher_reward(self, tmp: Path, teacher: TeacherFunctions) -> dict:
        s = self.store
        N, L = s.num_episodes, s.episode_length
        out = np.lib.format.open_memmap(tmp / "teacher_reward.npy", mode="w+", dtype=np.float32, shape=(N, L))
        out[:, 0] = np.nan

        def read(b):
            lo, hi = b
            return (self._host(s.obs[lo:hi, :-1].reshape(-1, s.obs_dim)),
                    self._host(s.action[lo:hi, 1:].reshape(-1, s.action_dim)),
                    self._host(np.repeat(s.task[lo:hi], L - 1)))

        def compute(b, host):
            lo, hi = b
            obs, action, task = (self._tensor(t) for t in host)
            return self._to_host(teacher.reward(obs, action, task).float().reshape(hi - lo, L - 1))

        def write(b, result):
            out[b[0]:b[1], 1:] = self._stored(result)

        self._run(self._blocks(L - 1), read, compute, write, "teacher rewards")
        out.flush()
        return {"kind": "teacher_reward", "batch_rows": self.batch_rows, "device": self.device}

    @torch.no_grad()
    def pca_latents(self, tmp: Path, teacher: TeacherFunctions, k: int, fit_rows: int, seed: int) -> dict:
        if teacher.latent is None:
            raise StoreError("teacher provides no latent function; PCA latents are unavailable")
        s = self.store
        N, L = s.num_episodes, s.episode_length
        total = N * L
        sample = np.sort(np.random.default_rng(seed).choice(total, size=min(fit_rows, total), replace=False))
        obs_flat = s.obs.reshape(-1, s.obs_dim)
        z = torch.cat([
            teacher.latent(self._tensor(obs_flat[rows]), self._tensor(s.task[rows // L])).double().cpu()
            for rows in np.array_split(sample, max(1, -(-sample.size // self.batch_rows)))
        ])
        if k > min(z.shape):
            raise StoreError(f"pca_dim {k} exceeds min(latent dim {z.shape[1]}, fitting rows {z.shape[0]})")
        mean = z.mean(0)
        _, singular, vt = torch.linalg.svd(z - mean, full_matrices=False)
        variance = singular.pow(2)
        components = vt[:k].float()
        mean32 = mean.float()
        np.save(tmp / "mean.npy", mean32.numpy())
        np.save(tmp / "components.npy", components.numpy())
        np.save(tmp / "explained_variance_ratio.npy", (variance[:k] / variance.sum()).float().numpy())
        out = np.lib.format.open_memmap(tmp / "latent.npy", mode="w+", dtype=np.float32, shape=(N, L, k))
        mean_d, comp_d = mean32.to(self.device), components.to(self.device)

        def read(b):
            lo, hi = b
            return self._host(s.obs[lo:hi].reshape(-1, s.obs_dim)), self._host(np.repeat(s.task[lo:hi], L))

        def compute(b, host):
            lo, hi = b
            obs, task = (self._tensor(t) for t in host)
            projected = (teacher.latent(obs, task).float() - mean_d) @ comp_d.T
            return self._to_host(projected.reshape(hi - lo, L, k))

        def write(b, result):
            out[b[0]:b[1]] = self._stored(result)

        self._run(self._blocks(L), read, compute, write, f"teacher latents -> PCA {k}")
        out.flush()
        return {"kind": "pca_latents", "pca_dim": k, "fit_rows": int(sample.size), "seed": seed,
                "batch_rows": self.batch_rows, "device": self.device}
