"""One distillation trial: one setting with its seeds, trained as a population of students against
a teacher, each evaluated periodically and under each quantization mode at the end. Written against a small `Reporter` seam so it runs under Ray
Tune (sweeps.tune_adapter) or directly (tests)."""
from __future__ import annotations

import json
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
from agent.config import TrainConfig, model_config
from agent.data import EpisodeStore
from agent.evaluate import evaluate_members, score_standard_error, task_scores
from agent.population import Population, offline_members
from agent.world_model import WorldModel
from sweeps.config import TrialConfig
from sweeps.results import STUDENTS_DIR, student_file

TRAINER_FILE = "trainer.pt"
MEMBERS_FILE = "members.json"  # the seeds still training (diverged members leave)


class Reporter(Protocol):
    """Receives the rows of one report (one per member) and the checkpoint that goes with them."""

    def __call__(self, rows: list[dict[str, Any]], checkpoint_dir: Path | None) -> None: ...


class MetricsReporter(Protocol):
    """Receives the training metrics of the last `log_every` updates (run_trial's optional second
    reporter): `step` is the update count, `metrics` the members' means (losses, grad norms, lr,
    updates/s) with each member's own under metrics["seed"][str(seed)]."""

    def __call__(self, step: int, metrics: dict[str, Any]) -> None: ...


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""


@dataclass
class TrialContext:
    trial_id: str
    restore_dir: Path | None = None  # checkpoint directory of a previous attempt
    node_id: str | None = None


def build_student(cfg: TrialConfig, tasks: list[str], seed: int | None = None) -> WorldModel:
    """The student of `cfg`, initialised from `seed` (default cfg.seed)."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    return WorldModel(model_config(cfg.student_size, tasks=tasks, **cfg.student_dims))


def trial_device(cfg: TrialConfig) -> torch.device:
    """The trial's device: `cfg.device`, where `auto` is cuda when a GPU is visible to this
    process (Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs; none without --gpus-per-trial)."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()
                                and os.environ.get("CUDA_VISIBLE_DEVICES", "") != ""):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but this trial's process sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the fp32 path's speed on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def train_config(cfg: TrialConfig) -> TrainConfig:
    return cfg.train_config()


