"""Roll a policy out in batched MT30 environments and record full episodes in the store layout.

Episodes have 500 agent steps (`episode_steps`, shorter only for tests and smoke runs), stored as
501 entries in the official alignment: entry 0 holds the
reset observation with NaN action/reward, entry t >= 1 holds obs_t with the action and reward that
led to it. Actions are stored padded to the task set's action width (zero beyond a task's dims).

Seeding: episode k of task T starts from the first reset() of `make_env(T, seed + k)` and draws its
exploration noise from its own generator seeded by (seed, task id, k); MPPI's planning noise is one
torch stream seeded by `seed`. A collection is reproducible for fixed (policy, tasks, episodes,
seed, num_envs); a different num_envs changes the float rounding of batched forward passes, which
the chaotic dynamics amplify.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from agent.data.store import EpisodeStore, EpisodeStoreWriter, StoreError, WriteMode
from agent.envs import TaskSet, make_env, pad_obs
from agent.errors import ConfigError
from agent.tasksets import EPISODE_LENGTH, MT30

# policy(obs (E, obs_pad) float32, task (E,) int64, t0 (E,) bool) -> actions (E, action_pad) in [-1, 1]
Policy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CollectedEpisodes:
    """Episodes in the store layout: obs (N, L, obs_pad), action (N, L, action_pad), reward (N, L),
    task (N,) int64 ids in `task_names`; L = 501 with NaN action/reward at entry 0."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    task: np.ndarray
    task_names: tuple[str, ...]

    @property
    def returns(self) -> np.ndarray:
        """(N,) float32 episode returns (sum of the step rewards)."""
        return np.nansum(self.reward, axis=1, dtype=np.float32)

    def __len__(self) -> int:
        return self.task.shape[0]

    @staticmethod
    def concatenate(parts: Sequence["CollectedEpisodes"]) -> "CollectedEpisodes":
        return CollectedEpisodes(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("obs", "action", "reward", "task")),
                                 task_names=parts[0].task_names)


def policy_from(model_or_policy: Any, plan: bool = True, seed: int | None = None, **planning_overrides: Any) -> Policy:
    """A Policy from an `agent.Agent` (its `act`), an `agent.WorldModel` (wrapped in an Agent that
    plans with MPPI if `plan`, else acts with the policy prior's mean) or a Policy callable."""
    from agent.planner import Agent
    from agent.world_model import WorldModel

    if isinstance(model_or_policy, WorldModel):
        model_or_policy = Agent(model_or_policy, seed=seed, mpc=plan, **planning_overrides)
    if isinstance(model_or_policy, Agent):
        agent = model_or_policy
        return lambda obs, task, t0: agent.act(obs, task, t0, eval_mode=True)
    if callable(model_or_policy):
        return model_or_policy
    raise ConfigError(f"cannot act with a {type(model_or_policy).__name__}: need a WorldModel, an Agent or a callable")


def task_set_of(model_or_policy: Any) -> TaskSet:
    """The task list whose indices are the policy's task ids: a model's `cfg.tasks` padded to its
    widths, else MT30 (24 / 6)."""
    model = getattr(model_or_policy, "model", model_or_policy)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "tasks", None):
        return TaskSet(tuple(cfg.tasks), obs_pad=cfg.obs_dim, action_pad=cfg.action_dim)
    return TaskSet()


