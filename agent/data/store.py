"""Episode store: fixed-length episodes as memory-mapped .npy arrays plus a manifest.

Layout of a store directory::

    STORE/
      manifest.json    format version, task set, dims, counts, per-array sha256, creation info
      obs.npy          float32 (N, L, obs_dim)
      action.npy       float32 (N, L, action_dim)
      reward.npy       float32 (N, L)
      task.npy         int64   (N,)
      terminated.npy   float32 (N, L)   optional (1.0 = episode terminated at this entry; NaN at entry 0)
      teacher_cache/   derived data (see teacher_cache.py); never carried into a new version

Alignment (the official TD-MPC2 one): entry t of an episode holds obs_t together with the action
and reward that led to it, so entry 0 has NaN action and reward. The transition
obs_{t-1} --action_t--> (reward_t, obs_t) therefore lives in entries t-1 and t.

Writers build a complete new version in a sibling temp directory and publish it with a rename
(`agent.data.atomic`), so readers only ever see a finished store; a reader that already has arrays
mapped keeps valid maps even after the store is replaced (the old files stay alive until
unmapped). Array files are plain .npy files written and read with numpy's format functions
(`agent.data.npy`). This module holds the store's layout, its writer and its reader/validator.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch

from agent.data import npy
from agent.data.atomic import PathBusy, StagedDirectory, exchange_paths
from agent.errors import DistillError

if TYPE_CHECKING:
    from agent.data.sampler import Sampler

FORMAT_NAME = "distill-sweeps/episode-store"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TEACHER_CACHE_DIR = "teacher_cache"
ALIGNMENT = (
    "entry t holds obs_t and the action/reward that led to it; "
    "entry 0 action and reward are NaN (official TD-MPC2 layout)"
)


class StoreError(DistillError):
    """A store path is not a valid, complete episode store (one-line message naming the path)."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: dtype and the shape of one episode's slice."""

    name: str
    dtype: np.dtype
    per_episode: tuple[int, ...]
    optional: bool = False

    @property
    def file(self) -> str:
        return f"{self.name}.npy"


def array_specs(episode_length: int, obs_dim: int, action_dim: int) -> dict[str, ArraySpec]:
    """The store's arrays for these dimensions, in file order."""
    L = episode_length
    return {
        "obs": ArraySpec("obs", np.dtype(np.float32), (L, obs_dim)),
        "action": ArraySpec("action", np.dtype(np.float32), (L, action_dim)),
        "reward": ArraySpec("reward", np.dtype(np.float32), (L,)),
        "task": ArraySpec("task", np.dtype(np.int64), ()),
        "terminated": ArraySpec("terminated", np.dtype(np.float32), (L,), optional=True),
    }


