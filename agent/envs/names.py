"""Task-name validation and the mapping from MT30 names to dm_control (domain, task) names."""
from __future__ import annotations

from agent.tasksets import MetaWorldUnsupportedError, TaskSpec, UnknownTaskError, is_meta_world, task_spec  # noqa: F401

# dm_control's name for a domain whose MT30 prefix differs from it.
_DOMAIN_ALIASES = {"cup": "ball_in_cup"}


def check_task(name: str) -> TaskSpec:
    """The spec of MT30 task `name`; raises UnknownTaskError (a ValueError) for anything else."""
    return task_spec(name)


def dm_control_names(name: str) -> tuple[str, str]:
    """('walker-walk-backwards' -> ('walker', 'walk_backwards'), 'cup-catch' -> ('ball_in_cup', 'catch'))."""
    check_task(name)
    domain, task = name.replace("-", "_").split("_", 1)
    return _DOMAIN_ALIASES.get(domain, domain), task


def obs_dim(name: str) -> int:
    return check_task(name).obs_dim


def action_dim(name: str) -> int:
    return check_task(name).action_dim
