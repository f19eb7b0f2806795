"""Online TD-MPC2 training: collect episodes with the planner while training (single- or multi-task),
so the project can train its own teachers. Upstream online-trainer semantics:

* the first `seed_steps` environment steps use uniform random actions in [-1, 1] (zero beyond each
  task's action dim), later steps plan with MPPI (`agent.planner.Agent`, eval_mode=False);
* finished episodes go into an in-memory buffer with the episode-store layout;
* at the first episode end once seeding is over, the trainer runs max(seed_steps, 1) "pretraining"
  updates on the stored seed episodes, then `updates_per_step` updates per environment step.

`num_envs` environments step in lockstep (one batched planner call per step); environment i runs
task tasks[i % len(tasks)]. Episode k (counted over all environments) is the first reset of a
fresh env_factory(task, env_seed + k). Episodes have a fixed length (the envs must not terminate
early, as in MT30).

Resumable at episode ends: with `cfg.checkpoint_dir` set, the loop saves the trainer state (model,
optimizers, torch / python / batch-sampler streams), the planner's random streams, the replay
buffer and its own counters and exploration stream after every round of episodes; a new loop on
that directory continues exactly as the uninterrupted run would (`steps` may differ: a run can be
extended or cut).

    loop = OnlineLoop(trainer, ["walker-walk"], OnlineConfig(steps=100_000))
    summary = loop.run(callback=lambda event, info: print(event, info))
    loop.buffer.save("data/walker_walk_store", task_set="walker-walk")
"""
from __future__ import annotations

import json
import time
from pathlib import Path
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

