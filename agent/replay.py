"""In-memory episode buffer for online training, with the episode store's layout and alignment
(entry t holds obs_t and the action / reward that led to it; entry 0 action and reward are NaN),
so `agent.data.Sampler` samples it exactly like a store. Full: the oldest episode is overwritten.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.data.store import EpisodeStore, write_store


class EpisodeBuffer:
    """Fixed-length episodes of `episode_length` entries (= agent steps + 1).

    obs (N, L, obs_dim), action (N, L, action_dim), reward (N, L) float32, task (N,) int64.
    """

    def __init__(self, capacity: int, episode_length: int, obs_dim: int, action_dim: int, tasks: Sequence[str]):
        self.capacity, self.episode_length = capacity, episode_length
        self.obs_dim, self.action_dim, self.tasks = obs_dim, action_dim, list(tasks)
        self._obs = np.zeros((capacity, episode_length, obs_dim), np.float32)
        self._action = np.zeros((capacity, episode_length, action_dim), np.float32)
        self._reward = np.zeros((capacity, episode_length), np.float32)
        self._task = np.zeros(capacity, np.int64)
        self.num_added = 0
        self.path = Path("<memory>")

    @property
    def num_episodes(self) -> int:
        return min(self.num_added, self.capacity)

    def __len__(self) -> int:
        return self.num_episodes

    @property
    def obs(self) -> np.ndarray:
        return self._obs[: self.num_episodes]

    @property
    def action(self) -> np.ndarray:
        return self._action[: self.num_episodes]

    @property
    def reward(self) -> np.ndarray:
        return self._reward[: self.num_episodes]

    @property
    def task(self) -> np.ndarray:
        return self._task[: self.num_episodes]

    def episodes_of_tasks(self, task_ids: Sequence[int]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.task, np.asarray(task_ids, dtype=np.int64))).astype(np.int64)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, task: int) -> None:
        """One episode: obs (L, obs_dim), action (L, action_dim), reward (L,), official alignment."""
        slot = self.num_added % self.capacity
        self._obs[slot], self._action[slot], self._reward[slot], self._task[slot] = obs, action, reward, task
        self.num_added += 1

    def save(self, path: str | os.PathLike, task_set: str, mode: str = "create") -> EpisodeStore:
        """Write the buffered episodes as an episode store (reusable for offline distillation)."""
        return write_store(path, self.obs, self.action, self.reward, self.task, tasks=self.tasks, task_set=task_set,
                           mode=mode, source="agent.online")
