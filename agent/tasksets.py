"""Task sets as plain data (names and dimensions); no simulator import.

MT30 order is the official one: task id = index. `agent.envs` builds the environments; this
module only knows names and sizes so checkpoints and data can be interpreted without dm_control.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.errors import DistillError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    obs_dim: int
    action_dim: int
    custom: bool = False


_MT30_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("walker-stand", 24, 6), TaskSpec("walker-walk", 24, 6), TaskSpec("walker-run", 24, 6),
    TaskSpec("cheetah-run", 17, 6), TaskSpec("reacher-easy", 6, 2), TaskSpec("reacher-hard", 6, 2),
    TaskSpec("acrobot-swingup", 6, 1), TaskSpec("pendulum-swingup", 3, 1),
    TaskSpec("cartpole-balance", 5, 1), TaskSpec("cartpole-balance-sparse", 5, 1),
    TaskSpec("cartpole-swingup", 5, 1), TaskSpec("cartpole-swingup-sparse", 5, 1),
    TaskSpec("cup-catch", 8, 2), TaskSpec("finger-spin", 9, 2), TaskSpec("finger-turn-easy", 12, 2),
    TaskSpec("finger-turn-hard", 12, 2), TaskSpec("fish-swim", 24, 5), TaskSpec("hopper-stand", 15, 4),
    TaskSpec("hopper-hop", 15, 4),
    # the 11 custom tasks of TD-MPC2
    TaskSpec("walker-walk-backwards", 24, 6, True), TaskSpec("walker-run-backwards", 24, 6, True),
    TaskSpec("cheetah-run-backwards", 17, 6, True), TaskSpec("cheetah-run-front", 17, 6, True),
    TaskSpec("cheetah-run-back", 17, 6, True), TaskSpec("cheetah-jump", 17, 6, True),
    TaskSpec("hopper-hop-backwards", 15, 4, True), TaskSpec("reacher-three-easy", 8, 3, True),
    TaskSpec("reacher-three-hard", 8, 3, True), TaskSpec("cup-spin", 8, 2, True),
    TaskSpec("pendulum-spin", 3, 1, True),
)

MT30: list[str] = [spec.name for spec in _MT30_SPECS]
MT30_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in _MT30_SPECS}
MT30_OBS_DIM = 24
MT30_ACTION_DIM = 6
EPISODE_LENGTH = 500  # agent steps (action repeat 2)


class UnknownTaskError(DistillError):
    """A task name that this project cannot build (one-line message listing the valid names)."""


class MetaWorldUnsupportedError(UnknownTaskError):
    """A Meta-World (MT80) task: not installed and not supported yet."""


def is_meta_world(name: str) -> bool:
    return name.startswith("mw-") or name.lower() == "mt80"


def task_spec(name: str) -> TaskSpec:
    """The spec of MT30 task `name`; raises UnknownTaskError (a ValueError) for anything else."""
    if not isinstance(name, str):
        raise UnknownTaskError(f"task names are strings, got {type(name).__name__} {name!r}")
    if is_meta_world(name):
        raise MetaWorldUnsupportedError(
            f"task {name!r} is a Meta-World (MT80) task: Meta-World is not installed / not supported yet; "
            f"only the 30 DMControl tasks of MT30 can be built")
    spec = MT30_SPECS.get(name)
    if spec is None:
        hint = " ('mt30' is a task set: use make_multitask_env(MT30, seed))" if name.lower() == "mt30" else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(MT30)}")
    return spec


def action_dims(tasks: list[str]) -> list[int]:
    return [task_spec(t).action_dim for t in tasks]


def obs_dims(tasks: list[str]) -> list[int]:
    return [task_spec(t).obs_dim for t in tasks]
