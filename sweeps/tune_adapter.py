"""Ray Tune glue: the function trainable that runs `sweeps.trial.run_trial` inside a Tune trial, its
results (evaluation rows, training curves for TensorBoard), trial names and the progress table."""
from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from sweeps.config import TrialConfig
from sweeps.results import STUDENTS_DIR, RowStream
from sweeps.trial import TrialContext, run_trial


class StreamRows(tune.Callback):
    """Driver-side: every trial result's rows go to OUT/results.jsonl as they are reported. With a
    remote OUT (`remote`, the --out URI), `out` is the staging copy and results.jsonl is mirrored
    to the store as rows arrive (sweeps.storage.ResultsMirror: at most every few seconds, and when
    the sweep ends); a restored sweep recomputes the staging copy on the machine it resumes on.

    A trial's last checkpoint holds its trained students (students/, see sweeps.trial): they are
    copied from where Tune stored it to OUT/students/<trial_id>/ (in the store for a remote OUT)."""

    remote: str | None = None  # defaults for callbacks pickled before these attributes existed
    mirror = None
    warned_students = False

    def __init__(self, out: Path, remote: str | None = None):
        self.out = Path(out)
        self.remote = remote
        self.stream: RowStream | None = None
        self.mirror = None

    def _open(self) -> RowStream:
        if self.stream is None:  # opened lazily: the callback is pickled with the experiment
            if self.remote is not None:
                from sweeps.storage import ResultsMirror, staging_dir

                self.out = staging_dir(self.remote)
                self.mirror = ResultsMirror(self.out, self.remote)
            self.stream = RowStream(self.out)
        return self.stream

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        stream = self._open()
        before = len(stream.rows)
        stream.add_result(result)
        if self.mirror is not None and len(stream.rows) != before:
            self.mirror.changed()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.keep_students(trial.trial_id, checkpoint)

    def keep_students(self, trial_id: str, checkpoint, missing_only: bool = False) -> None:
        """Copy `checkpoint`'s students/ (where Tune stored it) to OUT/students/<trial_id>/; nothing
        for a checkpoint taken during training, or with `missing_only` when that directory exists. A
        copy that fails is reported once on stderr; the sweep goes on."""
        import pyarrow.fs as pafs

        from sweeps import storage

        source = f"{checkpoint.path.rstrip('/')}/{STUDENTS_DIR}"
        self._open()
        destination = (storage.join(self.remote, STUDENTS_DIR, trial_id) if self.remote is not None
                       else self.out / STUDENTS_DIR / trial_id)
        try:
            if checkpoint.filesystem.get_file_info(source).type != pafs.FileType.Directory:
                return
            if missing_only and (storage.exists(destination, directory=True) if self.remote is not None
                                 else Path(destination).is_dir()):
                return
            storage.copy_dir(checkpoint.filesystem, source, destination)
        except (OSError, ValueError) as exc:  # Tune's checkpoint still holds them; the sweep's rows and report go on
            if not self.warned_students:
                print(f"warning: could not copy trial {trial_id}'s students to {STUDENTS_DIR}/ "
                      f"({storage.first_line(exc)}); they stay in its checkpoint {checkpoint.path}", file=sys.stderr)
                self.warned_students = True

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.mirror is not None:
            self.mirror.flush()

    def on_experiment_end(self, trials, **info) -> None:
        if self.mirror is not None:
            self.mirror.flush(force=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"out": self.out, "remote": self.remote, "stream": None, "mirror": None}


# -- what a sweep shows while it runs: trial names, the progress table, the reported metrics ----------

CONFIG_FIELD = {"quant": "quant_modes"}  # swept key -> the TrialConfig field that holds it
SCRATCH_UNUSED = ("teacher_size", "target")  # a d_coef 0 student uses neither


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's settings: the TrialConfig dict under "trial", overridden by sampled values at the top."""
    values = dict(config.get("trial", {}))
    values.update({k: v for k, v in config.items() if k != "trial"})
    return values


def seed_range(values: dict[str, Any]) -> str:
    """The trial's member seeds: '1-5', or '3' for one seed."""
    first, count = int(values.get("seed") or 0), int(values.get("num_seeds") or 1)
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


def seeds_label(values: dict[str, Any]) -> str:
    return f"{'seed' if int(values.get('num_seeds') or 1) == 1 else 'seeds'}={seed_range(values)}"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, (list, tuple)):
        return "+".join(_format(v) for v in value)
    return str(value)


