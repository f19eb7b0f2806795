"""One distillation trial: train a student against a teacher, evaluate it periodically and under
each quantization mode at the end. Written against a small `Reporter` seam so it runs under Ray
Tune (sweeps.tune_adapter) or directly (tests)."""
from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from agent.checkpoint import load_world_model, save_world_model
from agent.config import DistillConfig, TrainConfig, model_config
from agent.data import EpisodeStore
from agent.evaluate import evaluate, normalized_score, task_scores
from agent.train import offline_trainer
from agent.world_model import WorldModel
from sweeps.config import TrialConfig

TRAINER_FILE = "trainer.pt"


class Reporter(Protocol):
    def __call__(self, row: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""


@dataclass
class TrialContext:
    trial_id: str
    restore_dir: Path | None = None  # checkpoint directory of a previous attempt
    node_id: str | None = None


def build_student(cfg: TrialConfig, tasks: list[str]) -> WorldModel:
    torch.manual_seed(cfg.seed)
    return WorldModel(model_config(cfg.student_size, tasks=tasks, **cfg.student_dims))


def train_config(cfg: TrialConfig) -> TrainConfig:
    return TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       distill=DistillConfig(target=cfg.target if cfg.d_coef > 0 else None, d_coef=cfg.d_coef)).validate()


def _row(cfg: TrialConfig, ctx: TrialContext, step: int, phase: str, quant: str, scores: dict[str, float] | None,
         episodes: int, size_mib: float | None = None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "trial_id": ctx.trial_id, "status": "error" if error else "ok",
        "config": {"d_coef": cfg.d_coef, "batch_size": cfg.batch_size, "steps": cfg.steps,
                   "teacher_size": cfg.teacher_size, "target": cfg.target, "seed": cfg.seed,
                   "student": str(cfg.student_size or "custom"), "quant": "fp32", "ablation": cfg.ablation,
                   "lr": cfg.lr, "preset": cfg.preset},
        "step": step, "phase": phase, "quant": quant,
        "score": None if scores is None else float(sum(scores.values()) / len(scores)),
        "task_scores": scores, "size_mib": size_mib, "episodes": episodes, "error": error,
        "node_id": ctx.node_id, **extra,
    }


def _evaluate(model: WorldModel, cfg: TrialConfig, tasks: list[str]) -> dict[str, float]:
    df = evaluate(model, cfg.eval_tasks or tasks, cfg.eval_episodes, seed=cfg.seed, plan=cfg.eval_plan,
                  agent_overrides=dict(cfg.eval_planner), progress=False, task_set=tasks,
                  max_steps=cfg.eval_max_steps)
    normalized_score(df)  # raises on an empty evaluation
    return task_scores(df)


def _inject_faults(cfg: TrialConfig, ctx: TrialContext, step: int, model: WorldModel) -> None:
    kill = cfg.fault_kill_at_step is not None and cfg.fault_kill_seed in (None, cfg.seed)
    if kill and ctx.restore_dir is None and step >= cfg.fault_kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)  # a crashed worker: Ray must retry from the checkpoint
    nan = cfg.fault_nan_at_step is not None and cfg.fault_nan_seed in (None, cfg.seed)
    if nan and step >= cfg.fault_nan_at_step:
        with torch.no_grad():
            model._dynamics[0].weight.fill_(float("nan"))


def _parameters_finite(model: WorldModel) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def run_trial(cfg: TrialConfig, ctx: TrialContext, report: Reporter,
              log: Callable[[str], None] = lambda _: None) -> None:
    """Train and evaluate one trial, reporting one row per evaluation (see docs/results-format.md).

    A diverged trial reports one `error` row and returns (it is not retried); any other exception
    propagates so the scheduler can retry the trial from its last checkpoint."""
    cfg.validate()
    torch.set_num_threads(max(1, int(os.environ.get("DISTILL_TRIAL_THREADS", torch.get_num_threads()))))
    store = EpisodeStore(cfg.data)
    tasks = list(store.manifest.tasks)
    student = build_student(cfg, tasks)
    teacher = cfg.teacher if cfg.d_coef > 0 else None
    trainer = offline_trainer(student, store, train_config(cfg), teacher_path=teacher)
    if ctx.restore_dir is not None:
        trainer.load(ctx.restore_dir / TRAINER_FILE)
        log(f"restored from step {trainer.step}")
    restored_from = trainer.step if ctx.restore_dir is not None else None
    start = time.perf_counter()
    while trainer.step < cfg.steps:
        chunk = min(cfg.eval_every - trainer.step % cfg.eval_every, cfg.steps - trainer.step)
        for _ in range(chunk):
            _inject_faults(cfg, ctx, trainer.step, student)
            try:
                metrics = trainer.update()
            except RuntimeError:
                if _parameters_finite(student):
                    raise  # a genuine failure: let the scheduler retry from the checkpoint
                metrics = {"total": float("nan")}  # NaN weights break two-hot indexing mid-update
            loss = metrics["total"]
            if not math.isfinite(loss):
                report(_row(cfg, ctx, trainer.step, "train", "fp32", None, cfg.eval_episodes,
                            error=f"diverged: non-finite loss at step {trainer.step}"), None)
                return
        scores = _evaluate(student, cfg, tasks)
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            trainer.save(Path(checkpoint_dir) / TRAINER_FILE)
            report(_row(cfg, ctx, trainer.step, "train", "fp32", scores, cfg.eval_episodes,
                        restored_from=restored_from, updates_per_s=trainer.step / (time.perf_counter() - start)),
                   Path(checkpoint_dir))
    if not cfg.quant_modes:
        return
    from agent.quantize import quantize_file

    with tempfile.TemporaryDirectory() as scratch:
        fp32_file = save_world_model(student, Path(scratch) / "student.pt")
        for mode in cfg.quant_modes:  # each precision goes through a real file and the loader
            result = quantize_file(fp32_file, mode, Path(scratch) / f"student-{mode}.pt")
            scores = _evaluate(load_world_model(result.path), cfg, tasks)
            report(_row(cfg, ctx, trainer.step, "final", mode, scores, cfg.eval_episodes, size_mib=result.size_mib), None)
