"""Typed configuration: every default lives here; presets override by name, never by copy.

Model sizes follow the official TD-MPC2 presets (parameters in millions); `ModelConfig` also takes
free dimensions for small students.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from agent.errors import ConfigError
from agent.tasksets import MT30, MT30_ACTION_DIM, MT30_OBS_DIM, action_dims

# Official presets: enc_dim, mlp_dim, latent_dim, num_enc_layers, num_q (default num_q = 5).
MODEL_SIZES: dict[int, dict[str, int]] = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2, num_q=5),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3, num_q=5),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4, num_q=5),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}


@dataclass
class ModelConfig:
    """World-model dimensions. `num_enc_layers` counts Linear layers of the encoder MLP
    (hidden layers = max(num_enc_layers - 1, 1)), as in the official code."""

    obs_dim: int = MT30_OBS_DIM
    action_dim: int = MT30_ACTION_DIM
    tasks: list[str] = field(default_factory=lambda: list(MT30))
    task_action_dims: list[int] = field(default_factory=lambda: action_dims(MT30))
    task_dim: int = 96
    enc_dim: int = 256
    mlp_dim: int = 384
    latent_dim: int = 128
    num_enc_layers: int = 2
    num_q: int = 2
    num_bins: int = 101
    vmin: float = -10.0
    vmax: float = 10.0
    simnorm_dim: int = 8
    dropout: float = 0.01
    log_std_min: float = -10.0
    log_std_max: float = 2.0

    @property
    def multitask(self) -> bool:
        return self.task_dim > 0 and len(self.tasks) > 1

    def validate(self) -> "ModelConfig":
        for name in ("obs_dim", "action_dim", "enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_bins"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_q < 2:
            raise ConfigError(f"model config: num_q must be >= 2, got {self.num_q}")
        if self.latent_dim % self.simnorm_dim:
            raise ConfigError(f"model config: latent_dim {self.latent_dim} is not a multiple of simnorm_dim {self.simnorm_dim}")
        if self.task_dim < 0:
            raise ConfigError(f"model config: task_dim must be >= 0, got {self.task_dim}")
        if len(self.task_action_dims) != len(self.tasks):
            raise ConfigError("model config: task_action_dims must have one entry per task")
        if any(d < 1 or d > self.action_dim for d in self.task_action_dims):
            raise ConfigError(f"model config: task action dims must lie in [1, {self.action_dim}]")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**values).validate()


def model_config(size: int | str | None = None, tasks: list[str] | None = None, task_action_dims: list[int] | None = None,
                 obs_dim: int = MT30_OBS_DIM, action_dim: int = MT30_ACTION_DIM, **overrides: Any) -> ModelConfig:
    """A model config from an official size preset (1, 5, 19, 48, 317) and/or free dimensions.

    On MT30 the task embedding is 96-dim for sizes 1 and 317 and 64-dim otherwise, and the 19M
    model has latent 512 (the official MT30 quirks).
    """
    tasks = list(MT30) if tasks is None else list(tasks)
    dims: dict[str, Any] = {}
    if size is not None:
        try:
            size = int(size)
            dims.update(MODEL_SIZES[size])
        except (KeyError, ValueError):
            raise ConfigError(f"unknown model size {size!r}; official sizes: {sorted(MODEL_SIZES)}") from None
        dims["task_dim"] = 96 if size in (1, 317) else 64
        if size == 19 and tasks == list(MT30):
            dims["latent_dim"] = 512
    if len(tasks) <= 1:
        dims["task_dim"] = 0
    if task_action_dims is None:
        task_action_dims = action_dims(tasks) if all(t in MT30 for t in tasks) else [action_dim] * len(tasks)
    dims.update(overrides)
    return ModelConfig(obs_dim=obs_dim, action_dim=action_dim, tasks=tasks,
                       task_action_dims=list(task_action_dims), **dims).validate()


@dataclass
class PlannerConfig:
    """MPPI settings (official defaults)."""

    mpc: bool = True
    iterations: int = 6
    num_samples: int = 512
    num_elites: int = 64
    num_pi_trajs: int = 24
    horizon: int = 3
    min_std: float = 0.05
    max_std: float = 2.0
    temperature: float = 0.5
    episode_length: int = 500
    discount_denom: float = 5.0
    discount_min: float = 0.95
    discount_max: float = 0.995

    def validate(self) -> "PlannerConfig":
        if self.iterations < 1 or self.horizon < 1 or self.num_samples < 1:
            raise ConfigError("planner: iterations, horizon and num_samples must be >= 1")
        if not 0 <= self.num_pi_trajs < self.num_samples:
            raise ConfigError(f"planner: num_pi_trajs must lie in [0, num_samples), got {self.num_pi_trajs}")
        if not 1 <= self.num_elites <= self.num_samples:
            raise ConfigError(f"planner: num_elites must lie in [1, num_samples], got {self.num_elites}")
        if not 0 < self.min_std <= self.max_std:
            raise ConfigError("planner: need 0 < min_std <= max_std")
        return self

    def override(self, **overrides: Any) -> "PlannerConfig":
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"planner: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **overrides).validate()


def discount_for(episode_length: int, denom: float = 5.0, lo: float = 0.95, hi: float = 0.995) -> float:
    """Official heuristic: (frac - 1) / frac with frac = episode_length / denom, clamped to [lo, hi]."""
    frac = episode_length / denom
    return min(max((frac - 1) / frac, lo), hi)