# in cfg.checkpoint_dir; STATE_FILE is written last
TRAINER_FILE, PLANNER_FILE, REPLAY_FILE, STATE_FILE = "trainer.pt", "planner.pt", "replay.npz", "loop.json"


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
        self.env_factory = env_factory or _default_env_factory
        self.buffer = EpisodeBuffer(self.cfg.capacity_episodes, self.cfg.episode_length + 1, model_cfg.obs_dim,
                                    model_cfg.action_dim, model_cfg.tasks)
        tc = trainer.cfg
        trainer.batch_source = StoreBatches(self.buffer, tc.batch_size, tc.horizon, seed=tc.seed)  # model task ids
        self.agent = Agent(trainer.model, **self.cfg.planner)
        self.rng = np.random.default_rng([tc.seed, 7])  # exploration stream, apart from the batch sampler's
        self.env_steps = 0
        self.episodes = 0
        self.episode_returns: list[float] = []
        self.wall_s = 0.0  # time spent in run(), over all invocations
        self._pretrained = False
        self._owed_updates = 0.0
        self.resumed = self.cfg.checkpoint_dir is not None and self.restore(self.cfg.checkpoint_dir)

    # -- checkpoints (at episode ends) ----------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write trainer.pt, planner.pt, replay.npz, then loop.json (last: a run resumes from the state it names)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.trainer.save(directory / TRAINER_FILE)
        # the planner's per-env streams persist across episodes (seeded once from torch's global generator)
        planner = self.agent.rng_state()
        _atomic_write(directory / PLANNER_FILE, lambda f: torch.save(planner, f))
        b = self.buffer  # slot order; num_added restores the ring position
        _atomic_write(directory / REPLAY_FILE, lambda f: np.savez(f, obs=b.obs, action=b.action, reward=b.reward,
                                                                   task=b.task))
        state = {"env_steps": self.env_steps, "episodes": self.episodes, "num_added": b.num_added,
                 "episode_returns": self.episode_returns, "wall_s": self.wall_s, "pretrained": self._pretrained,
                 "owed_updates": self._owed_updates, "rng": self.rng.bit_generator.state}
        _atomic_write(directory / STATE_FILE, lambda f: f.write(json.dumps(state).encode()))
        return directory

    def restore(self, directory: str | Path) -> bool:
        """Load a checkpoint written by `save`; False (and nothing changed) if `directory` holds none."""
        directory = Path(directory)
        if not (directory / STATE_FILE).exists():
            return False
        state = json.loads((directory / STATE_FILE).read_text())
        with np.load(directory / REPLAY_FILE) as replay:
            if len(replay["obs"]) > self.buffer.capacity:
                raise ConfigError(f"{directory}: {len(replay['obs'])} stored episodes exceed capacity_episodes "
                                  f"{self.buffer.capacity}")
            for obs, action, reward, task in zip(replay["obs"], replay["action"], replay["reward"], replay["task"]):
                self.buffer.add(obs, action, reward, int(task))
        self.buffer.num_added = state["num_added"]
        self.trainer.load(directory / TRAINER_FILE)
        self.agent.load_rng_state(torch.load(directory / PLANNER_FILE, weights_only=True))
        self.rng.bit_generator.state = state["rng"]
        self.env_steps, self.episodes = state["env_steps"], state["episodes"]
        self.episode_returns, self.wall_s = state["episode_returns"], state["wall_s"]
        self._pretrained, self._owed_updates = state["pretrained"], state["owed_updates"]
        return True

    # -- acting and updating --------------------------------------------------------------------
    def _make_envs(self) -> list[Any]:
        """The next round's environments: episode k = first reset of env_factory(task, env_seed + k)."""
        envs = []
        for i in range(self.cfg.num_envs):
            env = self.env_factory(self.tasks[i % len(self.tasks)], self.cfg.env_seed + self.episodes + i)
            if hasattr(env, "max_episode_steps"):
                env.max_episode_steps = self.cfg.episode_length
            envs.append(env)
        return envs

    def _pad_obs(self, obs: np.ndarray) -> np.ndarray:
        out = np.zeros(self.trainer.model.cfg.obs_dim, np.float32)
        out[: obs.shape[0]] = obs
        return out

    def _random_actions(self, action_dims: list[int]) -> np.ndarray:
        """(E, action_dim) uniform in [-1, 1], zero beyond each env's action dim."""
        A = self.trainer.model.cfg.action_dim
        actions = self.rng.uniform(-1, 1, size=(len(action_dims), A)).astype(np.float32)
        for i, dim in enumerate(action_dims):
            actions[i, dim:] = 0
        return actions

    def _act(self, obs: np.ndarray, t: int, action_dims: list[int]) -> np.ndarray:
        """obs (E, obs_dim) -> actions (E, action_dim): random while seeding, then MPPI."""
        if self.env_steps < self.cfg.seed_steps:
            return self._random_actions(action_dims)
        task = torch.from_numpy(self.task_ids) if self.trainer.model.multitask else None
        action = self.agent.act(torch.from_numpy(obs), task, t0=t == 0, eval_mode=False)
        return action.cpu().numpy().astype(np.float32)

    def _train(self, new_steps: int, callback: Callback | None) -> None:
        """`new_steps` > 0: the per-step updates (once pretrained); 0 (at an episode end): pretraining,
        the first time seeding is over."""
        if new_steps == 0 and not self._pretrained and self.env_steps >= self.cfg.seed_steps:
            self._pretrained = True
            self._owed_updates += max(self.cfg.seed_steps, 1)
        elif self._pretrained:
            self._owed_updates += self.cfg.updates_per_step * new_steps
        while self._owed_updates >= 1:
            self._owed_updates -= 1
            metrics = self.trainer.update()
            if callback is not None:
                callback("update", metrics)

    def run(self, callback: Callback | None = None) -> dict[str, float]:
        """Step until `cfg.steps` environment steps (continuing a restored run); returns a summary
        (env_steps, episodes, updates, mean_return over all episodes, seconds of this call)."""
        E, L = self.cfg.num_envs, self.cfg.episode_length
        cfg_model = self.trainer.model.cfg
        started = time.perf_counter()
        while self.env_steps < self.cfg.steps:
            round_started = time.perf_counter()
            envs = self._make_envs()
            action_dims = [int(env.action_dim) for env in envs]
            obs_ep = np.zeros((E, L + 1, cfg_model.obs_dim), np.float32)
            act_ep = np.full((E, L + 1, cfg_model.action_dim), np.nan, np.float32)
            rew_ep = np.full((E, L + 1), np.nan, np.float32)
            obs_ep[:, 0] = np.stack([self._pad_obs(np.asarray(env.reset(), np.float32)) for env in envs])
            self.agent.reset()
            for t in range(L):
                actions = self._act(obs_ep[:, t], t, action_dims)
                for i, env in enumerate(envs):
                    obs, reward, terminated, truncated, _ = env.step(actions[i, : action_dims[i]])
                    if terminated or (truncated and t < L - 1):
                        raise ConfigError(f"environment {i} ended its episode at step {t + 1} of {L}; online "
                                          "training needs fixed-length episodes")
                    obs_ep[i, t + 1] = self._pad_obs(np.asarray(obs, np.float32))
                    rew_ep[i, t + 1] = reward
                act_ep[:, t + 1] = actions
                self.env_steps += E
                self._train(E, callback)
                if self.env_steps >= self.cfg.steps and t < L - 1:
                    break  # budget spent mid-episode: the partial episodes are not stored (nor checkpointed)
            else:
                for i in range(E):
                    self.buffer.add(obs_ep[i], act_ep[i], rew_ep[i], int(self.task_ids[i]))
                    self.episode_returns.append(float(np.nansum(rew_ep[i])))
                self.episodes += E
                self._train(0, callback)  # pretraining starts at the episode end where seeding is over
                self.wall_s += time.perf_counter() - round_started
                if self.cfg.checkpoint_dir is not None:
                    self.save(self.cfg.checkpoint_dir)
                if callback is not None:  # after the checkpoint: the state a resumed run starts from
                    for i in range(E):
                        episode = self.episodes - E + i
                        callback("episode", {"episode": float(episode + 1), "return": self.episode_returns[episode],
                                             "task_id": float(self.task_ids[i]), "env_steps": float(self.env_steps),
                                             "updates": float(self.trainer.step)})
        returns = self.episode_returns
        return {"env_steps": float(self.env_steps), "episodes": float(self.episodes), "updates": float(self.trainer.step),
                "mean_return": float(np.mean(returns)) if returns else float("nan"),
                "seconds": time.perf_counter() - started}


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """write(binary file object) into path.tmp, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    tmp.replace(path)
