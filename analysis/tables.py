"""The ablation tables, as numbers: one per swept key, one for all settings when needed, one for quantization.

Rows are settings; columns are the mean normalized score over seeds, its 95% bootstrap CI, the
IQM over tasks × seeds, Δ vs the scratch baseline (d_coef == 0, paired by seed, see paired.py) with
its 95% CI and number of pairs, the paper's number, seeds, failures.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX, QUANT_KEY, SweepResults
from analysis.paired import rows_of, versus_scratch
from analysis.paper import paper_score
from analysis.stats import PairedDifference
from analysis.summary import group_by_setting, setting_label, shared_config, summarize
from analysis.trials import endpoint_outcomes, final_outcomes
from analysis.values import canonical, same_value, sort_key

QUANT_ORDER = ("fp32", "fp16", "bf16", "mixed", "int8", "int8_naive")  # widest precision first
NUMBER_COLUMNS = ("score", "ci_low", "ci_high", "iqm", "delta_vs_scratch", "delta_ci_low", "delta_ci_high", "n_pairs",
                  "paper", "n_seeds", "failed")


@dataclass(frozen=True)
class Table:
    """One ablation table. `rows` holds the key columns (bare config keys, canonical values), then
    NUMBER_COLUMNS, then `size_mib` for quantization tables."""

    name: str  # file stem under tables/
    title: str
    keys: tuple[str, ...]
    rows: pd.DataFrame

    @property
    def has_size(self) -> bool:
        return "size_mib" in self.rows.columns


def reference_setting(results: SweepResults, trials: pd.DataFrame) -> dict[str, object]:
    """The value each swept key is held at while another key varies: sweep.json's base_config
    value when some trial ran it, else the value most trials ran (ties: the first in sort order)."""
    base = results.meta.get("base_config") or {}
    reference = {}
    for key, column in zip(results.setting_keys, results.setting_columns):
        counts = Counter(canonical(v) for v in trials[column])
        if key in base and any(same_value(base[key], value) for value in counts):
            reference[column] = canonical(base[key])
        else:
            reference[column] = min(counts, key=lambda value: (-counts[value], sort_key(value)))
    return reference


def _matches(row: pd.Series | dict, target: dict[str, object], skip: str | None = None) -> bool:
    return all(same_value(row[column], value) for column, value in target.items() if column != skip)


def delta_columns(paired: PairedDifference) -> dict[str, float]:
    """The Δ vs scratch columns of a table row."""
    return {"delta_vs_scratch": paired.mean, "delta_ci_low": paired.ci_low, "delta_ci_high": paired.ci_high,
            "n_pairs": paired.n_pairs}


def build_tables(results: SweepResults, trials: pd.DataFrame, summaries: pd.DataFrame,
                 reference: dict[str, object]) -> list[Table]:
    """All tables of a sweep: the train-evaluation tables (unless no trial has a train evaluation
    or failed), then `quant` (when there are final evaluations). Δ vs scratch is paired on the
    runs' endpoints (`endpoint_outcomes`)."""
    endpoints = endpoint_outcomes(results, trials)
    tables = []
    if summaries["n_seeds"].sum() or summaries["failed"].sum():
        tables += train_tables(results, summaries, reference, endpoints)
    quant = quant_table(results, trials, endpoints)
    return tables + ([quant] if quant is not None else [])


def train_tables(results: SweepResults, summaries: pd.DataFrame, reference: dict[str, object],
                 endpoints: pd.DataFrame) -> list[Table]:
    """One table per swept key, the other keys held at `reference` (in a sweep of several keys, only
    when it has 2+ rows), then `settings`, with every setting, when some setting is in none of them."""
    tables, shown = [], set()
    for key in results.setting_keys:
        column = CONFIG_PREFIX + key
        rows = summaries[[_matches(row, reference, skip=column) for _, row in summaries.iterrows()]]
        if len(results.setting_keys) == 1 or len(rows) >= 2:
            tables.append(_train_table(key, (key,), rows, reference, endpoints))
            shown.update(rows.index)
    if set(summaries.index) - shown:
        tables.append(_train_table("settings", tuple(results.setting_keys), summaries, reference, endpoints))
    return tables


def _train_table(name: str, keys: tuple[str, ...], rows: pd.DataFrame, reference: dict[str, object],
                 endpoints: pd.DataFrame) -> Table:
    records = []
    for _, row in rows.iterrows():
        record = {key: row[CONFIG_PREFIX + key] for key in keys}
        record.update({column: row[column] for column in ("score", "ci_low", "ci_high", "iqm")})
        setting = {column: row[column] for column in reference}
        record.update(delta_columns(versus_scratch(rows_of(endpoints, setting), endpoints, setting)))
        quotable = len(keys) == 1  # the paper's numbers are one-factor ablations
        record["paper"] = paper_score(keys[0], row[CONFIG_PREFIX + keys[0]], row["config"]) if quotable else np.nan
        record.update(n_seeds=row["n_seeds"], failed=row["failed"])
        records.append(record)
    held = {c: v for c, v in reference.items() if c.removeprefix(CONFIG_PREFIX) not in keys}
    title = f"Normalized score vs {', '.join(keys)}" if keys else "Normalized score"
    if name != "settings" and held:
        title += f" ({setting_label(list(held), tuple(held.values()))})"
    return Table(name=name, title=title + ", last train evaluation", keys=keys,
                 rows=pd.DataFrame(records, columns=[*keys, *NUMBER_COLUMNS]))


def quant_table(results: SweepResults, trials: pd.DataFrame, endpoints: pd.DataFrame) -> Table | None:
    """Final evaluation per precision (None without final rows). Rows are the precisions, preceded by
    the swept keys whose values differ among the runs that have final rows. Δ vs scratch: each
    seed's score at that precision minus its scratch setting's endpoint (fp32) score."""
    finals = final_outcomes(results)
    if finals.empty:
        return None
    setting_columns = results.setting_columns
    varying = [c for c in setting_columns if len({canonical(v) for v in finals[c]}) > 1]
    records = []
    for setting, group in group_by_setting(finals, varying):
        config = shared_config(group)
        full_setting = {c: config.get(c.removeprefix(CONFIG_PREFIX)) for c in setting_columns}
        failed = sum(bool(t["failed"]) and _matches(t, full_setting) for _, t in trials.iterrows())
        by_precision = sorted(group.groupby("quant"), key=lambda item: _quant_order(item[0]))
        for precision, rows in by_precision:
            record = {c.removeprefix(CONFIG_PREFIX): v for c, v in zip(varying, setting)}
            record[QUANT_KEY] = precision
            record.update(summarize(rows, results.task_columns, failed=failed))
            record.update(delta_columns(versus_scratch(rows, endpoints, full_setting)))
            record["paper"] = paper_score(QUANT_KEY, precision, config)
            record["size_mib"] = float(rows["size_mib"].mean()) if rows["size_mib"].notna().any() else np.nan
            records.append(record)
    keys = (*(c.removeprefix(CONFIG_PREFIX) for c in varying), QUANT_KEY)
    return Table(name="quant", title="Normalized score per precision, final evaluation", keys=keys,
                 rows=pd.DataFrame(records, columns=[*keys, *NUMBER_COLUMNS, "size_mib"]))


def _quant_order(precision: str) -> tuple:
    return (QUANT_ORDER.index(precision), "") if precision in QUANT_ORDER else (len(QUANT_ORDER), precision)
