"""Uniform sub-trajectory sampling from an episode store (vectorised gathers, no per-sample loop).

A window of horizon H starting at entry s of episode n covers entries s..s+H of that episode:

    obs    = obs[n, s : s+H+1]        -> (H+1, B, obs_dim)
    action = action[n, s+1 : s+H+1]   -> (H, B, action_dim)   action[h] moves obs[h] to obs[h+1]
    reward = reward[n, s+1 : s+H+1]   -> (H, B, 1)            reward of that move
    task   = task[n]                  -> (B,)

Valid starts are 0..L-1-H, so a window never crosses an episode boundary and never includes the
NaN action/reward of entry 0. Episodes all have length L, so drawing the episode and the start
independently and uniformly is uniform over all valid (episode, start) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from agent.data.store import StoreError

if TYPE_CHECKING:
    from agent.data.store import EpisodeStore


@dataclass(frozen=True)
class SampleIndex:
    """Where a batch came from: episode (B,) int64 and start entry (B,) int64 of each window."""

    episode: np.ndarray
    start: np.ndarray


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def window_rows(episode: np.ndarray, start: np.ndarray, episode_length: int, steps: int, offset: int = 0) -> np.ndarray:
    """Flat entry indices (steps, B) of entries start+offset .. start+offset+steps-1 of each episode."""
    first = episode.astype(np.int64) * episode_length + start.astype(np.int64) + offset
    return first[None, :] + np.arange(steps, dtype=np.int64)[:, None]


def gather_windows(store: "EpisodeStore", episode: np.ndarray, start: np.ndarray, horizon: int) -> Batch:
    """The windows of `horizon` starting at (episode[i], start[i]); shapes in the module docstring."""
    L = store.episode_length
    obs_rows = window_rows(episode, start, L, horizon + 1)
    step_rows = obs_rows[1:]
    obs = store.obs.reshape(-1, store.obs_dim)[obs_rows]
    action = store.action.reshape(-1, store.action_dim)[step_rows]
    reward = store.reward.reshape(-1)[step_rows][..., None]
    task = store.task[episode]
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in (obs, action, reward, task))  # type: ignore[return-value]


class Sampler:
    """Reproducible stream of uniformly sampled windows from one store.

    `next()` -> (obs (H+1, B, obs_dim), action (H, B, A), reward (H, B, 1), task (B,)) float32/int64
    CPU tensors; `next(return_index=True)` appends a `SampleIndex` so per-entry side data (e.g. a
    teacher-target cache) can be gathered for the same windows. `task_ids` restricts sampling to
    the episodes of those tasks.
    """

    def __init__(self, store: "EpisodeStore", batch_size: int, horizon: int, seed: int | None = None,
                 task_ids: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= horizon <= store.episode_length - 1:
            raise ValueError(f"horizon must lie in [1, {store.episode_length - 1}] for episodes of length "
                             f"{store.episode_length}, got {horizon}")
        self.store = store
        self.batch_size = batch_size
        self.horizon = horizon
        self.rng = np.random.default_rng(seed)
        self.num_starts = store.episode_length - horizon
        self.episode_pool: np.ndarray | None = None
        if task_ids is not None:
            self.episode_pool = store.episodes_of_tasks(task_ids)
            if self.episode_pool.size == 0:
                raise StoreError(f"episode store {store.path}: no episodes of tasks {list(task_ids)}")

    def draw_index(self) -> SampleIndex:
        """The next B (episode, start) pairs, without reading any data."""
        B = self.batch_size
        if self.episode_pool is None:
            episode = self.rng.integers(0, self.store.num_episodes, size=B, dtype=np.int64)
        else:
            episode = self.episode_pool[self.rng.integers(0, self.episode_pool.size, size=B)]
        start = self.rng.integers(0, self.num_starts, size=B, dtype=np.int64)
        return SampleIndex(episode, start)

    def next(self, return_index: bool = False):
        index = self.draw_index()
        batch = gather_windows(self.store, index.episode, index.start, self.horizon)
        return (*batch, index) if return_index else batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()
