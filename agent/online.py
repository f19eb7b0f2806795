"""Online TD-MPC2 training: collect episodes with the planner while training (single- or multi-task),
so the project can train its own teachers. Upstream online-trainer semantics:

* the first `seed_steps` environment steps use uniform random actions in [-1, 1] (zero beyond each
  task's action dim), later steps plan with MPPI (`agent.planner.Agent`, eval_mode=False);
* finished episodes go into an in-memory buffer with the episode-store layout;
* once seeding is over (and an episode is stored), the trainer runs `seed_steps` "pretraining"
  updates, then `updates_per_step` updates per environment step.

`num_envs` environments step in lockstep (one batched planner call per step); environment i runs
task tasks[i % len(tasks)] with seed env_seed + i. Episodes have a fixed length (the envs must
not terminate early, as in MT30).

    loop = OnlineLoop(trainer, ["walker-walk"], OnlineConfig(steps=100_000))
    summary = loop.run(callback=lambda event, info: print(event, info))
    loop.buffer.save("data/walker_walk_store", task_set="walker-walk")
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agent.batches import StoreBatches
from agent.config import OnlineConfig
from agent.errors import ConfigError
from agent.planner import Agent
from agent.replay import EpisodeBuffer
from agent.train import Trainer

EnvFactory = Callable[[str, int], Any]  # (task, seed) -> gym-style env with reset() / step(action)
Callback = Callable[[str, dict[str, float]], Any]  # ("update" | "episode", metrics)


def _default_env_factory(task: str, seed: int):
    from agent.envs import make_env  # imports dm_control: only when real environments are used

    return make_env(task, seed)


class OnlineLoop:
    """Collect-and-train loop around a `Trainer` whose batch source becomes this loop's buffer."""

    def __init__(self, trainer: Trainer, tasks: Sequence[str], cfg: OnlineConfig | None = None,
                 env_factory: EnvFactory | None = None):
        self.trainer = trainer
        self.cfg = (cfg or OnlineConfig()).validate()
        model_cfg = trainer.model.cfg
        self.tasks = list(tasks)
        unknown = [t for t in self.tasks if t not in model_cfg.tasks]
        if unknown:
            raise ConfigError(f"tasks {unknown} are not in the model's task set ({', '.join(model_cfg.tasks)})")
        self.task_ids = np.array([model_cfg.tasks.index(self.tasks[i % len(self.tasks)])
                                  for i in range(self.cfg.num_envs)], dtype=np.int64)
        factory = env_factory or _default_env_factory
        self.envs = [factory(self.tasks[i % len(self.tasks)], self.cfg.env_seed + i) for i in range(self.cfg.num_envs)]
        for env in self.envs:
            if hasattr(env, "max_episode_steps"):
                env.max_episode_steps = self.cfg.episode_length
        self.env_action_dims = [int(env.action_dim) for env in self.envs]
        self.buffer = EpisodeBuffer(self.cfg.capacity_episodes, self.cfg.episode_length + 1, model_cfg.obs_dim,
                                    model_cfg.action_dim, model_cfg.tasks)
        tc = trainer.cfg
        trainer.batch_source = StoreBatches(self.buffer, tc.batch_size, tc.horizon, seed=tc.seed)  # model task ids
        self.agent = Agent(trainer.model, **self.cfg.planner)
        self.rng = np.random.default_rng(tc.seed)
        self.env_steps = 0
        self.episodes = 0
        self._pretrained = False
        self._owed_updates = 0.0

    def _pad_obs(self, obs: np.ndarray) -> np.ndarray:
        out = np.zeros(self.trainer.model.cfg.obs_dim, np.float32)
        out[: obs.shape[0]] = obs
        return out

    def _random_actions(self) -> np.ndarray:
        A = self.trainer.model.cfg.action_dim
        actions = self.rng.uniform(-1, 1, size=(len(self.envs), A)).astype(np.float32)
        for i, dim in enumerate(self.env_action_dims):
            actions[i, dim:] = 0
        return actions

    def _act(self, obs: np.ndarray, t: int) -> np.ndarray:
        if self.env_steps < self.cfg.seed_steps:
            return self._random_actions()
        task = torch.from_numpy(self.task_ids) if self.trainer.model.multitask else None
        action = self.agent.act(torch.from_numpy(obs), task, t0=t == 0, eval_mode=False)
        return action.cpu().numpy().astype(np.float32)

    def _train(self, new_steps: int, callback: Callback | None) -> None:
        if self.env_steps < self.cfg.seed_steps or self.buffer.num_episodes == 0:
            return
        if not self._pretrained:
            self._pretrained = True
            self._owed_updates += max(self.cfg.seed_steps, 1)
        else:
            self._owed_updates += self.cfg.updates_per_step * new_steps
        while self._owed_updates >= 1:
            self._owed_updates -= 1
            metrics = self.trainer.update()
            if callback is not None:
                callback("update", metrics)

    def run(self, callback: Callback | None = None) -> dict[str, float]:
        """Step until `cfg.steps` environment steps; returns a summary (episodes, updates, mean return)."""
        E, L = len(self.envs), self.cfg.episode_length
        cfg_model = self.trainer.model.cfg
        started = time.perf_counter()
        returns: list[float] = []
        while self.env_steps < self.cfg.steps:
            obs_ep = np.zeros((E, L + 1, cfg_model.obs_dim), np.float32)
            act_ep = np.full((E, L + 1, cfg_model.action_dim), np.nan, np.float32)
            rew_ep = np.full((E, L + 1), np.nan, np.float32)
            obs_ep[:, 0] = np.stack([self._pad_obs(np.asarray(env.reset(), np.float32)) for env in self.envs])
            self.agent.reset()
            for t in range(L):
                actions = self._act(obs_ep[:, t], t)
                for i, env in enumerate(self.envs):
                    obs, reward, terminated, truncated, _ = env.step(actions[i, : self.env_action_dims[i]])
                    if terminated or (truncated and t < L - 1):
                        raise ConfigError(f"environment {i} ended its episode at step {t + 1} of {L}; online "
                                          "training needs fixed-length episodes")
                    obs_ep[i, t + 1] = self._pad_obs(np.asarray(obs, np.float32))
                    rew_ep[i, t + 1] = reward
                act_ep[:, t + 1] = actions
                self.env_steps += E
                self._train(E, callback)
                if self.env_steps >= self.cfg.steps and t < L - 1:
                    break  # budget spent mid-episode: the partial episodes are not stored
            else:
                for i in range(E):
                    self.buffer.add(obs_ep[i], act_ep[i], rew_ep[i], int(self.task_ids[i]))
                    episode_return = float(np.nansum(rew_ep[i]))
                    returns.append(episode_return)
                    self.episodes += 1
                    if callback is not None:
                        callback("episode", {"episode": float(self.episodes), "return": episode_return,
                                             "task_id": float(self.task_ids[i]), "env_steps": float(self.env_steps)})
                self._train(0, callback)  # pretraining can start as soon as the first episodes are stored
        return {"env_steps": float(self.env_steps), "episodes": float(self.episodes), "updates": float(self.trainer.step),
                "mean_return": float(np.mean(returns)) if returns else float("nan"),
                "seconds": time.perf_counter() - started}
