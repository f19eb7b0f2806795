"""Single-task online TD-MPC2 (the way each MT30 source agent was trained), resumable at episode ends.

Upstream online-trainer semantics at a small scale: `seed_steps` agent steps of uniform random
actions, then MPPI acting (exploration mode) with `updates_per_step` updates per step, plus
`seed_steps` updates at the moment seeding ends. Episode k is the first reset of
`make_env(task, env_seed + k)`, so a resumed run continues with the same episode sequence.

The model uses the task's own (tight) observation / action widths; `padded_episodes` pads the
replay data to the multi-task store widths when pooling.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from agent.batches import StoreBatches
from agent.checkpoint import save_world_model
from agent.config import DistillConfig, TrainConfig, model_config
from agent.envs import make_env
from agent.planner import Agent
from agent.replay import EpisodeBuffer
from agent.tasksets import task_spec
from agent.train import Trainer, seed_everything
from agent.world_model import WorldModel

Log = Callable[[str], None]


@dataclass(frozen=True)
class OnlineRunSpec:
    """One single-task online run. `steps` and `seed_steps` count agent steps and are rounded up to
    whole episodes of `episode_steps`."""

    task: str
    steps: int
    seed_steps: int
    episode_steps: int
    seed: int
    dims: dict[str, int]
    planner: dict[str, Any]
    batch_size: int = 256
    updates_per_step: float = 1.0

    @property
    def episodes(self) -> int:
        return -(-self.steps // self.episode_steps)

    @property
    def seed_episodes(self) -> int:
        return -(-self.seed_steps // self.episode_steps)


@dataclass
class OnlineProgress:
    """What a run has done so far (saved beside the trainer state after every episode)."""

    episodes_done: int = 0
    updates_done: int = 0
    wall_s: float = 0.0
    episode_returns: list[float] = field(default_factory=list)


def single_task_model(spec: OnlineRunSpec) -> WorldModel:
    """The run's world model: tight widths of its task, no task embedding."""
    task = task_spec(spec.task)
    return WorldModel(model_config(None, tasks=[spec.task], obs_dim=task.obs_dim, action_dim=task.action_dim, **spec.dims))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class OnlineRun:
    """A resumable single-task run whose files live in `workdir`:
    trainer.pt (trainer state), replay.npz (episodes so far), progress.json, and on completion model.pt."""

    def __init__(self, spec: OnlineRunSpec, workdir: Path, log: Log = print):
        self.spec, self.workdir, self.log = spec, Path(workdir), log
        self.workdir.mkdir(parents=True, exist_ok=True)
        seed_everything(spec.seed)
        task = task_spec(spec.task)
        self.obs_dim, self.action_dim = task.obs_dim, task.action_dim
        self.model = single_task_model(spec)
        L = spec.episode_steps + 1
        self.buffer = EpisodeBuffer(spec.episodes, L, self.obs_dim, self.action_dim, [spec.task])
        cfg = TrainConfig(batch_size=spec.batch_size, seed=spec.seed, distill=DistillConfig(target=None))
        self.trainer = Trainer(self.model, cfg, StoreBatches(self.buffer, spec.batch_size, cfg.horizon, seed=spec.seed))
        self.agent = Agent(self.model, **spec.planner)
        self.progress = OnlineProgress()
        self.explore_rng = np.random.default_rng([spec.seed, 7])
        self._update_debt = 0.0
        self._resume()

    # -- files --------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return self.workdir / "model.pt"

    def _resume(self) -> None:
        progress_file = self.workdir / "progress.json"
        if not progress_file.exists():
            return
        saved = json.loads(progress_file.read_text())
        # `steps` may change between invocations (a run can be extended or cut at an episode end)
        same = {k: v for k, v in saved["spec"].items() if k != "steps"} == {k: v for k, v in asdict(self.spec).items() if k != "steps"}
        if not same or saved["progress"]["episodes_done"] > self.spec.episodes:
            raise RuntimeError(f"{self.workdir}: holds a run with different settings; remove it to start over")
        self.progress = OnlineProgress(**saved["progress"])
        self.trainer.load(self.workdir / "trainer.pt")
        with np.load(self.workdir / "replay.npz") as replay:
            for i in range(self.progress.episodes_done):
                self.buffer.add(replay["obs"][i], replay["action"][i], replay["reward"][i], 0)
        self.explore_rng.bit_generator.state = saved["explore_rng"]
        self._update_debt = saved["update_debt"]
        self.log(f"[{self.spec.task}] resuming after episode {self.progress.episodes_done}/{self.spec.episodes}")

    def _checkpoint(self) -> None:
        self.trainer.save(self.workdir / "trainer.pt")
        b = self.buffer
        _atomic_write(self.workdir / "replay.npz",
                      lambda p: np.savez(open(p, "wb"), obs=b.obs, action=b.action, reward=b.reward))
        state = {"spec": asdict(self.spec), "progress": asdict(self.progress),
                 "explore_rng": self.explore_rng.bit_generator.state, "update_debt": self._update_debt}
        _atomic_write(self.workdir / "progress.json", lambda p: p.write_text(json.dumps(state)))

    # -- the loop -----------------------------------------------------------------------------
    def _update(self, count: int) -> None:
        for _ in range(count):
            self.trainer.update()
        self.progress.updates_done += count

    def _episode(self, k: int) -> float:
        """Run episode k, update along the way, store it; returns its return."""
        spec = self.spec
        seeding = k < spec.seed_episodes
        env = make_env(spec.task, spec.seed * 1000 + k)
        env.max_episode_steps = spec.episode_steps
        L = spec.episode_steps + 1
        obs = np.zeros((L, self.obs_dim), np.float32)
        action = np.full((L, self.action_dim), np.nan, np.float32)
        reward = np.full(L, np.nan, np.float32)
        obs[0] = env.reset()
        for t in range(1, L):
            if seeding:
                a = self.explore_rng.uniform(-1, 1, self.action_dim).astype(np.float32)
            else:
                a = self.agent.act(torch.from_numpy(obs[t - 1])[None], None, t == 1, eval_mode=False)[0].numpy()
                self._update_debt += spec.updates_per_step
                due = int(self._update_debt)
                self._update_debt -= due
                self._update(due)
            o, r, terminated, truncated, _ = env.step(a)
            obs[t], action[t], reward[t] = o, a, r
            if terminated:
                raise RuntimeError(f"{spec.task}: episode terminated early; MT-mini needs fixed-length episodes")
        self.buffer.add(obs, action, reward, 0)
        if k + 1 == spec.seed_episodes:  # upstream: one update per seed step when seeding ends
            self._update(spec.seed_episodes * spec.episode_steps)
        return float(np.nansum(reward))

    def run(self) -> WorldModel:
        """Finish the remaining episodes (checkpointing after each) and write model.pt."""
        spec = self.spec
        for k in range(self.progress.episodes_done, spec.episodes):
            started = time.perf_counter()
            episode_return = self._episode(k)
            self.progress.episodes_done = k + 1
            self.progress.episode_returns.append(episode_return)
            self.progress.wall_s += time.perf_counter() - started
            self._checkpoint()
            self.log(f"[{spec.task}] episode {k + 1}/{spec.episodes} return {episode_return:.1f} "
                     f"updates {self.progress.updates_done} wall {self.progress.wall_s:.0f}s")
        save_world_model(self.model, self.model_path, task=spec.task)
        return self.model

    def padded_episodes(self, obs_dim: int, action_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The replay episodes padded to (obs_dim, action_dim): obs (N, L, obs_dim), action
        (N, L, action_dim) (zero beyond the task's dims, NaN at entry 0), reward (N, L)."""
        b = self.buffer
        N, L = b.num_episodes, b.episode_length
        obs = np.zeros((N, L, obs_dim), np.float32)
        obs[..., : self.obs_dim] = b.obs
        action = np.zeros((N, L, action_dim), np.float32)
        action[..., : self.action_dim] = b.action
        action[:, 0] = np.nan
        return obs, action, b.reward.copy()
