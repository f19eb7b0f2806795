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


# -- training, distillation and quantization settings -----------------------------------------

DISTILL_TARGETS: tuple[str, ...] = (
    "reward",            # the paper: teacher vs student decoded reward at (obs[0], action[0])
    "reward_multistep",  # every horizon step: student latent rollout vs teacher latent rollout, rho-weighted
    "reward_observed",   # every horizon step: student rollout vs teacher encoding the observed obs[h] (cacheable)
    "latent_linear",     # teacher latents -> student latent size by a learned linear projection
    "latent_pca",        # teacher latents -> top-k principal components (k = student latent dim)
    "value",             # teacher Q (mean over its heads) vs student Q at (obs[0], action[0])
    "policy",            # teacher vs student policy mean (trained through the policy update)
)
QUANT_MODES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8_naive", "int8", "mixed")
# training precision of the population executor: fp32 (TF32 matmuls on CUDA) or the model loss
# under bf16 autocast (CUDA only; weights, Adam state and the policy loss stay fp32)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
# torch.compile of the population update / the planner's value estimate (agent.compiled): auto =
# on for CUDA, off for CPU; modes are torch.compile's (CUDA-graph modes on CUDA only)
COMPILE_SETTINGS: tuple[str, ...] = ("auto", "on", "off")
# learning-rate schedules of TrainConfig.lr_schedule (agent.train.lr_factor defines them)
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class LossConfig:
    """Official TD-MPC2 loss settings (coefficients weight the terms of `agent.losses.loss_terms`)."""

    consistency_coef: float = 20.0
    reward_coef: float = 0.1
    value_coef: float = 0.1
    rho: float = 0.5
    entropy_coef: float = 1e-4
    # policy-loss entropy bonus: "upstream" (scaled entropy, current TD-MPC2) or "td_mpc_opt"
    # (the paper's code: entropy_coef * log_pi with its Gaussian log-prob formula)
    policy_entropy: str = "upstream"
    episode_length: int = 500  # agent steps; the per-task discount heuristic's input for non-MT30 tasks
    discount_denom: float = 5.0
    discount_min: float = 0.95
    discount_max: float = 0.995

    def validate(self) -> "LossConfig":
        if not 0 < self.rho <= 1:
            raise ConfigError(f"loss: rho must lie in (0, 1], got {self.rho}")
        if min(self.consistency_coef, self.reward_coef, self.value_coef, self.entropy_coef) < 0:
            raise ConfigError("loss: coefficients must be >= 0")
        if self.policy_entropy not in ("upstream", "td_mpc_opt"):
            raise ConfigError(f"loss: policy_entropy must be 'upstream' or 'td_mpc_opt', got {self.policy_entropy!r}")
        if self.episode_length < 2:
            raise ConfigError(f"loss: episode_length must be >= 2, got {self.episode_length}")
        return self


@dataclass
class DistillConfig:
    """What the student learns from a teacher. d_coef 0.45 is TD-MPC-Opt's hard-coded alpha.
    `target` None disables distillation even when a teacher is given."""

    target: str | None = "reward"
    d_coef: float = 0.45
    pca_fit_rows: int = 65536  # store entries the live PCA basis is fitted on (latent_pca)
    pca_seed: int = 0

    def validate(self) -> "DistillConfig":
        if self.target is not None and self.target not in DISTILL_TARGETS:
            raise ConfigError(f"distill: unknown target {self.target!r}; known: {', '.join(DISTILL_TARGETS)}")
        if self.d_coef < 0:
            raise ConfigError(f"distill: d_coef must be >= 0, got {self.d_coef}")
        if self.pca_fit_rows < 2:
            raise ConfigError("distill: pca_fit_rows must be >= 2")
        return self