@dataclass(frozen=True)
class ArrayInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class StoreManifest:
    """Contents of manifest.json. `entries` = episodes * episode_length (the official dataset's
    345,690,000 counts entries); `transitions` = episodes * (episode_length - 1)."""

    uid: str
    task_set: str
    tasks: list[str]
    obs_dim: int
    action_dim: int
    episode_length: int
    episodes: int
    entries: int
    transitions: int
    arrays: dict[str, ArrayInfo]
    created: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    alignment: str = ALIGNMENT
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["arrays"] = {k: {**asdict(v), "shape": list(v.shape)} for k, v in self.arrays.items()}
        head = {"format": data.pop("format"), "format_version": data.pop("format_version")}
        return json.dumps({**head, **data}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> "StoreManifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"episode store {where}: corrupt {MANIFEST_FILE} ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise StoreError(f"episode store {where}: {MANIFEST_FILE} is not an episode-store manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"episode store {where}: format version {data.get('format_version')!r} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        try:
            arrays = {
                k: ArrayInfo(file=str(v["file"]), dtype=str(v["dtype"]), shape=tuple(int(s) for s in v["shape"]),
                             sha256=str(v["sha256"]))
                for k, v in data.pop("arrays").items()
            }
            return cls(arrays=arrays, **data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"episode store {where}: corrupt {MANIFEST_FILE} (bad or missing field: {e})") from None


# ----------------------------------------------------------------------------------------------
# Writer


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _drop_last_unit_dim(x: np.ndarray) -> np.ndarray:
    """(n, L, 1) -> (n, L); other shapes unchanged."""
    return x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x


# the publishing step's atomic swap, looked up here at publish time (tests replace it)
_exchange_paths = exchange_paths


WriteMode = Literal["create", "append", "overwrite"]


class EpisodeStoreWriter:
    """Build an episode store aside and publish it atomically on `commit()`.

    mode: "create" (the path must not exist), "append" (copy the existing store's episodes into the
    new version, then add; creates the store if absent) or "overwrite" (replace whatever is there).
    The existing store stays intact and readable until the publishing rename. One writer per path
    at a time (a file lock beside the store); a writer that dies leaves only a hidden
    `.NAME.tmp-PID-*` directory, which the next writer of that path removes.

    Use as a context manager: commits on a clean exit, aborts (deletes the temp dir) on exception.

        with EpisodeStoreWriter(path, tasks=MT30, task_set="mt30", obs_dim=24, action_dim=6,
                                episode_length=501) as writer:
            writer.append(obs, action, reward, task)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tasks: Sequence[str],
        task_set: str,
        obs_dim: int,
        action_dim: int,
        episode_length: int,
        mode: WriteMode = "create",
        source: str = "",
        info: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("create", "append", "overwrite"):
            raise ValueError(f"unknown write mode {mode!r}")
        self.path = Path(path).absolute()
        self.tasks = list(tasks)
        self.task_set = task_set
        self.obs_dim, self.action_dim, self.episode_length = int(obs_dim), int(action_dim), int(episode_length)
        self.mode = mode
        self._op = {"utc": _utc_now(), "op": mode, "source": source, **(info or {})}
        self._specs = array_specs(self.episode_length, self.obs_dim, self.action_dim)
        self._files: dict[str, npy.Appender] = {}
        self._closed = False

        try:
            self._staged = StagedDirectory(self.path)
        except PathBusy:
            raise StoreError(f"episode store {self.path}: another writer is building it right now") from None
        try:
            self._previous = self._check_target()
            self._tmp = self._staged.begin()  # (removes the temp dirs of writers that died)
            for name in ("obs", "action", "reward", "task"):
                self._open_array(name)
            if self._previous is not None:
                self._copy_previous(self._previous)
        except BaseException:
            self.abort()
            raise

    def _check_target(self) -> "EpisodeStore | None":
        """The existing store whose episodes this version starts from (append), else None."""
        if not self.path.exists():
            return None
        if self.mode == "create":
            raise StoreError(f"episode store {self.path}: already exists (append or overwrite it explicitly)")
        if self.mode == "overwrite":
            if not self.path.is_dir():
                raise StoreError(f"episode store {self.path}: exists and is not a directory; refusing to replace it")
            return None
        previous = EpisodeStore(self.path)
        mismatch = [
            f"{name} {have!r} != {want!r}"
            for name, have, want in (
                ("task_set", previous.manifest.task_set, self.task_set),
                ("tasks", previous.tasks, self.tasks),
                ("obs_dim", previous.obs_dim, self.obs_dim),
                ("action_dim", previous.action_dim, self.action_dim),
                ("episode_length", previous.episode_length, self.episode_length),
            )
            if have != want
        ]
        if mismatch:
            raise StoreError(f"episode store {self.path}: cannot append, {'; '.join(mismatch)}")
        return previous

    def _open_array(self, name: str) -> npy.Appender:
        spec = self._specs[name]
        writer = npy.Appender(self._tmp / spec.file, spec.dtype, spec.per_episode)
        self._files[name] = writer
        return writer

    def _copy_previous(self, previous: "EpisodeStore") -> None:
        for name, info in previous.manifest.arrays.items():
            writer = self._files.get(name) or self._open_array(name)
            writer.copy_from(previous.path / info.file, previous.num_episodes)
        self._op["episodes_before"] = previous.num_episodes

    @property
    def num_episodes(self) -> int:
        return self._files["task"].rows

    def append(self, obs: Any, action: Any, reward: Any, task: Any, terminated: Any = None) -> None:
        """Add n whole episodes (numpy arrays or torch tensors, official alignment).

        obs (n, L, obs_dim), action (n, L, action_dim), reward (n, L) or (n, L, 1), task (n,) ints,
        terminated (n, L) or (n, L, 1) optional; a store has `terminated` for every episode or for none.
        """
        if self._closed:
            raise StoreError(f"episode store {self.path}: writer already committed or aborted")
        obs, action, reward, task = (_as_numpy(x) for x in (obs, action, reward, task))
        n = obs.shape[0] if obs.ndim else -1
        columns = {"obs": obs, "action": action, "reward": _drop_last_unit_dim(reward), "task": task}
        if terminated is not None:
            columns["terminated"] = _drop_last_unit_dim(_as_numpy(terminated))
        for name, data in columns.items():
            want = (n, *self._specs[name].per_episode)
            if data.shape != want:
                raise StoreError(f"episode store {self.path}: {name} has shape {tuple(data.shape)}, expected {want}")
        if task.size and (task.min() < 0 or task.max() >= len(self.tasks)):
            raise StoreError(
                f"episode store {self.path}: task ids must lie in [0, {len(self.tasks)}), got {task.min()}..{task.max()}"
            )
        has_terminated = "terminated" in self._files
        if terminated is None and has_terminated:
            raise StoreError(f"episode store {self.path}: this store records `terminated`; pass it for every episode")
        if terminated is not None and not has_terminated:
            if self.num_episodes:
                raise StoreError(
                    f"episode store {self.path}: `terminated` given now but not for the {self.num_episodes} earlier episodes"
                )
            self._open_array("terminated")
        for name, data in columns.items():
            self._files[name].write(data)

    def commit(self) -> "EpisodeStore":
        """Finish the files, write the manifest and publish the new version; returns a reader."""
        if self._closed:
            raise StoreError(f"episode store {self.path}: writer already committed or aborted")
        try:
            if self.num_episodes == 0:
                raise StoreError(f"episode store {self.path}: no episodes were written; nothing to commit")
            arrays = {name: self._finish_array(name) for name in self._files}
            n, L = self.num_episodes, self.episode_length
            previous = self._previous
            manifest = StoreManifest(
                uid=uuid.uuid4().hex,
                task_set=self.task_set,
                tasks=self.tasks,
                obs_dim=self.obs_dim,
                action_dim=self.action_dim,
                episode_length=L,
                episodes=n,
                entries=n * L,
                transitions=n * (L - 1),
                arrays=arrays,
                created=previous.manifest.created if previous else {
                    "utc": self._op["utc"], "host": socket.gethostname(), "source": self._op["source"],
                    "numpy": np.__version__, "torch": torch.__version__,
                },
                history=[*(previous.manifest.history if previous else []), {**self._op, "episodes_after": n}],
            )
            with open(self._tmp / MANIFEST_FILE, "w") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return EpisodeStore(self.path)

    def _finish_array(self, name: str) -> ArrayInfo:
        writer, spec = self._files[name], self._specs[name]
        shape = writer.finish()
        return ArrayInfo(spec.file, spec.dtype.str, shape, writer.sha256.hexdigest())

    def _publish(self) -> None:
        existed = self.path.exists()
        try:
            self._staged.publish(exchange=_exchange_paths)
        except OSError as e:
            if existed:
                raise
            raise StoreError(f"episode store {self.path}: cannot publish ({e.strerror})") from None

    def abort(self) -> None:
        """Discard everything written; the published store (if any) is untouched."""
        if self._closed:
            return
        self._closed = True
        for writer in self._files.values():
            writer.close()
        staged = getattr(self, "_staged", None)
        if staged is not None:
            staged.abort()

    def __enter__(self) -> "EpisodeStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_store(
    path: str | os.PathLike,
    obs: Any,
    action: Any,
    reward: Any,
    task: Any,
    *,
    tasks: Sequence[str],
    task_set: str,
    terminated: Any = None,
    mode: WriteMode = "create",
    source: str = "",
) -> "EpisodeStore":
    """Write (or append) in-memory episodes in one call; shapes as in `EpisodeStoreWriter.append`."""
    obs = _as_numpy(obs)
    with EpisodeStoreWriter(
        path, tasks=tasks, task_set=task_set, obs_dim=obs.shape[-1], action_dim=_as_numpy(action).shape[-1],
        episode_length=obs.shape[1], mode=mode, source=source,
    ) as writer:
        writer.append(obs, action, reward, task, terminated)
    return EpisodeStore(path)


# ----------------------------------------------------------------------------------------------
# Reader


class EpisodeStore:
    """Read-only view of a committed store; arrays are np.memmap (mode 'r') and load lazily.

    obs (N, L, obs_dim) float32, action (N, L, action_dim) float32, reward (N, L) float32,
    task (N,) int64, terminated (N, L) float32 or None.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        if not self.path.is_dir():
            what = "does not exist" if not self.path.exists() else "is not a directory"
            raise StoreError(f"episode store {self.path}: {what}")
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise StoreError(f"episode store {self.path}: no {MANIFEST_FILE} (not an episode store, or a write never finished)")
        self.manifest = StoreManifest.from_json(manifest_path.read_text(), self.path)
        m = self.manifest
        if m.episodes <= 0:
            raise StoreError(f"episode store {self.path}: is empty (0 episodes)")
        specs = array_specs(m.episode_length, m.obs_dim, m.action_dim)
        self._arrays: dict[str, np.memmap] = {}
        for name, spec in specs.items():
            if name not in m.arrays:
                if spec.optional:
                    continue
                raise StoreError(f"episode store {self.path}: {MANIFEST_FILE} lists no `{name}` array")
            self._arrays[name] = self._open_array(spec, m.arrays[name], m.episodes)

    def _open_array(self, spec: ArraySpec, info: ArrayInfo, episodes: int) -> np.memmap:
        file = self.path / info.file
        want_shape = (episodes, *spec.per_episode)
        if not file.is_file():
            raise StoreError(f"episode store {self.path}: array file {info.file} is missing")
        if tuple(info.shape) != want_shape or np.dtype(info.dtype) != spec.dtype:
            raise StoreError(
                f"episode store {self.path}: manifest entry for {info.file} says {info.dtype} {tuple(info.shape)}, "
                f"expected {spec.dtype.str} {want_shape}"
            )
        try:
            header = npy.read_header(file)
        except (ValueError, OSError) as e:
            raise StoreError(f"episode store {self.path}: {info.file} has no readable .npy header ({e})") from None
        expected_bytes = header.offset + int(np.prod(want_shape)) * spec.dtype.itemsize
        actual_bytes = file.stat().st_size
        if actual_bytes != expected_bytes:
            raise StoreError(
                f"episode store {self.path}: {info.file} has {actual_bytes} bytes, expected {expected_bytes} "
                f"for {spec.dtype.str} {want_shape} (truncated or rewritten)"
            )
        try:
            array = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise StoreError(f"episode store {self.path}: cannot map {info.file} ({e})") from None
        if array.shape != want_shape or array.dtype != spec.dtype:
            raise StoreError(
                f"episode store {self.path}: {info.file} holds {array.dtype.str} {array.shape}, "
                f"manifest says {spec.dtype.str} {want_shape}"
            )
        return array

    # -- shape facts ---------------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        return self.manifest.episodes

    @property
    def episode_length(self) -> int:
        return self.manifest.episode_length

    @property
    def obs_dim(self) -> int:
        return self.manifest.obs_dim

    @property
    def action_dim(self) -> int:
        return self.manifest.action_dim

    @property
    def tasks(self) -> list[str]:
        return self.manifest.tasks

    @property
    def uid(self) -> str:
        """Changes with every committed version (append/overwrite)."""
        return self.manifest.uid

    def __len__(self) -> int:
        return self.num_episodes

    # -- arrays --------------------------------------------------------------------------------
    @property
    def obs(self) -> np.memmap:
        return self._arrays["obs"]

    @property
    def action(self) -> np.memmap:
        return self._arrays["action"]

    @property
    def reward(self) -> np.memmap:
        return self._arrays["reward"]

    @property
    def task(self) -> np.memmap:
        return self._arrays["task"]

    @property
    def terminated(self) -> np.memmap | None:
        return self._arrays.get("terminated")

    def episodes_of_tasks(self, task_ids: Sequence[int]) -> np.ndarray:
        """Indices (int64) of the episodes whose task id is in `task_ids`."""
        return np.flatnonzero(np.isin(self.task, np.asarray(task_ids, dtype=np.int64))).astype(np.int64)

    # -- sampling ------------------------------------------------------------------------------
    def sampler(self, batch_size: int, horizon: int, seed: int | None = None,
                task_ids: Sequence[int] | None = None) -> "Sampler":
        """A reproducible stream of batches; see `agent.data.sampler.Sampler`."""
        from agent.data.sampler import Sampler

        return Sampler(self, batch_size, horizon, seed=seed, task_ids=task_ids)

    def sample(self, batch_size: int, horizon: int, seed: int | None = None, return_index: bool = False):
        """One batch `(obs, action, reward, task[, index])`; see `Sampler.next`."""
        return self.sampler(batch_size, horizon, seed=seed).next(return_index=return_index)

    # -- integrity -----------------------------------------------------------------------------
    def verify(self) -> None:
        """Recompute every array's sha256 (reads the whole store) and raise StoreError on mismatch."""
        for name, info in self.manifest.arrays.items():
            digest = hashlib.sha256()
            file = self.path / info.file
            with open(file, "rb") as f:
                f.seek(npy.data_offset(file))
                while block := f.read(npy.COPY_BLOCK_BYTES):
                    digest.update(block)
            if digest.hexdigest() != info.sha256:
                raise StoreError(f"episode store {self.path}: {info.file} does not match its sha256 in {MANIFEST_FILE}")

    def __repr__(self) -> str:
        m = self.manifest
        return (f"EpisodeStore({str(self.path)!r}, episodes={m.episodes}, episode_length={m.episode_length}, "
                f"obs_dim={m.obs_dim}, action_dim={m.action_dim}, task_set={m.task_set!r})")
