"""Paired differences against the scratch baseline: each setting's endpoint score (see
`trials.endpoint_outcomes`) minus that of its scratch setting, seed by seed.

A setting's scratch setting has d_coef == 0 and the same value of every other swept key, except
the keys a scratch student does not use (SCRATCH_FREE_KEYS). Only seeds that both ran are paired.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX, TASK_PREFIX
from analysis.stats import PairedDifference, bootstrap_ci, paired_difference, paired_ratio_ci
from analysis.summary import group_by_setting, per_seed, setting_label
from analysis.trials import failed_rows
from analysis.values import same_value

SCRATCH_KEY = "d_coef"  # the scratch baseline is the setting with d_coef == 0
# sweeps/trial.py trains a d_coef == 0 student without a teacher and without a distillation target
# (train_config sets target None, run_trial teacher None), so these keys do not change a scratch run.
SCRATCH_FREE_KEYS = ("teacher_size", "target")
PAIRED_COLUMNS = ("label", "is_scratch", "score", "ci_low", "ci_high", "n_seeds",
                  "delta", "delta_ci_low", "delta_ci_high", "n_pairs", "scratch_seeds")


def rows_of(frame: pd.DataFrame, setting: dict[str, object]) -> pd.DataFrame:
    """The rows of `frame` whose columns hold the values of `setting` (column -> value)."""
    mask = np.array([all(same_value(row[column], value) for column, value in setting.items())
                     for row in frame[list(setting)].to_dict("records")], dtype=bool)
    return frame[mask] if setting else frame  # a boolean array selects rows even when it is empty


def is_scratch(rows: pd.DataFrame) -> bool:
    """True when `rows` (of one setting) exist and all ran with d_coef == 0."""
    column = CONFIG_PREFIX + SCRATCH_KEY
    return column in rows.columns and len(rows) > 0 and all(same_value(v, 0.0) for v in rows[column])


def scratch_rows(endpoints: pd.DataFrame, setting: dict[str, object]) -> pd.DataFrame:
    """The rows of `endpoints` from the scratch setting of `setting` (setting column -> value):
    config d_coef == 0 and the same value of every setting column but d_coef and SCRATCH_FREE_KEYS.
    Empty when the sweep ran no such setting."""
    column = CONFIG_PREFIX + SCRATCH_KEY
    if column not in endpoints.columns:
        return endpoints.iloc[:0]
    ignored = {CONFIG_PREFIX + key for key in (SCRATCH_KEY, *SCRATCH_FREE_KEYS)}
    scratch = endpoints[np.array([same_value(v, 0.0) for v in endpoints[column]], dtype=bool)]
    return rows_of(scratch, {c: v for c, v in setting.items() if c not in ignored})


def seed_scores(rows: pd.DataFrame) -> pd.Series:
    """Mean score per seed of `rows` (index: the seed); runs of one setting sharing a seed count once."""
    return per_seed(rows, ["score"])["score"]


def versus_scratch(rows: pd.DataFrame, endpoints: pd.DataFrame, setting: dict[str, object]) -> PairedDifference:
    """`rows`' per-seed scores minus those of `setting`'s scratch setting in `endpoints`, paired by seed."""
    return paired_difference(seed_scores(rows), seed_scores(scratch_rows(endpoints, setting)))


def paired_table(endpoints: pd.DataFrame, columns: list[str], reference: dict[str, object]) -> pd.DataFrame:
    """One row per setting of `columns` (setting columns) in `endpoints`, in setting order.

    Columns: the setting columns, then PAIRED_COLUMNS: label (what differs from `reference`),
    is_scratch, score / ci_low / ci_high / n_seeds (endpoint mean over seeds and its bootstrap CI),
    delta / delta_ci_low / delta_ci_high / n_pairs (`versus_scratch`), scratch_seeds (seeds of its
    scratch setting; 0 when the sweep ran none).
    """
    records = []
    for values, rows in group_by_setting(endpoints, columns):
        setting = dict(zip(columns, values))
        scores = seed_scores(rows)
        paired = versus_scratch(rows, endpoints, setting)
        records.append({**setting, "label": setting_label(columns, values, reference), "is_scratch": is_scratch(rows),
                        "score": float(scores.mean()) if len(scores) else float("nan"),
                        **dict(zip(("ci_low", "ci_high"), bootstrap_ci(scores))), "n_seeds": len(scores),
                        "delta": paired.mean, "delta_ci_low": paired.ci_low, "delta_ci_high": paired.ci_high,
                        "n_pairs": paired.n_pairs, "scratch_seeds": len(seed_scores(scratch_rows(endpoints, setting)))})
    return pd.DataFrame(records, columns=[*columns, *PAIRED_COLUMNS])


def versus_reference_value(endpoints: pd.DataFrame, columns: list[str], reference: dict[str, object],
                           column: str) -> pd.DataFrame:
    """Distilled settings (d_coef != 0) compared with the same setting at `reference[column]`, seed by
    seed: e.g. teacher_size=small minus teacher_size=large, every other setting column equal.

    One row per setting of `columns` whose `column` value differs from the reference value and that
    has such a partner: the setting columns, then label (`column`'s value), partner_label (the
    reference value), held (the other columns' values), delta / delta_ci_low / delta_ci_high / n_pairs."""
    records = []
    settings = dict(group_by_setting(endpoints, columns))
    for values, rows in settings.items():
        setting = dict(zip(columns, values))
        if is_scratch(rows) or same_value(setting[column], reference[column]):
            continue
        partner = tuple(reference[column] if c == column else v for c, v in zip(columns, values))
        partner_rows = next((r for key, r in settings.items() if all(map(same_value, key, partner))), None)
        if partner_rows is None:
            continue
        paired = paired_difference(seed_scores(rows), seed_scores(partner_rows))
        others = [c for c in columns if c != column]
        records.append({**setting, "label": setting_label([column], (setting[column],)),
                        "partner_label": setting_label([column], (reference[column],)),
                        "held": setting_label(others, tuple(setting[c] for c in others)) if others else "",
                        "delta": paired.mean, "delta_ci_low": paired.ci_low, "delta_ci_high": paired.ci_high,
                        "n_pairs": paired.n_pairs})
    return pd.DataFrame(records, columns=[*columns, "label", "partner_label", "held", "delta", "delta_ci_low", "delta_ci_high",
                                          "n_pairs"])


START_COLUMNS = ("label", "start", "end", "ratio", "ratio_ci_low", "ratio_ci_high", "delta", "delta_ci_low",
                 "delta_ci_high", "n_pairs")


def start_rows(evals: pd.DataFrame) -> pd.DataFrame:
    """The ok `train` evaluations at step 0 of `evals` (`load.SweepResults.evals`): the students
    before any update, written by trials run with `eval_at_start`."""
    step = pd.to_numeric(evals["step"], errors="coerce").to_numpy(dtype=float)
    return evals[(evals["phase"] == "train").to_numpy() & (step == 0) & ~failed_rows(evals).to_numpy()]


def versus_start(evals: pd.DataFrame, endpoints: pd.DataFrame, columns: list[str],
                 reference: dict[str, object]) -> pd.DataFrame:
    """Each setting's endpoint score against the same students untrained (`start_rows`), seed by
    seed: does training move the students at all? One row per setting of `columns` with step-0
    rows: the setting columns, then START_COLUMNS: label, start / end (mean over the paired seeds
    of the untrained and the endpoint score), ratio (end / start) and its `paired_ratio_ci`
    (ratio_ci_low / ratio_ci_high), delta / delta_ci_low / delta_ci_high / n_pairs
    (`paired_difference` of end minus start). Empty without step-0 rows."""
    starts = start_rows(evals)
    records = []
    for values, rows in group_by_setting(endpoints, columns) if len(starts) else []:
        setting = dict(zip(columns, values))
        end, start = seed_scores(rows), seed_scores(rows_of(starts, setting))
        if start.empty:
            continue
        paired = paired_difference(end, start)
        both = end.index.intersection(start.index)
        end_mean, start_mean = float(end[both].mean()), float(start[both].mean())
        ratio_low, ratio_high = paired_ratio_ci(end, start)
        records.append({**setting, "label": setting_label(columns, values, reference), "start": start_mean,
                        "end": end_mean, "ratio": end_mean / start_mean if start_mean > 0 else float("nan"),
                        "ratio_ci_low": ratio_low, "ratio_ci_high": ratio_high,
                        "delta": paired.mean, "delta_ci_low": paired.ci_low, "delta_ci_high": paired.ci_high,
                        "n_pairs": paired.n_pairs})
    return pd.DataFrame(records, columns=[*columns, *START_COLUMNS])


TASK_DELTA_COLUMNS = ("label", "task", "delta", "delta_ci_low", "delta_ci_high", "n_pairs")


def per_task_versus_scratch(endpoints: pd.DataFrame, columns: list[str], reference: dict[str, object],
                            task_columns: list[str]) -> pd.DataFrame:
    """Each distilled setting's endpoint score on each task minus its scratch setting's on the same
    task, paired by seed: where on the task set distillation moves a student. One row per
    (distilled setting with a scratch setting, task) in setting then task order: the setting
    columns, then TASK_DELTA_COLUMNS (task: the name without its column prefix). A task with
    no finite score in either setting gives NaN differences and 0 pairs."""
    records = []
    for values, rows in group_by_setting(endpoints, columns):
        setting = dict(zip(columns, values))
        scratch = scratch_rows(endpoints, setting)
        if is_scratch(rows) or scratch.empty:
            continue
        mine, theirs = per_seed(rows, task_columns), per_seed(scratch, task_columns)
        for column in task_columns:
            paired = paired_difference(mine[column], theirs[column])
            records.append({**setting, "label": setting_label(columns, values, reference),
                            "task": column.removeprefix(TASK_PREFIX), "delta": paired.mean, "delta_ci_low": paired.ci_low,
                            "delta_ci_high": paired.ci_high, "n_pairs": paired.n_pairs})
    return pd.DataFrame(records, columns=[*columns, *TASK_DELTA_COLUMNS])