class TrialNamer:
    """Tune's trial_name_creator (`dirname=False`: the name in the progress table and logs) and
    trial_dirname_creator (`dirname=True`): what the trial is, e.g. `d_coef=0.45,seeds=1-5`; the
    directory name ends with the trial id, unique within the sweep. `keys`: the swept keys (None:
    the keys of each trial's own ablation, for the paper grid)."""

    def __init__(self, keys: list[str] | None, dirname: bool = False):
        self.keys = list(keys) if keys is not None else None
        self.dirname = dirname

    def label(self, config: dict[str, Any]) -> str:
        from sweeps.grids import swept_keys

        values = trial_values(config)
        keys = self.keys if self.keys is not None else swept_keys(str(values.get("ablation", "d_coef")))
        scratch = values.get("d_coef") == 0
        parts = [f"{k}={'none' if scratch and k in SCRATCH_UNUSED else _format(values.get(CONFIG_FIELD.get(k, k)))}"
                 for k in keys]
        return ",".join(parts + [seeds_label(values)])

    def __call__(self, trial) -> str:
        name = self.label(trial.config)
        if not self.dirname:
            return name
        return f"{re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)[:150]}_{trial.trial_id}"


def progress_reporter(swept: list[str], searched: list[str] = ()):
    """Tune's console table: one row per trial with the swept parameters, the seeds, the members
    still training, the update step, the score (members' mean fp32 evaluation) and the training loss."""
    from ray.tune import CLIReporter

    parameters = {(k if k in searched else f"trial/{CONFIG_FIELD.get(k, k)}"): k for k in swept}
    metrics = {"seeds": "seeds", "members": "members", "step": "step", "score": "score", "loss": "loss"}
    return CLIReporter(parameter_columns=parameters, metric_columns=metrics, max_column_length=24, max_progress_rows=60,
                       max_report_frequency=30, print_intermediate_tables=True)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


class TuneReporter:
    """run_trial's two reporters inside a Tune trial, as Tune results (`send` is tune.report).

    Every result carries `score` (Tune's metric for searchers and ASHA: the members' mean fp32
    score of the latest training evaluation; quantized evaluations at the end carry it on, so a
    search ranks the student, not its last quantization mode), `step` (also `timesteps_total`,
    TensorBoard's x axis), `seeds`, `members` and `loss` (the latest logged training loss). Evaluations add `row_json` (the rows, whole) and
    `eval` (mean and per-task scores, means over members) or `final/<quant>`; training metrics add
    `train` (losses, grad norm, lr, updates/s; per member under train/seed/<seed>)."""

    def __init__(self, values: dict[str, Any], send: Callable[..., None] | None = None):
        self.send = send or tune.report
        self.seeds = seed_range(values)
        self.members = int(values.get("num_seeds") or 1)
        self.score = float("nan")
        self.loss = float("nan")

    def _base(self, step: int) -> dict[str, Any]:
        return {"score": self.score, "step": step, "timesteps_total": step, "seeds": self.seeds, "members": self.members,
                "loss": self.loss}

    def rows(self, rows: list[dict[str, Any]], checkpoint_dir: Path | None) -> None:
        first = rows[0]
        ok = [r for r in rows if r["score"] is not None]
        if first["phase"] == "train" and ok:
            self.score = _mean([r["score"] for r in ok])
            self.members = int(first.get("members") or len(rows))
        elif first["phase"] == "train" and first["status"] == "error":
            self.members = max(0, self.members - len(rows))  # diverged members leave
        metrics = {**self._base(first["step"]), "phase": first["phase"], "quant": first["quant"],
                   "row_json": json.dumps(rows)}
        scores = {"score": _mean([r["score"] for r in ok])} if ok else {}
        tasks = sorted({t for r in ok for t in (r.get("task_scores") or {})})
        scores.update({t: _mean([(r.get("task_scores") or {}).get(t) for r in ok]) for t in tasks})
        if ok and first["phase"] == "train":
            metrics["eval"] = scores
        elif ok:
            metrics[f"final_score_{first['quant']}"] = scores["score"]
            metrics["final"] = {first["quant"]: scores}
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self.send(metrics, checkpoint=checkpoint)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        self.loss = float(values.get("total", float("nan")))
        self.send({**self._base(step), "phase": "train", "train": values})


def trainable(param_space: dict[str, Any]) -> None:
    """Ray function trainable. `param_space["trial"]` is a TrialConfig dict; search spaces put the
    sampled values at the top level of `param_space`, which override it."""
    values = trial_values(param_space)
    cfg = TrialConfig.from_dict(values)
    context = tune.get_context()
    restore = tune.get_checkpoint()
    with tempfile.TemporaryDirectory() as restore_dir:
        restore_path = None
        if restore is not None:
            restore_path = Path(restore.to_directory(restore_dir))
        ctx = TrialContext(trial_id=context.get_trial_id(), restore_dir=restore_path,
                           node_id=ray.get_runtime_context().get_node_id())

        reporter = TuneReporter(values)
        run_trial(cfg, ctx, reporter.rows, metrics=reporter.metrics)
