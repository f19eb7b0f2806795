"""The report's findings in plain sentences: a verdict per setting against scratch, the d_coef
headline, and the evaluation noise beside the seed spread. Every function returns plain text."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX
from analysis.paired import SCRATCH_KEY, seed_scores
from analysis.render import interval, number
from analysis.summary import group_by_setting
from analysis.values import format_value, same_value


def endpoint_name(endpoints: pd.DataFrame) -> str:
    """What the endpoint rows are (`trials.endpoint_outcomes`): "final fp32" or "last train-phase"."""
    return "final fp32" if (endpoints["phase"] == "final").any() else "last train-phase"


def _difference(row: dict) -> str:
    """`+1.97 [1.82, 2.06]`: a row's mean paired difference and its 95% CI."""
    return f"{number(row['delta'], signed=True)} {interval(row['delta_ci_low'], row['delta_ci_high'])}"


def _ci_says(row: dict, above: str, below: str, neither: str = "no detectable difference") -> str:
    """Whether a row's 95% CI of the paired difference excludes 0, and what that means."""
    if row["delta_ci_low"] > 0:
        return f"the 95% CI excludes 0: {above}."
    if row["delta_ci_high"] < 0:
        return f"the 95% CI excludes 0: {below}."
    return f"the 95% CI includes 0: {neither}."


def verdict(row: dict) -> str:
    """One sentence on a `paired.paired_table` row of a distilled (not scratch) setting."""
    label, pairs = row["label"], int(row["n_pairs"])
    if row["scratch_seeds"] == 0:
        return f"{label}: the sweep has no scratch setting (d_coef = 0) with the same other settings: not compared."
    if pairs == 0:
        return f"{label}: no seed in common with its scratch setting: not compared."
    if pairs == 1:
        return (f"{label}: {number(row['delta'], signed=True)} over scratch on 1 paired seed; "
                "a CI needs at least 2 paired seeds: no conclusion.")
    return (f"{label}: {_difference(row)} over scratch on {pairs} paired seeds; "
            + _ci_says(row, "distillation helps at this scale", "distillation hurts at this scale"))


def comparison(row: dict) -> str:
    """One sentence on a `paired.versus_reference_value` row: the setting minus its partner at the
    reference value, paired by seed, and whether the 95% CI excludes 0."""
    label, partner, pairs = row["label"], row["partner_label"], int(row["n_pairs"])
    head = f"{label} vs {partner}" + (f" ({row['held']}): " if row["held"] else ": ")
    if pairs < 2:
        return head + f"{pairs} paired seed(s); a CI needs at least 2: no conclusion."
    return head + f"{_difference(row)} on {pairs} paired seeds; " + _ci_says(row, f"{label} scores higher",
                                                                             f"{label} scores lower")


def learned(row: dict) -> str:
    """One sentence on a `paired.versus_start` row: the endpoint score against the same students
    untrained, paired by seed, and whether the 95% CI excludes 0."""
    label, pairs = row["label"], int(row["n_pairs"])
    ratio = ""
    if math.isfinite(row["ratio"]):
        known = math.isfinite(row["ratio_ci_low"])
        ratio = f" (ratio {row['ratio']:.2f}x" + (f", 95% CI [{row['ratio_ci_low']:.2f}, {row['ratio_ci_high']:.2f}])"
                                                  if known else ")")
    head = f"{label}: {number(row['end'])} trained against {number(row['start'])} untrained{ratio}; "
    if pairs < 2:
        return head + f"{pairs} paired seed(s); a CI needs at least 2: no conclusion."
    return head + f"difference {_difference(row)} on {pairs} paired seeds; " + _ci_says(
        row, "the students learn", "training makes the students worse", "no detectable learning")


def task_findings(task_rows: pd.DataFrame) -> str:
    """One sentence on a `paired.per_task_versus_scratch` frame: the (setting, task) pairs whose 95%
    CI excludes 0, above and below, and how many were compared."""
    rows = task_rows[task_rows["n_pairs"] >= 2]
    if rows.empty:
        return "No task has 2 or more paired seeds: no per-task conclusion."
    def listed(selected: pd.DataFrame) -> str:
        return "; ".join(f"{row['task']} at {row['label']} {_difference(row)}" for row in selected.to_dict("records"))
    above, below = rows[rows["delta_ci_low"] > 0], rows[rows["delta_ci_high"] < 0]
    text = (f"Of {len(rows)} (setting, task) differences, each compared alone with no correction for "
            f"{len(rows)} comparisons, the 95% CI lies entirely above 0 for {len(above)}")
    text += f" ({listed(above)})" if len(above) else ""
    text += f" and entirely below 0 for {len(below)}" + (f" ({listed(below)})" if len(below) else "") + "."
    return text


def verdicts(paired: pd.DataFrame) -> list[str]:
    """`verdict` of every distilled setting of a `paired.paired_table`, in setting order."""
    return [verdict(row) for row in paired.to_dict("records") if not row["is_scratch"]]


def d_coef_rows(paired: pd.DataFrame, reference: dict[str, object]) -> pd.DataFrame:
    """The rows of a `paired_table` that differ from `reference` in d_coef only (the d_coef grid);
    empty unless d_coef is a setting column."""
    column = CONFIG_PREFIX + SCRATCH_KEY
    if column not in paired.columns:
        return paired.iloc[:0]
    held = {c: v for c, v in reference.items() if c != column}
    return paired[np.array([all(same_value(row[c], v) for c, v in held.items()) for row in paired.to_dict("records")],
                           dtype=bool)]