def _row(cfg: TrialConfig, ctx: TrialContext, seed: int, step: int, phase: str, quant: str,
         evaluation: "Evaluation | None", size_mib: float | None = None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    scores = evaluation.task_scores if evaluation is not None else None
    return {
        "trial_id": ctx.trial_id, "status": "error" if error else "ok",
        "config": {"d_coef": cfg.d_coef, "batch_size": cfg.batch_size, "steps": cfg.steps,
                   "teacher_size": cfg.teacher_size, "target": cfg.target, "seed": seed,
                   "student": str(cfg.student_size or "custom"), "quant": "fp32", "ablation": cfg.ablation,
                   "lr": cfg.lr, "preset": cfg.preset},
        "step": step, "phase": phase, "quant": quant,
        "score": None if scores is None else float(sum(scores.values()) / len(scores)),
        "task_scores": scores, "eval_se": None if evaluation is None else evaluation.se,
        "size_mib": size_mib, "episodes": evaluation.episodes if evaluation is not None else cfg.episodes_at(step),
        "error": error,
        "node_id": ctx.node_id, **extra,
    }


@dataclass
class Evaluation:
    task_scores: dict[str, float]
    se: float | None  # standard error of the mean-over-tasks score from the episode spread (None: 1 episode)
    episodes: int     # per task


def eval_env_workers(device: torch.device) -> int:
    """Environment worker processes of an evaluation on `device`: $DISTILL_EVAL_ENV_WORKERS if set,
    else min(8, CPUs - 1) on CUDA (MuJoCo steps beside the GPU's planning) and 0 on CPU (the
    planner needs the cores)."""
    override = os.environ.get("DISTILL_EVAL_ENV_WORKERS", "").strip()
    if override:
        return max(0, int(override))
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def _evaluate(models: list[WorldModel], cfg: TrialConfig, tasks: list[str], seeds: list[int],
              step: int) -> list[Evaluation]:
    """Models at `step` (member k with seed seeds[k]) evaluated with the trial's protocol
    (`cfg.episodes_at(step)` episodes per task), all members in one lockstep batch. Torch's global
    random streams (CPU, and the models' CUDA device) are put back afterwards: training draws its
    dropout from them (see `_members_for_evaluation`)."""
    weights = next(models[0].parameters(), None) if isinstance(models[0], torch.nn.Module) else None
    device = weights.device if weights is not None else torch.device("cpu")
    episodes = cfg.episodes_at(step)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        frames = evaluate_members(models, cfg.eval_tasks or tasks, episodes, seeds, plan=cfg.eval_plan,
                                  agent_overrides=dict(cfg.eval_planner), progress=False, task_set=tasks,
                                  max_steps=cfg.eval_max_steps, env_workers=eval_env_workers(device),
                                  compile=train_config(cfg).compile)
    return [_evaluation(df, episodes) for df in frames]


def _members_for_evaluation(members: Any, device: torch.device) -> list[WorldModel]:
    """Every member as a model of its own. Building a model initialises its weights from torch's
    global stream before the member's are loaded, so the stream is put back afterwards: training
    draws its dropout from it, and where and how often a trial evaluates must not change how it
    trains (`_evaluate` puts it back after evaluating, too)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return [members.member(k) for k in range(members.K)]


def _evaluation(df, episodes: int) -> Evaluation:
    """One model's evaluation rows -> task scores and the standard error of their mean."""
    return Evaluation(task_scores(df), score_standard_error(df), episodes)


def _inject_faults(cfg: TrialConfig, ctx: TrialContext, step: int, members: Any) -> None:
    seeds = list(members.seeds)
    kill = cfg.fault_kill_at_step is not None and (cfg.fault_kill_seed is None or cfg.fault_kill_seed in seeds)
    if kill and ctx.restore_dir is None and step >= cfg.fault_kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)  # a crashed worker: Ray must retry from the checkpoint
    if cfg.fault_nan_at_step is None or step < cfg.fault_nan_at_step:
        return
    for k, seed in enumerate(seeds):
        if cfg.fault_nan_seed in (None, seed):
            with torch.no_grad():
                if isinstance(members, Population):
                    members.params["_dynamics.0.weight"][k].fill_(float("nan"))
                else:
                    members.member(k)._dynamics[0].weight.fill_(float("nan"))


def _update(members: Any) -> tuple[list[dict[str, float]], bool]:
    """One update of every member -> (each member's metrics, whether the update ran). A member whose
    weights are non-finite gets a NaN total (NaN weights can break two-hot indexing mid-update)."""
    try:
        return members.update(), True
    except RuntimeError:
        finite = members.finite_members()
        if all(finite):
            raise  # a genuine failure: let the scheduler retry from the checkpoint
        return [{"total": 0.0 if ok else float("nan")} for ok in finite], False


MEMBER_METRICS = ("total", "consistency", "reward", "value", "distill", "pi_loss", "grad_norm")  # also per member
_NOT_AVERAGED = ("step", "update_ms", "updates_per_s")  # the window's own rate replaces the last update's


def _learning_rate(members: Any) -> float | None:
    """The model optimizer's learning rate (its largest group: the encoder's is scaled down)."""
    optim = getattr(members, "optim", None)
    if optim is None and getattr(members, "trainers", None):
        optim = members.trainers[0].optim
    return None if optim is None else float(max(group["lr"] for group in optim.param_groups))


