"""Multi-task view: task ids, zero-padded observations and action slicing for an ordered task list.

A `TaskSet` is an ordered list of task names; task id = index in that list (MT30 by default).
Observations are zero-padded at the end to `obs_pad` dims and agent actions have `action_pad`
dims, of which a task uses only its first `action_dim` entries (the "action mask").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from agent.envs.names import check_task
from agent.tasksets import MT30, MT30_ACTION_DIM, MT30_OBS_DIM
from agent.errors import ConfigError


def pad_obs(obs: np.ndarray, obs_pad: int = MT30_OBS_DIM) -> np.ndarray:
    """obs: (..., obs_dim) -> (..., obs_pad), zeros appended at the end."""
    obs = np.asarray(obs)
    missing = obs_pad - obs.shape[-1]
    if missing < 0:
        raise ConfigError(f"observation has {obs.shape[-1]} dims, more than the padded width {obs_pad}")
    return np.concatenate([obs, np.zeros(obs.shape[:-1] + (missing,), obs.dtype)], axis=-1)


def unpad_action(action: np.ndarray, action_dim: int) -> np.ndarray:
    """action: (..., action_pad) -> (..., action_dim), the entries a task's environment receives."""
    return np.asarray(action)[..., :action_dim]


@dataclass(frozen=True)
class TaskSet:
    """An ordered task list with its padding widths. ids: `names.index(task)`."""

    names: tuple[str, ...] = tuple(MT30)
    obs_pad: int = MT30_OBS_DIM
    action_pad: int = MT30_ACTION_DIM
    obs_dims: tuple[int, ...] = field(init=False)
    action_dims: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        names = tuple(self.names)
        if not names:
            raise ConfigError("a task set needs at least one task")
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate task names in task set: {list(names)}")
        specs = [check_task(n) for n in names]
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "obs_dims", tuple(s.obs_dim for s in specs))
        object.__setattr__(self, "action_dims", tuple(s.action_dim for s in specs))
        if max(self.obs_dims) > self.obs_pad or max(self.action_dims) > self.action_pad:
            raise ConfigError(f"pad widths obs {self.obs_pad} / action {self.action_pad} are smaller than the "
                              f"largest task dims {max(self.obs_dims)} / {max(self.action_dims)}")

    @classmethod
    def tight(cls, names: Sequence[str]) -> "TaskSet":
        """Padded to the largest obs / action dims of `names` instead of MT30's 24 / 6."""
        specs = [check_task(n) for n in names]
        return cls(tuple(names), max(s.obs_dim for s in specs), max(s.action_dim for s in specs))

    def __len__(self) -> int:
        return len(self.names)

    def task_id(self, name: str) -> int:
        check_task(name)
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"task {name!r} is not in this task set ({', '.join(self.names)})") from None

    def action_mask(self) -> np.ndarray:
        """(num_tasks, action_pad) float32: 1 for the first action_dim(task) dims, else 0."""
        return (np.arange(self.action_pad)[None, :] < np.asarray(self.action_dims)[:, None]).astype(np.float32)


class MultitaskEnv:
    """One environment per task of a TaskSet, all built with the same seed (as the official
    multi-task env); `reset(task)` selects the sub-environment, like TD-MPC2's MultitaskWrapper.

    reset(task: id or name) -> obs: (obs_pad,) float32
    step(action: (action_pad,)) -> (obs (obs_pad,), reward, terminated, truncated, info)
    """

    def __init__(self, task_set: TaskSet, seed: int):
        from agent.envs import make_env  # local: agent.envs imports this module

        self.task_set = task_set
        self.envs = [make_env(name, seed) for name in task_set.names]
        self.task_id = 0

    @property
    def task(self) -> str:
        return self.task_set.names[self.task_id]

    @property
    def max_episode_steps(self) -> int:
        return self.envs[self.task_id].max_episode_steps

    def reset(self, task: int | str) -> np.ndarray:
        self.task_id = self.task_set.task_id(task) if isinstance(task, str) else int(task)
        if not 0 <= self.task_id < len(self.task_set):
            raise ConfigError(f"task id {task} out of range 0..{len(self.task_set) - 1}")
        return pad_obs(self.envs[self.task_id].reset(), self.task_set.obs_pad)

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        env = self.envs[self.task_id]
        action = np.asarray(action, np.float32)
        if action.shape != (self.task_set.action_pad,):
            raise ConfigError(f"expected an action of shape ({self.task_set.action_pad},), got {action.shape}")
        obs, reward, terminated, truncated, info = env.step(unpad_action(action, env.action_dim))
        return pad_obs(obs, self.task_set.obs_pad), reward, terminated, truncated, dict(info, task_id=self.task_id)


def make_multitask_env(tasks: Sequence[str] | TaskSet = MT30, seed: int = 1) -> MultitaskEnv:
    task_set = tasks if isinstance(tasks, TaskSet) else TaskSet(tuple(tasks))
    return MultitaskEnv(task_set, seed)
