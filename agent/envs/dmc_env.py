"""A single DMControl task as a Gymnasium-style environment with the official TD-MPC2 conventions.

Conventions (those of TD-MPC2's `make_env` wrapper stack):
* each agent step repeats the action for `action_repeat` control steps; the reward is the sum of
  the control-step rewards (a None reward counts as 0) and the repeat stops early if the episode ends;
* the observation dict is flattened in its own order and cast to float32;
* actions in [-1, 1] are mapped affinely onto the actuator bounds, passing through float32 exactly
  as dm_control's `action_scale` wrapper does (the identity for every MT30 task);
* an episode lasts `max_episode_steps` agent steps; reaching it is a truncation, not a termination.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from dm_control.rl import control


class EpisodeOverError(RuntimeError):
    """`step()` was called after the episode ended (or before the first `reset()`)."""


class DMCEnv:
    """Gymnasium-style view of one dm_control environment.

    reset() -> obs: (obs_dim,) float32
    step(action: (action_dim,)) -> (obs, reward: float, terminated: bool, truncated: bool, info: dict)
    """

    def __init__(self, task: str, env: control.Environment, action_repeat: int, max_episode_steps: int):
        spec = env.action_spec()
        self.task = task
        self.env = env
        self.action_repeat = action_repeat
        self.max_episode_steps = max_episode_steps
        self.action_dim = int(np.prod(spec.shape))
        self.obs_dim = int(sum(np.prod(v.shape, dtype=int) for v in env.observation_spec().values()))
        self._act_low = np.asarray(spec.minimum, np.float32)
        self._act_high = np.asarray(spec.maximum, np.float32)
        self._act_dtype = spec.dtype
        self.t = 0
        self._running = False

    @staticmethod
    def _flatten(observation: dict[str, Any]) -> np.ndarray:
        flat = np.concatenate([np.asarray(v, np.float64).ravel() for v in observation.values()])
        return flat.astype(np.float32)

    def _to_actuator(self, action) -> np.ndarray:
        """[-1, 1]^action_dim -> actuator bounds, rounded through float32 like dm_control's action_scale."""
        action = np.asarray(action, np.float32).reshape(self.action_dim)
        scale = (self._act_high - self._act_low) / np.float64(2.0)
        scaled = (self._act_low + scale * (action - np.float64(-1.0))).astype(np.float32)
        return scaled.astype(self._act_dtype)

    def reset(self) -> np.ndarray:
        """Start the next episode (advances the task's RandomState). Returns obs: (obs_dim,) float32."""
        self.t = 0
        self._running = True
        return self._flatten(self.env.reset().observation)

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        """action: (action_dim,) in [-1, 1]. Returns the official reward (sum over the repeats)."""
        if not self._running:
            raise EpisodeOverError(f"{self.task}: call reset() before step() (the episode is over or not started)")
        actuator = self._to_actuator(action)
        reward, discount = 0.0, 1.0
        for _ in range(self.action_repeat):
            time_step = self.env.step(actuator)
            reward += (time_step.reward or 0.0) * discount
            discount *= time_step.discount
            if time_step.last():
                break
        self.t += 1
        terminated = bool(time_step.last() and discount == 0.0)
        truncated = not terminated and (time_step.last() or self.t >= self.max_episode_steps)
        self._running = not (terminated or truncated)
        return self._flatten(time_step.observation), float(reward), terminated, truncated, {"discount": discount}