class _MetricWindow:
    """Training metrics of every member since the last log: per-seed sums of each metric, and the
    seconds spent in updates (evaluations excluded)."""

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, float]] = {}
        self.counts: dict[int, int] = {}
        self.updates = 0
        self.seconds = 0.0

    def add(self, seeds: list[int], metrics: list[dict[str, float]], seconds: float) -> None:
        self.updates += 1
        self.seconds += seconds
        for seed, values in zip(seeds, metrics):
            if not math.isfinite(values.get("total", float("nan"))):
                continue
            sums = self.sums.setdefault(seed, {})
            for key, value in values.items():
                if key not in _NOT_AVERAGED:
                    sums[key] = sums.get(key, 0.0) + float(value)
            self.counts[seed] = self.counts.get(seed, 0) + 1

    def summary(self, alive: list[int], lr: float | None) -> dict[str, Any] | None:
        """Means over the window and over the members still training; None when nothing to say."""
        seeds = [s for s in alive if self.counts.get(s)]
        if not seeds or not self.updates:
            return None
        per_seed = {s: {k: v / self.counts[s] for k, v in self.sums[s].items()} for s in seeds}
        keys = [k for k in per_seed[seeds[0]] if all(k in per_seed[s] for s in seeds)]
        out: dict[str, Any] = {k: sum(per_seed[s][k] for s in seeds) / len(seeds) for k in keys}
        if lr is not None:
            out["lr"] = lr
        rate = self.updates / self.seconds if self.seconds > 0 else float("nan")
        out["updates_per_s"] = rate  # population updates (every member one step) per second
        out["member_updates_per_s"] = rate * len(seeds)
        out["seed"] = {str(s): {k: per_seed[s][k] for k in MEMBER_METRICS if k in per_seed[s]} for s in seeds}
        return out


def run_trial(cfg: TrialConfig, ctx: TrialContext, report: Reporter,
              log: Callable[[str], None] = lambda _: None, metrics: MetricsReporter | None = None) -> None:
    """Train and evaluate one trial: the setting `cfg` with its seeds (cfg.member_seeds()) trained
    as one population, one row per member and evaluation (see docs/results-format.md). With
    `metrics`, the training metrics averaged over every `cfg.log_every` updates go there too (at
    an evaluation step, after that evaluation's report).

    A diverged member reports one `error` row and leaves the population (the others go on); any
    other exception propagates so the scheduler can retry the trial from its last checkpoint."""
    cfg.validate()
    torch.set_num_threads(max(1, int(os.environ.get("DISTILL_TRIAL_THREADS", torch.get_num_threads()))))
    store = EpisodeStore(cfg.data)
    tasks = list(store.manifest.tasks)
    seeds = cfg.member_seeds()
    device = trial_device(cfg)
    students = [build_student(cfg, tasks, seed).to(device) for seed in seeds]
    teacher = cfg.teacher if cfg.d_coef > 0 else None
    members = offline_members(students, store, train_config(cfg), seeds, teacher_path=teacher, log=log,
                              precision=cfg.precision)
    executor = "population" if isinstance(members, Population) else "separate"
    if ctx.restore_dir is not None:
        saved_seeds = json.loads((ctx.restore_dir / MEMBERS_FILE).read_text())
        members.keep([seeds.index(s) for s in saved_seeds])
        members.load(ctx.restore_dir / TRAINER_FILE)
        log(f"restored from step {members.step}")
    restored_from = members.step if ctx.restore_dir is not None else None
    try:
        _train_and_evaluate(cfg, ctx, report, members, tasks, device, executor, restored_from, metrics)
    except torch.cuda.OutOfMemoryError as exc:  # not retried: the same trial on the same GPU runs out again
        message = str(exc).strip().splitlines()[0][:300]
        report([_row(cfg, ctx, seed, members.step, "train", "fp32", None, error=f"CUDA out of memory: {message}")
                for seed in members.seeds], None)


