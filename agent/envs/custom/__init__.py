"""The 11 custom MT30 tasks of TD-MPC2, rebuilt on top of dm_control's own domains.

`CUSTOM_TASKS` maps an MT30 task name to a builder `(seed) -> dm_control control.Environment`.
"""
from agent.envs.custom.tasks import CUSTOM_TASKS

__all__ = ["CUSTOM_TASKS"]
