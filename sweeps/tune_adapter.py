"""Ray Tune glue: the function trainable that runs `sweeps.trial.run_trial` inside a Tune trial."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sweeps.config import TrialConfig
from sweeps.results import RowStream
from sweeps.trial import TrialContext, run_trial


class StreamRows(tune.Callback):
    """Driver-side: every trial result's rows go to OUT/results.jsonl as they are reported."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.stream: RowStream | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.stream is None:  # opened lazily: the callback is pickled with the experiment
            self.stream = RowStream(self.out)
        self.stream.add_result(result)

    def __getstate__(self) -> dict[str, Any]:
        return {"out": self.out, "stream": None}


def trainable(param_space: dict[str, Any]) -> None:
    """Ray function trainable. `param_space["trial"]` is a TrialConfig dict; search spaces put the
    sampled values at the top level of `param_space`, which override it."""
    values = dict(param_space.get("trial", {}))
    values.update({k: v for k, v in param_space.items() if k != "trial"})
    cfg = TrialConfig.from_dict(values)
    context = tune.get_context()
    restore = tune.get_checkpoint()
    with tempfile.TemporaryDirectory() as restore_dir:
        restore_path = None
        if restore is not None:
            restore_path = Path(restore.to_directory(restore_dir))
        ctx = TrialContext(trial_id=context.get_trial_id(), restore_dir=restore_path,
                           node_id=ray.get_runtime_context().get_node_id())

        train_score = [float("nan")]

        def report(rows: list[dict[str, Any]], checkpoint_dir: Path | None) -> None:
            # Tune's metric (searchers, ASHA) is the members' mean fp32 score of the latest training
            # evaluation; quantized evaluations at the end carry it on, so a search ranks the
            # student, not its last quantization mode. The rows travel whole.
            scores = [r["score"] for r in rows if r["score"] is not None]
            if rows[0]["phase"] == "train" and scores:
                train_score[0] = sum(scores) / len(scores)
            final_mean = sum(scores) / len(scores) if scores and rows[0]["phase"] == "final" else None
            metrics = {"score": train_score[0], "step": rows[0]["step"], "phase": rows[0]["phase"],
                       "quant": rows[0]["quant"], "members": len(rows), "row_json": json.dumps(rows)}
            if final_mean is not None:
                metrics[f"final_score_{rows[0]['quant']}"] = final_mean
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            tune.report(metrics, checkpoint=checkpoint)

        run_trial(cfg, ctx, report)
