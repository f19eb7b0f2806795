"""Checks a sweep's trials on the driver before Ray starts (the CLI refuses bad input in one line).

For every trial it builds what the trial will build from its settings (`sweeps.trial.run_trial`):
the student's model config, the training / distillation config, the evaluation planner; and checks
them against the inputs: evaluation tasks against the store's and the teacher's task sets, the
store's dimensions and episode length, the teacher's compatibility with the student, and the batch
size against this machine's memory. It writes nothing: the smoke preset's teachers and store,
which a sweep builds inside its output directory, are checked from the constants that build them
(`sweeps.setup.smoke_teacher_config`, ...).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from agent.config import ModelConfig, model_config
from agent.errors import ConfigError, DistillError
from sweeps.config import TrialConfig
from sweeps.setup import (SMOKE_DEFAULT_TEACHER, SMOKE_EPISODE_STEPS, SMOKE_EPISODES_PER_TASK, SMOKE_PLANNED, SMOKE_TASKS,
                          Inputs, resolve_inputs, smoke_teacher_config, validate_store)

GIB = 2**30


@dataclass(frozen=True)
class StoreFacts:
    """What a trial reads from an episode store's manifest."""

    path: str
    tasks: tuple[str, ...]
    obs_dim: int
    action_dim: int
    episode_length: int
    episodes: int

    @classmethod
    def of(cls, path: str) -> "StoreFacts":
        from agent.data import EpisodeStore

        manifest = EpisodeStore(validate_store(path)).manifest
        return cls(str(path), tuple(manifest.tasks), manifest.obs_dim, manifest.action_dim, manifest.episode_length,
                   manifest.episodes)


@dataclass
class InputPlan:
    """The sweep's teachers and store (`sweeps.setup.Inputs`), with their configs read once."""

    inputs: Inputs
    _stores: dict[str, StoreFacts] = field(default_factory=dict)
    _teachers: dict[str, ModelConfig] = field(default_factory=dict)

    def store(self, path: str) -> StoreFacts:
        if path not in self._stores:
            if path.startswith(SMOKE_PLANNED):
                large = smoke_teacher_config(SMOKE_DEFAULT_TEACHER)  # the smoke store is rolled out from it
                self._stores[path] = StoreFacts(path, tuple(SMOKE_TASKS), large.obs_dim, large.action_dim,
                                                SMOKE_EPISODE_STEPS + 1, SMOKE_EPISODES_PER_TASK * len(SMOKE_TASKS))
            else:
                self._stores[path] = StoreFacts.of(path)
        return self._stores[path]

    def teacher(self, path: str) -> ModelConfig:
        if path not in self._teachers:
            if path.startswith(SMOKE_PLANNED):
                label = path[len(SMOKE_PLANNED):].removeprefix("teacher-").rstrip(">")
                self._teachers[path] = smoke_teacher_config(label)
            else:
                from agent.checkpoint import load_world_model

                self._teachers[path] = load_world_model(path).cfg  # CheckpointError names the file
        return self._teachers[path]


def plan_inputs(preset: str, teacher_args: list[str], data: str | None) -> InputPlan:
    """The inputs `sweeps.setup.resolve_inputs` will use, validated, without writing anything."""
    return InputPlan(resolve_inputs(preset, teacher_args, data, None))


def memory_limit(gpus_per_trial: float) -> int:
    """Bytes one trial can use on this machine: its RAM, or the GPU's memory when trials get a GPU."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if gpus_per_trial > 0:
        import torch

        if torch.cuda.is_available():
            limit = min(limit, torch.cuda.get_device_properties(0).total_memory)
    return limit


def update_bytes_per_sample(model: ModelConfig, horizon: int) -> int:
    """A lower bound on the memory one sample of a batch takes in one update of `model`: the
    sampled window (float32) and one copy of the forward activations autograd keeps for backward
    (encoder over H+1 steps; dynamics, reward, policy and every Q head over H steps)."""
    H, m = horizon, model
    floats = (H + 1) * m.obs_dim + H * m.action_dim + 2 * H + 1
    floats += (H + 1) * (m.enc_dim * max(m.num_enc_layers - 1, 1) + m.latent_dim)
    floats += H * (2 * m.mlp_dim + m.latent_dim)                    # dynamics
    floats += H * (2 * m.mlp_dim + m.num_bins)                      # reward
    floats += H * m.num_q * (2 * m.mlp_dim + m.num_bins)            # Q heads
    floats += H * (2 * m.mlp_dim + 2 * m.action_dim)                # policy
    return 4 * floats


def where(path: str) -> str:
    """A path for messages; the smoke preset's planned inputs are named for what they will be."""
    if path.startswith(SMOKE_PLANNED):
        return f"the smoke preset's {path[len(SMOKE_PLANNED):].rstrip('>')}, built in OUT/_setup"
    return path


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _known_task_names(tasks: list[str]) -> bool:
    """False for the placeholder names (task0, task1, ...) of a checkpoint whose task list is unknown."""
    from agent.tasksets import MT30_SPECS

    return all(t in MT30_SPECS for t in tasks)


