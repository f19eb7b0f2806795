"""What a preset needs before trials start: teacher checkpoints and an episode store.

smoke builds two tiny teachers (random, untrained: a plumbing check) and a small store rolled
out from the large one, inside the sweep directory; quick uses the shipped MT-mini teachers and
collects the MT-mini dataset on first use; paper uses the files the user points to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from agent.checkpoint import load_world_model, save_world_model
from agent.config import model_config
from agent.data import EpisodeStore
from agent.errors import ConfigError
from agent.world_model import WorldModel

SMOKE_TASKS = ["cartpole-balance", "pendulum-swingup"]
SMOKE_TEACHER_DIMS = {"small": dict(enc_dim=48, mlp_dim=48, latent_dim=24, task_dim=8, num_q=2),
                      "large": dict(enc_dim=96, mlp_dim=96, latent_dim=48, task_dim=16, num_q=2)}
SMOKE_EPISODES_PER_TASK = 2
SMOKE_EPISODE_STEPS = 50  # agent steps: the store holds episodes of SMOKE_EPISODE_STEPS + 1 entries
SMOKE_DEFAULT_TEACHER = "large"  # the smoke data is rolled out from it


SMOKE_PLANNED = "<smoke-preset:"  # prefix of the stand-in paths of a planned (not yet built) smoke input


def smoke_teacher_config(label: str):
    """ModelConfig of the smoke preset's `label` teacher (what `_smoke_inputs` builds)."""
    return model_config(None, tasks=SMOKE_TASKS, **SMOKE_TEACHER_DIMS[label])


def _smoke_plan() -> "Inputs":
    """What `_smoke_inputs` would build, with stand-in paths (SMOKE_PLANNED...); nothing is written."""
    return Inputs({label: f"{SMOKE_PLANNED}teacher-{label}>" for label in SMOKE_TEACHER_DIMS},
                  f"{SMOKE_PLANNED}data>", SMOKE_DEFAULT_TEACHER)


@dataclass
class Inputs:
    teachers: dict[str, str]  # teacher-size label -> checkpoint path
    data: str
    default_teacher: str


def validate_teacher(path: str) -> str:
    """Refuse a missing/corrupt/non-TD-MPC2 teacher before any trial starts (CheckpointError)."""
    load_world_model(path)
    return str(Path(path).resolve())


def validate_store(path: str) -> str:
    EpisodeStore(path)  # StoreError names the problem
    return str(Path(path).resolve())


def _smoke_inputs(setup_dir: Path) -> Inputs:
    from agent.data.collect import collect_to_store

    setup_dir.mkdir(parents=True, exist_ok=True)
    teachers = {}
    for label in SMOKE_TEACHER_DIMS:
        path = setup_dir / f"teacher-{label}.pt"
        if not path.exists():
            torch.manual_seed(0 if label == "small" else 1)
            save_world_model(WorldModel(smoke_teacher_config(label)), path)
        teachers[label] = str(path)
    data = setup_dir / "data"
    if not (data / "manifest.json").exists():
        collect_to_store(teachers[SMOKE_DEFAULT_TEACHER], data, SMOKE_TASKS, episodes=SMOKE_EPISODES_PER_TASK, seed=0,
                         plan=False, noise_std=0.5, episode_steps=SMOKE_EPISODE_STEPS, progress=False)
    return Inputs(teachers, str(data), SMOKE_DEFAULT_TEACHER)


def _quick_inputs(data: str | None) -> Inputs:
    try:
        from agent.mt_mini import benchmark as mt_mini
    except ImportError as exc:
        raise ConfigError(f"the quick preset needs the MT-mini benchmark (agent.mt_mini.benchmark): {exc}") from None
    teachers = {size: str(mt_mini.teacher_path(size)) for size in ("small", "large")}
    return Inputs(teachers, data or str(mt_mini.ensure_dataset()), "large")


def resolve_inputs(preset: str, teacher_args: list[str], data: str | None, setup_dir: Path | None) -> Inputs:
    """Teachers (label -> path) and the store for a preset, after `--teacher` / `--data`.
    With `setup_dir` None the smoke preset's inputs are only planned (stand-in paths, see
    `_smoke_plan`), so a sweep can be checked before anything is written.

    `--teacher PATH` sets the default teacher; `--teacher LABEL=PATH` (repeatable) names teachers
    for the teacher_size grid (e.g. 48=mt30-48M.pt 317=mt30-317M.pt)."""
    given: dict[str, str] = {}
    for arg in teacher_args:
        label, sep, path = arg.partition("=")
        label, path = (label, path) if sep and not Path(arg).exists() else ("default", arg)
        given[label] = validate_teacher(path)
    if data is not None:
        data = validate_store(data)
    if preset == "paper":
        if not given or data is None:
            raise ConfigError("the paper preset needs --teacher (official 317M/48M checkpoints) and --data (an MT30 store)")
        base = Inputs({}, data, "")
    elif preset == "smoke":
        if given and data:
            base = Inputs({}, data, "")
        else:
            base = _smoke_inputs(setup_dir) if setup_dir is not None else _smoke_plan()
        if data is not None:
            base.data = data
    else:
        base = _quick_inputs(data)
    if "default" in given:
        base.teachers["default"] = given.pop("default")
        base.default_teacher = "default"
    base.teachers.update(given)
    if not base.default_teacher:
        base.default_teacher = max(given, key=lambda s: float(s) if s.replace(".", "").isdigit() else 0)
    return base