def _train_and_evaluate(cfg: TrialConfig, ctx: TrialContext, report: Reporter, members: Any, tasks: list[str],
                        device: torch.device, executor: str, restored_from: int | None,
                        metrics: MetricsReporter | None = None) -> None:
    start = time.perf_counter()
    latest: dict[int, Evaluation] = {}  # seed -> evaluation of the current weights
    window = _MetricWindow()

    def log_metrics() -> None:
        nonlocal window
        summary = window.summary(list(members.seeds), _learning_rate(members))
        window = _MetricWindow()
        if summary is not None and metrics is not None:
            metrics(members.step, summary)

    def evaluate_and_report() -> None:
        """Evaluate every member at the current step, checkpoint, report one row per member."""
        nonlocal latest
        evaluations = _evaluate(_members_for_evaluation(members, device), cfg, tasks, list(members.seeds), members.step)
        latest = dict(zip(members.seeds, evaluations))
        rate = members.step * members.K / (time.perf_counter() - start) if members.step else None
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            _save_members(members, Path(checkpoint_dir))
            report([_row(cfg, ctx, seed, members.step, "train", "fp32", evaluation, restored_from=restored_from,
                         updates_per_s=rate, executor=executor, members=members.K, device=device.type)
                    for seed, evaluation in zip(members.seeds, evaluations)], Path(checkpoint_dir))

    if cfg.eval_at_start and members.step == 0:  # the untrained members; a trial restored later has this row
        evaluate_and_report()
        start = time.perf_counter()  # updates_per_s counts training and the evaluations after this one
    while members.step < cfg.steps and members.K:
        chunk = min(cfg.eval_every - members.step % cfg.eval_every, cfg.steps - members.step)
        for i in range(chunk):
            _inject_faults(cfg, ctx, members.step, members)
            started = time.perf_counter()
            step_metrics, updated = _update(members)
            if updated and metrics is not None:
                window.add(list(members.seeds), step_metrics, time.perf_counter() - started)
            losses = [m["total"] for m in step_metrics]
            diverged = [k for k, loss in enumerate(losses) if not math.isfinite(loss)]
            if diverged:
                report([_row(cfg, ctx, members.seeds[k], members.step, "train", "fp32", None,
                             error=f"diverged: non-finite loss at step {members.step}") for k in diverged], None)
                members.keep([k for k in range(members.K) if k not in diverged])
                if not members.K:
                    return
            if metrics is not None and members.step % cfg.log_every == 0 and i < chunk - 1:
                log_metrics()  # at the chunk's last update: after its evaluation (below)
        evaluate_and_report()
        if metrics is not None and (members.step % cfg.log_every == 0 or members.step == cfg.steps):
            log_metrics()
    if not cfg.quant_modes:
        return
    from agent.quantize import quantize_file

    # The students' files of every precision go into the trial's last checkpoint (students/, with
    # the training state a retry needs), which Tune stores and the driver copies to OUT/students/.
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory() as checkpoint_dir:
        _save_members(members, Path(checkpoint_dir))  # before building models moves torch's RNG
        files = [save_world_model(members.member(k), Path(scratch) / f"student-{seed}.pt")
                 for k, seed in enumerate(members.seeds)]
        students = Path(checkpoint_dir) / STUDENTS_DIR
        for i, mode in enumerate(cfg.quant_modes):  # each precision goes through a real file and the loader
            results = [quantize_file(fp32_file, mode, students / student_file(seed, mode))
                       for seed, fp32_file in zip(members.seeds, files)]
            evaluations = dict(latest) if mode == "fp32" else {}  # the fp32 files hold the weights just evaluated
            fresh = [(seed, result) for seed, result in zip(members.seeds, results)
                     if seed not in evaluations or evaluations[seed].episodes != cfg.episodes_at(members.step)]
            if fresh:
                evaluations.update(zip([seed for seed, _ in fresh], _evaluate(
                    [load_world_model(result.path, device=device) for _, result in fresh], cfg, tasks,
                    [seed for seed, _ in fresh], members.step)))
            last = i == len(cfg.quant_modes) - 1
            report([_row(cfg, ctx, seed, members.step, "final", mode, evaluations[seed], size_mib=result.size_mib)
                    for seed, result in zip(members.seeds, results)], Path(checkpoint_dir) if last else None)


def _save_members(members: Any, checkpoint_dir: Path) -> None:
    """The training state a retried trial restores from: every member's weights and optimizer
    state, and the seeds still training."""
    members.save(checkpoint_dir / TRAINER_FILE)
    (checkpoint_dir / MEMBERS_FILE).write_text(json.dumps(members.seeds))
