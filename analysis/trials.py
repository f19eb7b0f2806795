"""Which evaluations count for each run (one trained student, see load.RUN_COLUMN): its last `train`
evaluation, its `final` row per precision, and its endpoint (what paired comparisons use)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX, RUN_COLUMN, SweepResults
from analysis.values import format_value


ENDPOINT_QUANT = "fp32"  # the precision of the endpoint evaluation (the one the students were trained at)


def config_columns(frame: pd.DataFrame) -> list[str]:
    return [column for column in frame.columns if column.startswith(CONFIG_PREFIX)]


def failed_rows(evals: pd.DataFrame) -> pd.Series:
    """Rows that mark their trial as failed: status `error`, or a non-finite (diverged) score."""
    return (evals["status"] == "error") | ~np.isfinite(evals["score"].to_numpy(dtype=float))


def trial_outcomes(results: SweepResults) -> pd.DataFrame:
    """One row per run, sorted by run: `run`, `trial_id`, `failed`, `error`, its config columns,
    `step`, `score`, `eval_se`, `episodes` and task columns.

    `step`, `score`, `eval_se`, `episodes` and the task scores are those of the run's last ok
    `train` evaluation. A failed run (see `failed_rows`) keeps its row, to be counted, but with NaN
    scores: a run that diverged is not summarised by the evaluation before it diverged.
    """
    evals = results.evals
    configs = evals.groupby(RUN_COLUMN, sort=True)[["trial_id", *config_columns(evals)]].first()

    failed = failed_rows(evals)
    failures = evals[failed].sort_values("line")
    reasons = pd.Series([_failure_reason(row) for row in failures.itertuples()], index=failures[RUN_COLUMN],
                        dtype=object).groupby(level=0).last()

    train = evals[(evals["phase"] == "train") & ~failed]
    last_train = train.sort_values(["step", "line"]).groupby(RUN_COLUMN).tail(1).set_index(RUN_COLUMN)
    score_columns = ["step", "score", "eval_se", "episodes", *results.task_columns]

    trials = configs.join(last_train[score_columns])
    trials.insert(1, "failed", trials.index.isin(reasons.index))
    trials.insert(2, "error", reasons.reindex(trials.index).astype(object))
    trials.loc[trials["failed"], score_columns] = np.nan
    return trials.reset_index()


def _failure_reason(row) -> str:
    if row.status == "error":
        return str(row.error) if isinstance(row.error, str) and row.error else "error (no reason given)"
    return f"non-finite score at step {format_value(row.step)}"


def final_outcomes(results: SweepResults) -> pd.DataFrame:
    """One row per (run, evaluated precision) from ok `final` rows of runs that did not fail:
    run, trial_id, config columns, `quant` (the evaluated precision), `score`, `eval_se`,
    `episodes`, `size_mib`, task columns."""
    evals = results.evals
    failed_runs = set(evals.loc[failed_rows(evals), RUN_COLUMN])
    finals = evals[(evals["phase"] == "final") & ~evals[RUN_COLUMN].isin(failed_runs)]
    finals = finals.sort_values("line").groupby([RUN_COLUMN, "quant"], sort=True).tail(1)
    columns = [RUN_COLUMN, "trial_id", *config_columns(evals), "quant", "score", "eval_se", "episodes", "size_mib",
               *results.task_columns]
    return finals[columns].sort_values([RUN_COLUMN, "quant"]).reset_index(drop=True)


def endpoint_outcomes(results: SweepResults, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per run that did not fail: the evaluation that paired comparisons use.

    That is the run's `final` evaluation at ENDPOINT_QUANT when the sweep has any such row (a run
    without one, e.g. stopped early by the scheduler, is left out), else, for older result files
    or sweeps without final evaluations, the run's last `train` evaluation. Columns: those of
    `final_outcomes` (`phase` says which evaluation it is: "final" or "train").
    """
    finals = final_outcomes(results)
    endpoints = finals[finals["quant"] == ENDPOINT_QUANT].assign(phase="final")
    if endpoints.empty:
        scored = trials[~trials["failed"] & np.isfinite(trials["score"].to_numpy(dtype=float))]
        endpoints = scored.assign(phase="train", quant=ENDPOINT_QUANT, size_mib=np.nan)
    return endpoints[[*finals.columns, "phase"]].reset_index(drop=True)