def check_trial(cfg: TrialConfig, plan: InputPlan, memory: int | None) -> None:
    """Build and check what `sweeps.trial.run_trial` builds for `cfg` (its `data` and, with a
    teacher, `teacher` resolved); ConfigError (one line, naming the setting and value) on failure.
    `memory`: bytes a trial may use on its machine (None: unknown, e.g. a remote cluster)."""
    from agent.population import POPULATION_TARGETS
    from sweeps.trial import train_config

    cfg.validate()
    try:
        store = plan.store(cfg.data)
    except DistillError as exc:
        raise ConfigError(f"data: {exc}") from None
    missing = [t for t in cfg.eval_tasks if t not in store.tasks]
    if missing:
        raise ConfigError(f"eval_tasks: {missing[0]!r} is not in the episode store's task set "
                          f"({', '.join(store.tasks)}; store: {where(store.path)})")
    try:
        student = model_config(cfg.student_size, tasks=list(store.tasks), **cfg.student_dims)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"student_dims {_json(cfg.student_dims)}"
                          f"{'' if cfg.student_size is None else f' (student_size {cfg.student_size})'}: {exc}") from None
    if (student.obs_dim, student.action_dim) != (store.obs_dim, store.action_dim):
        raise ConfigError(f"the student's obs/action dims ({student.obs_dim}/{student.action_dim}) differ from the "
                          f"episode store's ({store.obs_dim}/{store.action_dim}; store: {where(store.path)})")
    train = train_config(cfg)
    if not 1 <= train.horizon <= store.episode_length - 1:
        raise ConfigError(f"training horizon {train.horizon} does not fit the store's episodes of "
                          f"{store.episode_length} entries (store: {where(store.path)})")
    target = train.distill.target if cfg.d_coef > 0 else None
    if target is not None:
        try:
            teacher = plan.teacher(cfg.teacher)
        except DistillError as exc:
            raise ConfigError(f"teacher: {exc}") from None
        teacher_at = f"teacher {cfg.teacher_size!r} ({where(cfg.teacher)})"
        if (teacher.obs_dim, teacher.action_dim) != (student.obs_dim, student.action_dim):
            raise ConfigError(f"{teacher_at}: obs/action dims {teacher.obs_dim}/{teacher.action_dim} differ from the "
                              f"student's {student.obs_dim}/{student.action_dim}")
        if _known_task_names(teacher.tasks) and list(teacher.tasks) != list(store.tasks):
            raise ConfigError(f"{teacher_at} was trained on tasks ({', '.join(teacher.tasks)}), "
                              f"not the episode store's ({', '.join(store.tasks)})")
        if len(teacher.tasks) != len(store.tasks) or teacher.task_action_dims != student.task_action_dims:
            raise ConfigError(f"{teacher_at}: its task set ({len(teacher.tasks)} tasks) differs from the episode store's "
                              f"({len(store.tasks)} tasks)")
    if cfg.precision != "fp32" and target not in POPULATION_TARGETS:
        raise ConfigError(f"precision {cfg.precision!r} needs the population executor, which cannot serve "
                          f"target {target!r}")
    if memory is not None:
        members = len(cfg.member_seeds())
        need = cfg.batch_size * members * update_bytes_per_sample(student, train.horizon)
        if need > memory:
            raise ConfigError(f"batch_size {cfg.batch_size}: one update of {members} student(s) needs at least "
                              f"{need / GIB:,.1f} GiB (sampled windows and activations), more than the "
                              f"{memory / GIB:,.1f} GiB a trial has here (the store holds "
                              f"{store.episodes * (store.episode_length - train.horizon):,} distinct windows)")


def describe_point(cfg: TrialConfig, base: TrialConfig) -> str:
    """'d_coef=0.45' / 'batch_size=1024, steps=...': the settings in which a trial differs from the base."""
    keys = ("d_coef", "batch_size", "steps", "teacher_size", "target", "quant_modes", "lr")
    diff = [f"{k}={_json(getattr(cfg, k))}" for k in keys if getattr(cfg, k) != getattr(base, k)]
    return ", ".join(diff)
