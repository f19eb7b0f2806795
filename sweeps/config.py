"""Trial settings and presets. The dataclass holds every default; presets override by name."""
from __future__ import annotations

import math
import numbers
import types
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

from agent.config import DISTILL_TARGETS, PRECISIONS, QUANT_MODES, ModelConfig, PlannerConfig, TrainConfig
from agent.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
TRIAL_OWNED = {"batch_size", "lr", "seed"}  # TrainConfig fields a trial sets from its own fields


@dataclass
class TrialConfig:
    """Everything one distillation trial needs (flat, JSON-serialisable: it is Ray's config)."""

    preset: str = "quick"
    ablation: str = "d_coef"          # the grid this trial belongs to (table it lands in)
    teacher: str = ""                 # teacher checkpoint path
    teacher_size: str = "large"       # label of the teacher (e.g. small/large, 48/317)
    data: str = ""                    # episode store directory
    eval_tasks: list[str] = field(default_factory=list)  # default: the store's task set
    student_size: int | None = None   # official size preset (1, 5, ...) or None for free dims
    student_dims: dict[str, int] = field(default_factory=lambda: dict(enc_dim=64, mlp_dim=64, latent_dim=32,
                                                                     task_dim=16, num_q=2))
    steps: int = 2000
    batch_size: int = 256
    d_coef: float = 0.45
    target: str = "reward"
    lr: float = 3e-4
    seed: int = 1                     # the first member's seed
    num_seeds: int = 1                # members: seeds seed .. seed + num_seeds - 1, trained as one population
    eval_every: int = 1000
    log_every: int = 100              # training metrics (losses, grad norm, lr, updates/s) every N updates
    eval_episodes: int = 2            # per task, at each evaluation during training
    final_eval_episodes: int | None = None  # per task, at the last step and for every quantized model (None: eval_episodes)
    eval_at_start: bool = False       # also evaluate the untrained members (step 0): the learning curve's first point
    eval_plan: bool = True
    eval_max_steps: int | None = None  # None = the official 500 agent steps
    eval_planner: dict[str, Any] = field(default_factory=dict)  # PlannerConfig overrides for evaluation
    quant_modes: list[str] = field(default_factory=lambda: ["fp32", "fp16"])
    # any other agent.config.TrainConfig setting, nested as there (e.g. {"horizon": 5, "loss":
    # {"rho": 0.7}}); `--set train.loss.rho=0.7` sets one entry; `--set train.lr_schedule=cosine`
    # decays lr to 0 over the trial's `steps`. batch_size, lr, seed, d_coef and
    # target are the trial's own fields above.
    train: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"              # auto: cuda when Ray gave the trial a GPU, else cpu
    precision: str = "fp32"           # training precision: fp32 (TF32 matmuls on CUDA) or bf16 autocast
    # fault injection, for the service's own failure tests: the trials with seed `fault_*_seed`
    # are killed (first attempt only) / made to diverge at that step
    fault_kill_at_step: int | None = None
    fault_kill_seed: int | None = None
    fault_nan_at_step: int | None = None
    fault_nan_seed: int | None = None

    def validate(self) -> "TrialConfig":
        for f in fields(self):  # types first: the range checks below compare numbers
            check_setting_type(f.name, getattr(self, f.name))
        for name in ("d_coef", "lr"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.d_coef < 0:
            raise ConfigError(f"d_coef must be >= 0, got {self.d_coef}")
        for name in ("steps", "batch_size", "eval_every", "log_every", "eval_episodes", "num_seeds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.final_eval_episodes is not None and self.final_eval_episodes < 1:
            raise ConfigError(f"final_eval_episodes must be >= 1 or null, got {self.final_eval_episodes}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.target not in DISTILL_TARGETS:
            raise ConfigError(f"unknown distillation target {self.target!r}; known: {', '.join(DISTILL_TARGETS)}")
        unknown = [m for m in self.quant_modes if m not in QUANT_MODES]
        if unknown:
            raise ConfigError(f"quant_modes: unknown quantization mode {unknown[0]!r}; known: {', '.join(QUANT_MODES)}")
        self.train_config()  # every agent training setting, validated where the agent defines it
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_max_steps is not None and self.eval_max_steps < 1:
            raise ConfigError(f"eval_max_steps must be >= 1, got {self.eval_max_steps}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.seed < 0:  # numpy and torch generators take non-negative seeds
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for name in ("fault_kill_at_step", "fault_kill_seed", "fault_nan_at_step", "fault_nan_seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in self.eval_tasks:
            from agent.tasksets import UnknownTaskError, task_spec

            try:
                task_spec(name)
            except UnknownTaskError as exc:  # names the task and lists the valid ones
                raise ConfigError(f"eval_tasks: {exc}") from None
        if self.student_size is not None:
            from agent.config import MODEL_SIZES

            if self.student_size not in MODEL_SIZES:
                raise ConfigError(f"student_size must be one of {sorted(MODEL_SIZES)} or null, got {self.student_size}")
        planner = {k: v for k, v in self.eval_planner.items() if k != "seed"}  # evaluation sets seed and mpc itself
        try:
            PlannerConfig().override(**{**planner, "mpc": self.eval_plan})
        except ConfigError as exc:
            raise ConfigError(f"eval_planner {_json(self.eval_planner)}: {exc}") from None
        return self

    def episodes_at(self, step: int) -> int:
        """Evaluation episodes per task of an evaluation at `step` (the final one at `steps`)."""
        if step >= self.steps and self.final_eval_episodes is not None:
            return self.final_eval_episodes
        return self.eval_episodes

    def member_seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_seeds))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}})

    def train_config(self) -> TrainConfig:
        """The agent's TrainConfig of this trial: its defaults, the trial's own fields, then `train`."""
        distill = self.train.get("distill", {})
        owned = [f"train.{k}" for k in sorted(TRIAL_OWNED & set(self.train))] + \
            [f"train.distill.{k}" for k in ("target", "d_coef") if isinstance(distill, dict) and k in distill]
        if owned:
            raise ConfigError(f"{owned[0]}: set it as the trial setting {owned[0].rsplit('.', 1)[1]!r} instead")
        values = TrainConfig().to_dict()
        values.update(batch_size=self.batch_size, lr=self.lr, seed=self.seed)
        values["distill"].update(target=self.target if self.d_coef > 0 else None, d_coef=self.d_coef)
        for key, value in self.train.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        if values.get("lr_schedule") != "constant" and values.get("lr_schedule_steps") is None:
            values["lr_schedule_steps"] = self.steps  # a schedule spans the trial's updates unless set
        return TrainConfig.from_dict(values)  # ConfigError names the setting ("train: ...", "loss: ...")

    def with_overrides(self, overrides: dict[str, Any]) -> "TrialConfig":
        overrides = dict(overrides)
        for key in [k for k in overrides if k.startswith("train.")]:  # train.loss.rho=0.7 -> train={"loss": {"rho": 0.7}}
            *path, leaf = key.split(".")[1:]
            train = overrides.setdefault("train", json.loads(json.dumps(self.train)))
            node = train
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = overrides.pop(key)
        known = {f.name: f for f in fields(self)}
        unknown = [k for k in overrides if k not in known]
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return replace(self, **overrides)


