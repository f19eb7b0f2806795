"""MT30 environments (19 DMControl suite tasks + 11 custom tasks) with TD-MPC2's conventions.

    env = make_env("walker-walk-backwards", seed=1)
    obs = env.reset()                                   # (obs_dim,) float32
    obs, reward, terminated, truncated, info = env.step(action)   # action: (action_dim,)

Episode k of a task is the k-th reset() of an env made with the evaluation seed.
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "disable")

from dm_control import suite  # noqa: E402

from agent.envs.custom import CUSTOM_TASKS  # noqa: E402
from agent.envs.dmc_env import DMCEnv, EpisodeOverError  # noqa: E402
from agent.envs.multitask import MultitaskEnv, TaskSet, make_multitask_env, pad_obs, unpad_action  # noqa: E402
from agent.envs.names import (  # noqa: E402
    MetaWorldUnsupportedError, UnknownTaskError, action_dim, check_task, dm_control_names, obs_dim,
)
from agent.tasksets import EPISODE_LENGTH, MT30, MT30_ACTION_DIM, MT30_OBS_DIM, MT30_SPECS, TaskSpec  # noqa: E402

ACTION_REPEAT = 2


def make_env(task: str, seed: int) -> DMCEnv:
    """The MT30 task `task` with its RandomState seeded by `seed` (task_kwargs={'random': seed})."""
    spec = check_task(task)
    if spec.custom:
        dm_env = CUSTOM_TASKS[task](seed)
        dm_env.task.visualize_reward = False
    else:
        domain, name = dm_control_names(task)
        dm_env = suite.load(domain, name, task_kwargs={"random": seed}, visualize_reward=False)
    return DMCEnv(task, dm_env, action_repeat=ACTION_REPEAT, max_episode_steps=EPISODE_LENGTH)


__all__ = [
    "ACTION_REPEAT", "EPISODE_LENGTH", "MT30", "MT30_ACTION_DIM", "MT30_OBS_DIM", "MT30_SPECS", "TaskSpec",
    "DMCEnv", "EpisodeOverError", "MetaWorldUnsupportedError", "MultitaskEnv", "TaskSet", "UnknownTaskError",
    "action_dim", "check_task", "dm_control_names", "make_env", "make_multitask_env", "obs_dim",
    "pad_obs", "unpad_action",
]
