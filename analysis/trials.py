"""Which evaluations count for each trial: its last `train` evaluation, and its `final` row per precision."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX, SweepResults
from analysis.values import format_value


def config_columns(frame: pd.DataFrame) -> list[str]:
    return [column for column in frame.columns if column.startswith(CONFIG_PREFIX)]


def failed_rows(evals: pd.DataFrame) -> pd.Series:
    """Rows that mark their trial as failed: status `error`, or a non-finite (diverged) score."""
    return (evals["status"] == "error") | ~np.isfinite(evals["score"].to_numpy(dtype=float))


def trial_outcomes(results: SweepResults) -> pd.DataFrame:
    """One row per trial, sorted by trial_id: its config columns, `failed`, `error`, `step`, `score`
    and task columns.

    `step`, `score` and the task scores are those of the trial's last ok `train` evaluation. A
    failed trial (see `failed_rows`) keeps its row, to be counted, but with NaN scores: a run that
    diverged is not summarised by the evaluation before it diverged.
    """
    evals = results.evals
    configs = evals.groupby("trial_id", sort=True)[config_columns(evals)].first()

    failed = failed_rows(evals)
    failures = evals[failed].sort_values("line")
    reasons = pd.Series([_failure_reason(row) for row in failures.itertuples()], index=failures["trial_id"],
                        dtype=object).groupby(level=0).last()

    train = evals[(evals["phase"] == "train") & ~failed]
    last_train = train.sort_values(["step", "line"]).groupby("trial_id").tail(1).set_index("trial_id")
    score_columns = ["step", "score", *results.task_columns]

    trials = configs.join(last_train[score_columns])
    trials.insert(0, "failed", trials.index.isin(reasons.index))
    trials.insert(1, "error", reasons.reindex(trials.index).astype(object))
    trials.loc[trials["failed"], score_columns] = np.nan
    return trials.reset_index()


def _failure_reason(row) -> str:
    if row.status == "error":
        return str(row.error) if isinstance(row.error, str) and row.error else "error (no reason given)"
    return f"non-finite score at step {format_value(row.step)}"


def final_outcomes(results: SweepResults) -> pd.DataFrame:
    """One row per (trial, evaluated precision) from ok `final` rows of trials that did not fail:
    trial_id, config columns, `quant` (the evaluated precision), `score`, `size_mib`, task columns."""
    evals = results.evals
    failed_trials = set(evals.loc[failed_rows(evals), "trial_id"])
    finals = evals[(evals["phase"] == "final") & ~evals["trial_id"].isin(failed_trials)]
    finals = finals.sort_values("line").groupby(["trial_id", "quant"], sort=True).tail(1)
    columns = ["trial_id", *config_columns(evals), "quant", "score", "size_mib", *results.task_columns]
    return finals[columns].sort_values(["trial_id", "quant"]).reset_index(drop=True)