# Preset overrides. smoke: CI-sized plumbing check (tiny teacher and data built on the fly);
# quick: the embedded MT-mini benchmark (the default); paper: official teachers and MT30 data.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(preset="smoke", steps=60, batch_size=32, eval_every=30, log_every=10, eval_episodes=1, eval_max_steps=20,
                  student_dims=dict(enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2),
                  eval_planner=dict(iterations=2, num_samples=32, num_elites=4, num_pi_trajs=4),
                  quant_modes=["fp32", "fp16"]),
    "quick": dict(preset="quick"),  # completed from agent.mt_mini.benchmark.QUICK_DEFAULTS when present
    "paper": dict(preset="paper", student_size=1, student_dims={}, steps=200_000, batch_size=256, eval_every=50_000,
                  log_every=1000,
                  eval_episodes=10, eval_planner={}, quant_modes=["fp32", "fp16"]),
}


def preset_config(name: str) -> TrialConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    overrides = dict(PRESETS[name])
    if name == "quick":
        overrides.update(_quick_defaults())
    return TrialConfig().with_overrides(overrides)


def _quick_defaults() -> dict[str, Any]:
    try:
        from agent.mt_mini.benchmark import QUICK_DEFAULTS
    except ImportError:
        return {}
    known = {f.name for f in fields(TrialConfig)}
    return {k: v for k, v in QUICK_DEFAULTS.items() if k in known}


# -- setting types ----------------------------------------------------------------------------
# Every setting is checked against its declared type (the dataclass annotation), and the values
# inside student_dims / eval_planner against the fields of the config they become, so that a bad
# `--set` value is one line naming the setting, never a TypeError deep inside a trial.

_NESTED = {"student_dims": ModelConfig, "eval_planner": PlannerConfig}
_NESTED_EXCLUDED = {"student_dims": ("tasks",), "eval_planner": ("mpc",)}  # set by the trial itself
_JSON_KIND = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
              type(None): "null"}


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _json(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _kind(value: Any) -> str:
    for kind, word in _JSON_KIND.items():
        if type(value) is kind:
            return word
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, numbers.Integral):
        return "integer"
    if isinstance(value, numbers.Real):
        return "number"
    return type(value).__name__


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe_type(hint: Any) -> str:
    """`int | None` -> 'an integer or null', `list[str]` -> 'a list of strings', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is list:
        return f"a list of {describe_type(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "an object" if args[1] is Any else f"an object of {describe_type(args[1]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
            Any: "any value"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_setting_type(name: str, value: Any) -> None:
    """Raise ConfigError (one line, naming the setting and the value) unless `value` has the declared
    type of TrialConfig field `name`; student_dims / eval_planner entries are checked against the
    fields of ModelConfig / PlannerConfig."""
    hint = _hints(TrialConfig)[name]
    if name in _NESTED:  # the entries' own types (e.g. student_dims.dropout is a float) decide below
        hint = dict[str, Any]
    if not _matches(value, hint):
        raise ConfigError(f"{name} must be {describe_type(hint)}, got {_kind(value)} {_json(value)}")
    if name in _NESTED:
        nested = {k: t for k, t in _hints(_NESTED[name]).items() if k not in _NESTED_EXCLUDED[name]}
        if name == "eval_planner":
            nested["seed"] = int | None
        for key, item in value.items():
            if key not in nested:
                raise ConfigError(f"{name}: unknown key {key!r}; known: {', '.join(sorted(nested))}")
            if not _matches(item, nested[key]):
                raise ConfigError(f"{name}.{key} must be {describe_type(nested[key])}, got {_kind(item)} {_json(item)}")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a JSON value when it parses as JSON (numbers, lists, dicts), else a string."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
