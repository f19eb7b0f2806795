"""Convert the official TD-MPC2 multi-task dataset (pickled TensorDict chunks) into an episode store.

Each chunk `chunk_*.pt` is a TensorDict with batch shape (episodes, episode_length) and keys
obs (..., 24), action (..., 6), reward (...) or (..., 1), task (...) int (the same id at every
step), optionally terminated; other keys are ignored. Its alignment is already the store's.

Unpickling runs arbitrary code, so loading needs an explicit `trust_pickle=True`. Chunks are
converted one at a time (memory-mapped by torch.load where the file format allows it) and streamed
into the store writer in blocks of episodes, so memory stays bounded by about one chunk.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from agent.data.store import EpisodeStore, EpisodeStoreWriter, StoreError, WriteMode
from agent.errors import DistillError
from agent.tasksets import MT30

TASK_SETS: dict[str, list[str]] = {"mt30": MT30}
_REQUIRED_KEYS = ("obs", "action", "reward", "task")


class UntrustedPickleError(DistillError):
    """Loading the file would unpickle it, and the caller has not said the source is trusted."""


class ChunkError(DistillError):
    """A chunk file does not have the official layout."""


def chunk_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories to their sorted `*.pt` files; keep files in the given order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.pt"))
            if not found:
                raise ChunkError(f"{p}: directory holds no *.pt chunk files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ChunkError(f"{p}: no such chunk file")
    if not files:
        raise ChunkError("no chunk files given")
    return files


def load_chunk(path: Path, *, trust_pickle: bool) -> Any:
    """torch.load a chunk (full unpickling); memory-mapped when the file is in zip format."""
    if not trust_pickle:
        raise UntrustedPickleError(
            f"refusing to load {path}: these chunks are pickles and unpickling can run arbitrary code; "
            "pass --trust-pickle (trust_pickle=True) only for files from a source you trust"
        )
    try:
        try:
            return torch.load(path, weights_only=False, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, weights_only=False, map_location="cpu")  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a chunk"
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ChunkError(f"{path}: cannot load ({type(e).__name__}: {first_line})") from None


def _field(chunk: Any, key: str, path: Path) -> torch.Tensor | None:
    try:
        value = chunk.get(key, None)
    except (AttributeError, TypeError):
        raise ChunkError(f"{path}: holds a {type(chunk).__name__}, not a TensorDict of episodes") from None
    if value is not None and not isinstance(value, torch.Tensor):
        raise ChunkError(f"{path}: `{key}` is a {type(value).__name__}, expected a tensor")
    return value


class ChunkColumns:
    """The store's columns of one loaded chunk, validated; slices are taken lazily per block.

    obs (E, L, D) float, action (E, L, A), reward (E, L), task (E,) int64, terminated (E, L) or None.
    """

    def __init__(self, chunk: Any, path: Path) -> None:
        fields = {key: _field(chunk, key, path) for key in (*_REQUIRED_KEYS, "terminated")}
        missing = [k for k in _REQUIRED_KEYS if fields[k] is None]
        if missing:
            raise ChunkError(f"{path}: missing key(s) {', '.join(missing)}")
        obs, action, reward, task = (fields[k] for k in _REQUIRED_KEYS)
        if obs.ndim != 3 or action.ndim != 3:
            raise ChunkError(f"{path}: obs/action must be (episodes, steps, dim), got {tuple(obs.shape)} / {tuple(action.shape)}")
        self.episodes, self.episode_length = obs.shape[:2]
        self.obs_dim, self.action_dim = obs.shape[2], action.shape[2]
        E_L = (self.episodes, self.episode_length)
        self.reward = _squeeze_steps(reward, E_L, "reward", path)
        self.terminated = None if fields["terminated"] is None else _squeeze_steps(fields["terminated"], E_L, "terminated", path)
        if tuple(action.shape[:2]) != E_L:
            raise ChunkError(f"{path}: action has shape {tuple(action.shape)}, expected ({E_L[0]}, {E_L[1]}, A)")
        self.obs, self.action = obs, action
        self.task = self._task_per_episode(task, E_L, path)

    @staticmethod
    def _task_per_episode(task: torch.Tensor, E_L: tuple[int, int], path: Path) -> torch.Tensor:
        if task.is_floating_point() and not bool((task == task.round()).all()):
            raise ChunkError(f"{path}: task ids must be integers, got non-integral {task.dtype} values")
        if task.ndim == 1 and task.shape[0] == E_L[0]:
            return task.long()
        task = _squeeze_steps(task, E_L, "task", path)
        if not bool((task == task[:, :1]).all()):
            raise ChunkError(f"{path}: task id changes within an episode")
        return task[:, 0].long()

    def block(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Episodes lo..hi-1 as numpy arrays (views of the chunk where dtypes already match)."""
        out = {
            "obs": self.obs[lo:hi].numpy(), "action": self.action[lo:hi].numpy(),
            "reward": self.reward[lo:hi].numpy(), "task": self.task[lo:hi].numpy(),
        }
        if self.terminated is not None:
            out["terminated"] = self.terminated[lo:hi].float().numpy()
        return out


def _squeeze_steps(x: torch.Tensor, E_L: tuple[int, int], key: str, path: Path) -> torch.Tensor:
    """(E, L) or (E, L, 1) -> (E, L)."""
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if tuple(x.shape) != E_L:
        raise ChunkError(f"{path}: {key} has shape {tuple(x.shape)}, expected {E_L} or {(*E_L, 1)}")
    return x


def import_tdmpc2(
    chunks: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    trust_pickle: bool,
    task_set: str = "mt30",
    mode: WriteMode = "create",
    block_episodes: int = 1024,
    progress: bool = True,
) -> EpisodeStore:
    """Import official chunk files (directories expand to their sorted *.pt) into the store `out`.

    All chunks must share episode length and dims. Returns the committed store.
    """
    if not trust_pickle:  # refuse before touching any file
        raise UntrustedPickleError(
            "refusing to load TD-MPC2 chunks: they are pickles and unpickling can run arbitrary code; "
            "pass --trust-pickle (trust_pickle=True) only for files from a source you trust"
        )
    if task_set not in TASK_SETS:
        raise StoreError(f"unknown task set {task_set!r}; known: {', '.join(TASK_SETS)}")
    files = chunk_files(chunks)
    writer: EpisodeStoreWriter | None = None
    try:
        for path in tqdm(files, desc="chunks", unit="chunk", disable=not progress):
            columns = ChunkColumns(load_chunk(path, trust_pickle=True), path)
            if writer is None:
                writer = EpisodeStoreWriter(
                    out, tasks=TASK_SETS[task_set], task_set=task_set, obs_dim=columns.obs_dim,
                    action_dim=columns.action_dim, episode_length=columns.episode_length, mode=mode,
                    source="tdmpc2-import", info={"chunks": [str(f) for f in files]},
                )
            dims = (columns.episode_length, columns.obs_dim, columns.action_dim)
            want = (writer.episode_length, writer.obs_dim, writer.action_dim)
            if dims != want:
                raise ChunkError(f"{path}: (episode_length, obs_dim, action_dim) = {dims}, earlier chunks had {want}")
            bar = tqdm(total=columns.episodes, desc=path.name, unit="ep", leave=False, disable=not progress)
            for lo in range(0, columns.episodes, block_episodes):
                hi = min(lo + block_episodes, columns.episodes)
                block = columns.block(lo, hi)
                writer.append(block["obs"], block["action"], block["reward"], block["task"], block.get("terminated"))
                bar.update(hi - lo)
            bar.close()
            del columns  # release the chunk before loading the next
        assert writer is not None
        return writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