@dataclass
class TrainConfig:
    """Offline/online update settings (official defaults: Adam lr 3e-4, encoder lr x 0.3, policy
    Adam eps 1e-5, grad clip 20, Polyak tau 0.01 also used by the policy's RunningScale)."""

    batch_size: int = 256
    horizon: int = 3
    lr: float = 3e-4
    # constant (official), or cosine: every group's lr x (1 + cos(pi * step / T)) / 2 at update
    # `step`, reaching 0 at T = lr_schedule_steps updates (a sweep trial sets T to its `steps`)
    lr_schedule: str = "constant"
    lr_schedule_steps: int | None = None
    enc_lr_scale: float = 0.3
    pi_adam_eps: float = 1e-5
    grad_clip_norm: float = 20.0
    tau: float = 0.01
    seed: int = 1
    flush_denormal: bool = True  # SimNorm yields float32 denormals, which are very slow on x86
    fast_kernels: bool = True    # agent.train_kernels; populations: the native member LayerNorm + Mish (False: reference ops)
    fused_adam: bool = True      # torch's fused Adam kernel (False: the per-op reference implementation)
    compile_mish: bool = True    # fuse Mish with torch.compile (falls back to eager if unavailable)
    compile: str = "auto"        # torch.compile the population update (auto: on CUDA; see agent.compiled)
    compile_mode: str | None = None  # torch.compile mode (None: "default"); CUDA-graph modes need CUDA
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> "TrainConfig":
        if self.batch_size < 1 or self.horizon < 1:
            raise ConfigError("train: batch_size and horizon must be >= 1")
        if self.lr <= 0 or self.enc_lr_scale < 0 or self.pi_adam_eps <= 0 or self.grad_clip_norm <= 0:
            raise ConfigError("train: lr, pi_adam_eps and grad_clip_norm must be > 0 and enc_lr_scale >= 0")
        if not 0 <= self.tau <= 1:
            raise ConfigError(f"train: tau must lie in [0, 1], got {self.tau}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_schedule_steps is not None and (isinstance(self.lr_schedule_steps, bool) or
                                                   not isinstance(self.lr_schedule_steps, int) or self.lr_schedule_steps < 1):
            raise ConfigError(f"train: lr_schedule_steps must be an integer >= 1 or null, got {self.lr_schedule_steps!r}")
        if self.lr_schedule != "constant" and self.lr_schedule_steps is None:
            raise ConfigError(f"train: lr_schedule {self.lr_schedule!r} needs lr_schedule_steps (the updates it spans)")
        if self.compile not in COMPILE_SETTINGS:
            raise ConfigError(f"train: compile must be one of {', '.join(COMPILE_SETTINGS)}, got {self.compile!r}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train: compile_mode must be one of {', '.join(COMPILE_MODES)} or null, "
                              f"got {self.compile_mode!r}")
        self.loss.validate()
        self.distill.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        nested = {"loss": LossConfig, "distill": DistillConfig}
        try:
            for name, kind in nested.items():
                if isinstance(values.get(name), dict):
                    values[name] = kind(**values[name])
            return cls(**values).validate()
        except TypeError as exc:
            raise ConfigError(f"train config: {exc}") from None


@dataclass
class OnlineConfig:
    """Online data collection around the offline update (upstream online trainer semantics):
    `seed_steps` environment steps with uniform random actions, then MPPI planning; one update per
    environment step after seeding, and `seed_steps` updates at the episode end where seeding is over.
    `num_envs` environments run in lockstep, cycling through the task list; episode k (over all
    environments) runs in a fresh environment seeded env_seed + k. With `checkpoint_dir` the loop
    saves its state there at every episode end and resumes from it (see `agent.online`)."""

    steps: int = 100_000        # environment steps in total (over all environments)
    seed_steps: int = 2500      # upstream: max(1000, 5 * episode_length)
    num_envs: int = 1
    episode_length: int = 500   # agent steps per episode (the store holds episode_length + 1 entries)
    updates_per_step: float = 1.0
    env_seed: int = 1
    capacity_episodes: int = 10_000
    planner: dict[str, Any] = field(default_factory=dict)  # PlannerConfig overrides for acting
    checkpoint_dir: str | None = None  # save at episode ends / resume from here

    def validate(self) -> "OnlineConfig":
        if self.steps < 1 or self.seed_steps < 0 or self.num_envs < 1:
            raise ConfigError("online: steps >= 1, seed_steps >= 0 and num_envs >= 1 required")
        if self.episode_length < 2:
            raise ConfigError(f"online: episode_length must be >= 2, got {self.episode_length}")
        if self.updates_per_step < 0:
            raise ConfigError("online: updates_per_step must be >= 0")
        if self.capacity_episodes < 1:
            raise ConfigError("online: capacity_episodes must be >= 1")
        PlannerConfig().override(**self.planner)
        return self


@dataclass
class QuantConfig:
    """Post-training quantization. `int8` quantizes every 2-D/3-D weight per output channel
    (symmetric, scale = max|w| / 127 per row / per head row); other float tensors (biases,
    LayerNorm, task embedding, masks) are stored as `int8_other_dtype`."""

    mode: str = "fp16"
    int8_other_dtype: str = "float32"  # "float32" or "float16"

    def validate(self) -> "QuantConfig":
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"quantize: unknown mode {self.mode!r}; known: {', '.join(QUANT_MODES)}")
        if self.int8_other_dtype not in ("float32", "float16"):
            raise ConfigError(f"quantize: int8_other_dtype must be float32 or float16, got {self.int8_other_dtype!r}")
        return self