def headline(paired: pd.DataFrame, reference: dict[str, object], endpoint: str) -> str | None:
    """Which d_coef has the highest mean `endpoint` score and whether its paired difference from
    scratch is resolved (95% CI excludes 0); then how many d_coef > 0 are. None unless the sweep
    ran d_coef = 0 and some d_coef > 0 at the reference values of the other keys."""
    rows = d_coef_rows(paired, reference).dropna(subset=["score"])
    scratch, distilled = rows[rows["is_scratch"]], rows[~rows["is_scratch"]]
    if scratch.empty or distilled.empty:
        return None
    best = rows.loc[rows["score"].idxmax()]
    base = scratch.iloc[0]
    name = f"d_coef={format_value(best[CONFIG_PREFIX + SCRATCH_KEY])}"
    scores = (f"{number(best['score'])} {interval(best['ci_low'], best['ci_high'])} over {int(best['n_seeds'])} seeds "
              f"(scratch, d_coef=0: {number(base['score'])} {interval(base['ci_low'], base['ci_high'])}, "
              f"{int(base['n_seeds'])} seeds)")
    if best["is_scratch"]:
        text = (f"Scratch (d_coef=0) has the highest mean {endpoint} score, {scores}: "
                "no d_coef > 0 beats it on average.")
    else:
        text = f"{name} has the highest mean {endpoint} score of the {len(rows)} d_coef values, {scores}. "
        text += _resolution(best)
    above = int((distilled["delta_ci_low"] > 0).sum())
    below = int((distilled["delta_ci_high"] < 0).sum())
    alone = (f"each compared alone, no correction for {len(distilled)} comparisons" if len(distilled) > 1
             else "one comparison")
    return (text + f" Against scratch, the 95% CI lies entirely above 0 for {above} of the {len(distilled)} d_coef > 0 "
            f"and entirely below 0 for {below} ({alone}).")


def _resolution(row: pd.Series) -> str:
    """Whether a headline row's paired difference from scratch is resolved, in one sentence."""
    pairs = int(row["n_pairs"])
    if pairs < 2:
        return f"Its difference from scratch is unresolved: {pairs} paired seed(s), a CI needs at least 2."
    text = (f"Its paired difference from scratch is {number(row['delta'], signed=True)} "
            f"{interval(row['delta_ci_low'], row['delta_ci_high'])} on {pairs} seeds: ")
    if row["delta_ci_low"] > 0 or row["delta_ci_high"] < 0:
        return text + "the 95% CI excludes 0, so the difference is resolved."
    return text + "the 95% CI includes 0, so at this scale the sweep cannot tell it from scratch."


def between_seed_sd(endpoints: pd.DataFrame, columns: list[str]) -> tuple[float, int]:
    """Median over settings (of `columns`) of the standard deviation (ddof=1) of the per-seed
    endpoint scores, and how many settings had the 2+ seeds it needs; (NaN, 0) when none did."""
    sds = [seed_scores(rows).std(ddof=1) for _, rows in group_by_setting(endpoints, columns)]
    sds = [sd for sd in sds if np.isfinite(sd)]
    return (float(np.median(sds)), len(sds)) if sds else (math.nan, 0)


def episodes_text(endpoints: pd.DataFrame) -> str:
    """`3 episodes per task`, `2–10 episodes per task` when rows differ, or that it is unknown."""
    episodes = pd.to_numeric(endpoints["episodes"], errors="coerce").dropna()
    if episodes.empty:
        return "episodes per task unknown"
    low, high = format_value(episodes.min()), format_value(episodes.max())
    if low != high:
        return f"{low}–{high} episodes per task"
    return f"{low} episode per task" if low == "1" else f"{low} episodes per task"


def measured_se(endpoints: pd.DataFrame) -> np.ndarray:
    """`eval_se` per endpoint row, NaN where unmeasured: absent, or from under 2 episodes per task
    (no episode spread; sweeps/trial.py then writes 0)."""
    se = endpoints["eval_se"].to_numpy(dtype=float)
    episodes = pd.to_numeric(endpoints["episodes"], errors="coerce").to_numpy(dtype=float)
    return np.where(episodes < 2, np.nan, se)  # NaN episodes compare False: their eval_se is kept


def evaluation_noise(endpoints: pd.DataFrame, columns: list[str], endpoint: str) -> str:
    """The per-evaluation standard error (median `measured_se` of the endpoint rows) beside the
    between-seed spread (`between_seed_sd`), in two sentences."""
    se = measured_se(endpoints)
    known = se[np.isfinite(se)]
    sd, n_settings = between_seed_sd(endpoints, columns)
    spread = (f"the between-seed standard deviation of the score within a setting is {number(sd)} (median over "
              f"{n_settings} settings)" if n_settings else "the between-seed spread is unknown (no 2-seed setting)")
    if not known.size:
        return (f"Evaluation noise: unknown, the result rows carry no eval_se (written before it was recorded, "
                f"or from 1 episode per task); {episodes_text(endpoints)}. For comparison, {spread}.")
    coverage = f"{known.size} runs" if known.size == len(se) else f"the {known.size} of {len(se)} runs reporting it"
    text = (f"Evaluation noise: one {endpoint} evaluation has a standard error of {number(float(np.median(known)))} "
            f"(median over {coverage}; {episodes_text(endpoints)}, from the spread of episode scores); {spread}.")
    if n_settings and sd > 0:
        text += f" The evaluation standard error is {100 * float(np.median(known)) / sd:.0f}% of the seed spread."
    return text
