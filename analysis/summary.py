"""Per-setting aggregates over seeds: mean, bootstrap CI, IQM, counts, learning curves."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX, RUN_COLUMN, SEED_KEY, SweepResults
from analysis.stats import bootstrap_ci, column_bootstrap_ci, iqm
from analysis.trials import config_columns
from analysis.values import canonical, format_value, same_value, sort_key

SUMMARY_COLUMNS = ("score", "ci_low", "ci_high", "iqm", "n_seeds", "failed")


def group_by_setting(frame: pd.DataFrame, columns: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(setting values, rows) per distinct setting of `columns`, settings in sort_key order.

    Values are `canonical` (numbers as floats, missing as None), so 256 and 256.0 are one setting.
    """
    groups: dict[tuple, list[int]] = {}
    for position, values in enumerate(frame[columns].itertuples(index=False, name=None)):
        groups.setdefault(tuple(canonical(v) for v in values), []).append(position)
    order = sorted(groups, key=lambda setting: tuple(sort_key(v) for v in setting))
    return [(setting, frame.iloc[groups[setting]]) for setting in order]


def setting_label(columns: list[str], setting: tuple, reference: dict[str, object] | None = None) -> str:
    """`d_coef=0.45, batch_size=256`; `all trials` when nothing is swept.

    With a `reference` setting, only the values that differ from it are named (`batch_size=1024`),
    unless none do: then the whole setting is.
    """
    parts = [(column, value) for column, value in zip(columns, setting)]
    if reference is not None:
        differing = [(c, v) for c, v in parts if c in reference and not same_value(v, reference[c])]
        parts = differing or parts
    return ", ".join(f"{c.removeprefix(CONFIG_PREFIX)}={format_value(v)}" for c, v in parts) or "all trials"


def seed_column(frame: pd.DataFrame) -> str:
    """The column that names a row's seed (RUN_COLUMN if the configs carry no seed)."""
    return CONFIG_PREFIX + SEED_KEY if CONFIG_PREFIX + SEED_KEY in frame.columns else RUN_COLUMN


def per_seed(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean of `columns` per seed, rows with no score dropped: trials of one setting that share a
    seed (e.g. the base setting run again in each one-factor sub-grid) count as one seed."""
    scored = rows[np.isfinite(rows["score"].to_numpy(dtype=float))]
    return scored.groupby(seed_column(scored), sort=True)[columns].mean()


def summarize(rows: pd.DataFrame, task_columns: list[str], failed: int) -> dict:
    """The summary of one setting from the rows of its runs that did not fail (one per run).

    score = mean over seeds; ci_low/ci_high = 95% bootstrap CI over seeds (NaN below 2 seeds);
    iqm = interquartile mean over tasks × seeds (over the scores when there are no task scores).
    """
    seeds = per_seed(rows, ["score", *task_columns])
    scores = seeds["score"].to_numpy(dtype=float)
    low, high = bootstrap_ci(scores)
    task_scores = seeds[task_columns].to_numpy(dtype=float)
    return {
        "score": float(scores.mean()) if scores.size else np.nan,
        "ci_low": low,
        "ci_high": high,
        "iqm": iqm(task_scores if np.isfinite(task_scores).any() else scores),
        "n_seeds": int(scores.size),
        "failed": int(failed),
    }


def setting_summaries(trials: pd.DataFrame, columns: list[str], task_columns: list[str]) -> pd.DataFrame:
    """One row per setting of `columns` (from `trial_outcomes`): the setting values, SUMMARY_COLUMNS,
    `config` (the config values all its trials share) and the mean score per task."""
    rows = []
    for setting, group in group_by_setting(trials, columns):
        scored = group[~group["failed"]]
        row = dict(zip(columns, setting))
        row.update(summarize(scored, task_columns, failed=int(group["failed"].sum())))
        row["config"] = shared_config(group)
        row.update(per_seed(scored, task_columns).mean().reindex(task_columns).to_dict())
        rows.append(row)
    return pd.DataFrame(rows, columns=[*columns, *SUMMARY_COLUMNS, "config", *task_columns])


def shared_config(trials: pd.DataFrame) -> dict[str, object]:
    """The config values (bare keys) that every trial in `trials` has in common."""
    shared = {}
    for column in config_columns(trials):
        values = {canonical(v) for v in trials[column]}
        if len(values) == 1:
            shared[column.removeprefix(CONFIG_PREFIX)] = values.pop()
    return shared


def learning_curves(results: SweepResults, trials: pd.DataFrame, reference: dict[str, object]) -> pd.DataFrame:
    """Score vs training step per setting over the runs that did not fail.

    Columns: setting (a label naming what differs from `reference`), step, score (mean over seeds),
    ci_low, ci_high (`column_bootstrap_ci` over the seeds evaluated at that step), n_seeds; sorted
    by setting order, then step.
    """
    evals = results.evals
    ok_runs = set(trials.loc[~trials["failed"], RUN_COLUMN])
    train = evals[(evals["phase"] == "train") & evals[RUN_COLUMN].isin(ok_runs)]
    columns = results.setting_columns
    rows = []
    for setting, group in group_by_setting(train, columns):
        by_step = group.pivot_table(index=seed_column(group), columns="step", values="score", aggfunc="mean")
        lows, highs = column_bootstrap_ci(by_step.to_numpy())
        label = setting_label(columns, setting, reference)
        for position, step in enumerate(by_step.columns):
            rows.append({"setting": label, "step": float(step), "score": float(by_step[step].mean()),
                         "ci_low": lows[position], "ci_high": highs[position], "n_seeds": int(by_step[step].count())})
    return pd.DataFrame(rows, columns=["setting", "step", "score", "ci_low", "ci_high", "n_seeds"])
