"""Single-task online TD-MPC2 (the way each MT-mini source agent was trained), resumable at episode
ends: a thin adapter that runs `agent.online.OnlineLoop` on one task from an `OnlineRunSpec`.

Upstream online-trainer semantics at a small scale: `seed_steps` agent steps of uniform random
actions, then MPPI acting (exploration mode) with `updates_per_step` updates per step, plus
`seed_steps` updates at the end of the last seed episode. Episode k is the first reset of
`make_env(task, seed * 1000 + k)`, so a resumed run continues with the same episode sequence.

The model uses the task's own (tight) observation / action widths; `padded_episodes` pads the
replay data to the multi-task store widths when pooling.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agent.checkpoint import save_world_model
from agent.config import DistillConfig, OnlineConfig, TrainConfig, model_config
from agent.online import OnlineLoop
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

    def online_config(self, checkpoint_dir: Path | None = None) -> OnlineConfig:
        """The general loop's settings: whole episodes, env seeds seed * 1000 + k, replay for every episode."""
        E = self.episode_steps
        return OnlineConfig(steps=self.episodes * E, seed_steps=self.seed_episodes * E, episode_length=E,
                            updates_per_step=self.updates_per_step, env_seed=self.seed * 1000,
                            capacity_episodes=self.episodes, planner=dict(self.planner),
                            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir))


@dataclass
class OnlineProgress:
    """What a run has done so far."""

    episodes_done: int = 0
    updates_done: int = 0
    wall_s: float = 0.0
    episode_returns: list[float] = field(default_factory=list)


def single_task_model(spec: OnlineRunSpec) -> WorldModel:
    """The run's world model: tight widths of its task, no task embedding."""
    task = task_spec(spec.task)
    return WorldModel(model_config(None, tasks=[spec.task], obs_dim=task.obs_dim, action_dim=task.action_dim, **spec.dims))


class OnlineRun:
    """A resumable single-task run whose files live in `workdir`: spec.json (its settings), the
    loop's checkpoint (trainer.pt, replay.npz, loop.json) and, on completion, model.pt."""

    def __init__(self, spec: OnlineRunSpec, workdir: Path, log: Log = print):
        self.spec, self.workdir, self.log = spec, Path(workdir), log
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_spec()
        seed_everything(spec.seed)
        task = task_spec(spec.task)
        self.obs_dim, self.action_dim = task.obs_dim, task.action_dim
        self.model = single_task_model(spec)
        self.trainer = Trainer(self.model, TrainConfig(batch_size=spec.batch_size, seed=spec.seed,
                                                       distill=DistillConfig(target=None)))
        self.loop = OnlineLoop(self.trainer, [spec.task], spec.online_config(self.workdir))
        self.buffer = self.loop.buffer
        if self.loop.resumed:
            self.log(f"[{spec.task}] resuming after episode {self.loop.episodes}/{spec.episodes}")

    @property
    def model_path(self) -> Path:
        return self.workdir / "model.pt"

    @property
    def progress(self) -> OnlineProgress:
        loop = self.loop
        return OnlineProgress(loop.episodes, self.trainer.step, loop.wall_s, list(loop.episode_returns))

    def _check_spec(self) -> None:
        """Refuse a workdir holding a run with other settings (`steps` may change: extend or cut a run)."""
        path, mine = self.workdir / "spec.json", {k: v for k, v in asdict(self.spec).items() if k != "steps"}
        if path.exists():
            saved = json.loads(path.read_text())
            loop_state = self.workdir / "loop.json"
            done = json.loads(loop_state.read_text())["episodes"] if loop_state.exists() else 0
            if {k: v for k, v in saved.items() if k != "steps"} != mine or done > self.spec.episodes:
                raise RuntimeError(f"{self.workdir}: holds a run with different settings; remove it to start over")
        elif (self.workdir / "progress.json").exists():
            raise RuntimeError(f"{self.workdir}: holds a run in an older format; remove it to start over")
        path.write_text(json.dumps(asdict(self.spec)))

    def run(self) -> WorldModel:
        """Finish the remaining episodes (checkpointing after each) and write model.pt."""
        spec = self.spec

        def on_episode(kind: str, info: dict[str, float]) -> None:
            if kind == "episode":
                self.log(f"[{spec.task}] episode {int(info['episode'])}/{spec.episodes} return {info['return']:.1f} "
                         f"updates {int(info['updates'])} wall {self.loop.wall_s:.0f}s")

        self.loop.run(on_episode)
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