def iter_collect(
    policy: Policy,
    tasks: Sequence[str],
    episodes: int,
    seed: int,
    *,
    task_set: TaskSet | None = None,
    num_envs: int = 32,
    noise_std: float = 0.0,
    episode_steps: int = EPISODE_LENGTH,
    progress: bool = False,
) -> Iterator[CollectedEpisodes]:
    """Run `episodes` episodes of each task, `num_envs` environments in lockstep at a time; yields
    one CollectedEpisodes per wave (task-major order: all episodes of tasks[0] first).

    noise_std: Gaussian exploration noise added to the policy's action, then clipped to [-1, 1]
    and re-masked to the task's action dims. episode_steps: agent steps per episode (entries - 1).
    """
    task_set = task_set or TaskSet()
    if min(episodes, num_envs, episode_steps) < 1:
        raise ConfigError(f"collect: episodes, num_envs and episode_steps must be >= 1, "
                          f"got {episodes}, {num_envs}, {episode_steps}")
    if noise_std < 0:
        raise ConfigError(f"collect: noise std must be >= 0, got {noise_std}")
    if not tasks:
        raise ConfigError("collect: no tasks given")
    slots = [(task_set.task_id(task), k) for task in tasks for k in range(episodes)]
    mask = task_set.action_mask()  # (num_tasks, action_pad)
    L = episode_steps + 1
    bar = tqdm(total=len(slots), desc="episodes", unit="ep", disable=not progress)
    for first in range(0, len(slots), num_envs):
        wave = slots[first:first + num_envs]
        E = len(wave)
        task_ids = np.array([tid for tid, _ in wave], dtype=np.int64)
        envs = [make_env(task_set.names[tid], seed + k) for tid, k in wave]
        noise = [np.random.default_rng([seed, tid, k]) for tid, k in wave]
        for env in envs:
            env.max_episode_steps = episode_steps
        obs = np.zeros((E, L, task_set.obs_pad), np.float32)
        action = np.full((E, L, task_set.action_pad), np.nan, np.float32)
        reward = np.full((E, L), np.nan, np.float32)
        obs[:, 0] = np.stack([pad_obs(env.reset(), task_set.obs_pad) for env in envs])
        task_tensor = torch.from_numpy(task_ids)
        for t in range(1, L):
            t0 = torch.full((E,), t == 1, dtype=torch.bool)
            a = policy(torch.from_numpy(obs[:, t - 1]), task_tensor, t0)
            a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float32).reshape(E, -1)
            if noise_std > 0:
                eps = np.stack([rng.standard_normal(a.shape[1], dtype=np.float32) for rng in noise])
                a = np.clip(a + noise_std * eps, -1, 1)
            a = a * mask[task_ids]
            action[:, t] = a
            for i, env in enumerate(envs):
                o, r, terminated, truncated, _ = env.step(a[i, :env.action_dim])
                obs[i, t, :env.obs_dim] = o
                reward[i, t] = r
                if (terminated or truncated) != (t == L - 1):
                    raise StoreError(
                        f"collect: {env.task} episode ended after {t} steps; the store holds {L - 1}-step episodes"
                    )
        bar.update(E)
        yield CollectedEpisodes(obs, action, reward, task_ids, task_set.names)
    bar.close()


def collect_episodes(
    model_or_policy: Any,
    tasks: Sequence[str],
    episodes: int,
    seed: int,
    *,
    plan: bool = True,
    noise_std: float = 0.0,
    num_envs: int = 32,
    task_set: TaskSet | None = None,
    episode_steps: int = EPISODE_LENGTH,
    progress: bool = False,
    **planning_overrides: Any,
) -> CollectedEpisodes:
    """Collect `episodes` episodes per task in memory (see `iter_collect`, `policy_from`)."""
    policy = policy_from(model_or_policy, plan=plan, seed=seed, **planning_overrides)
    task_set = task_set or task_set_of(model_or_policy)
    parts = list(iter_collect(policy, tasks, episodes, seed, task_set=task_set, num_envs=num_envs,
                              noise_std=noise_std, episode_steps=episode_steps, progress=progress))
    return CollectedEpisodes.concatenate(parts)


def collect_to_store(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    tasks: Sequence[str],
    episodes: int,
    seed: int,
    *,
    plan: bool = True,
    noise_std: float = 0.0,
    num_envs: int = 32,
    mode: WriteMode = "create",
    episode_steps: int = EPISODE_LENGTH,
    progress: bool = True,
) -> EpisodeStore:
    """Load a world model and write its rollouts into a store, one wave at a time."""
    from agent.checkpoint import load_world_model

    model = load_world_model(checkpoint)
    task_set = task_set_of(model)
    for task in tasks:
        task_set.task_id(task)  # fail before any rollout on a name outside the model's task set
    policy = policy_from(model, plan=plan, seed=seed)
    names = list(task_set.names)
    info = {"checkpoint": str(checkpoint), "tasks": list(tasks), "episodes_per_task": episodes, "seed": seed,
            "plan": plan, "noise_std": noise_std, "episode_steps": episode_steps}
    with EpisodeStoreWriter(
        out, tasks=names, task_set="mt30" if names == MT30 else "custom", obs_dim=task_set.obs_pad,
        action_dim=task_set.action_pad, episode_length=episode_steps + 1, mode=mode, source="collect", info=info,
    ) as writer:
        for wave in iter_collect(policy, tasks, episodes, seed, task_set=task_set, num_envs=num_envs,
                                 noise_std=noise_std, episode_steps=episode_steps, progress=progress):
            writer.append(wave.obs, wave.action, wave.reward, wave.task)
    return EpisodeStore(out)
