"""Crossed grids (`--grid A --grid B`, sweep.json's `grids`): a two-way table of the mean normalized
score over seeds [95% CI], rows the values of A, columns the values of B, every other swept key held
at its reference value; rendered like the other tables (Markdown, LaTeX, CSV, HTML) and drawn as one
line per value of B against A (analysis/plots.py).

A scratch student (d_coef = 0) uses neither teacher nor target (paired.SCRATCH_FREE_KEYS), so a
sweep of d_coef crossed with teacher_size or target runs one scratch setting; the table shows it in
every column (and each line of the plot starts from it), and says so under the table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import CONFIG_PREFIX, SweepResults
from analysis.paired import SCRATCH_FREE_KEYS, SCRATCH_KEY
from analysis.render import DASH, interval, latex, markdown, number
from analysis.summary import setting_label
from analysis.values import canonical, format_value, same_value, sort_key

CELL_COLUMNS = ("score", "ci_low", "ci_high", "n_seeds", "failed", "ran", "shared_scratch")
NOT_RUN = "not run"


@dataclass(frozen=True)
class TwoWayTable:
    """`cells`: one row per (row value, column value), rows in order then columns in order, with the
    two key columns (bare config keys, canonical values) and CELL_COLUMNS (`ran`: the sweep has that
    combination; `shared_scratch`: the cell shows the one scratch setting)."""

    name: str  # file stem under tables/ and the plot's name: <row_key>_x_<column_key>
    title: str
    row_key: str
    column_key: str
    cells: pd.DataFrame
    notes: tuple[str, ...]

    @property
    def row_values(self) -> list:
        return list(dict.fromkeys(self.cells[self.row_key]))

    @property
    def column_values(self) -> list:
        return list(dict.fromkeys(self.cells[self.column_key]))

    @property
    def plot_name(self) -> str:
        return f"score_vs_{self.row_key}_by_{self.column_key}"

    def cell(self, row_value, column_value) -> dict:
        for record in self.cells.to_dict("records"):
            if same_value(record[self.row_key], row_value) and same_value(record[self.column_key], column_value):
                return record
        raise KeyError((row_value, column_value))


def crossed_keys(results: SweepResults) -> tuple[str, str] | None:
    """The first two keys of a crossed grid sweep, as its --grid arguments gave them (sweep.json's
    `grids`, or its `grid` "A x B"), when both are keys that tell settings apart; else None (a
    sweep of one grid, or files without sweep.json)."""
    meta = results.meta
    grids = meta.get("grids")
    if not isinstance(grids, list):
        grid = meta.get("grid")
        grids = grid.split(" x ") if isinstance(grid, str) and " x " in grid else []
    keys = []
    for text in grids:
        key = str(text).split("=", 1)[0].strip()
        if key in results.setting_keys and key not in keys:
            keys.append(key)
    return (keys[0], keys[1]) if len(keys) >= 2 else None


def _ordered(values) -> list:
    """The distinct values (canonical, 256 == 256.0), in sort_key order."""
    unique: list = []
    for value in map(canonical, values):
        if not any(same_value(value, seen) for seen in unique):
            unique.append(value)
    return sorted(unique, key=sort_key)


def two_way_table(results: SweepResults, summaries: pd.DataFrame, reference: dict[str, object]) -> TwoWayTable | None:
    """The two-way table of a crossed sweep (`crossed_keys`) from `summary.setting_summaries`, the
    other swept keys held at `reference`; None for other sweeps, or when either key has one value."""
    keys = crossed_keys(results)
    if keys is None:
        return None
    row_key, column_key = keys
    row_column, column_column = CONFIG_PREFIX + row_key, CONFIG_PREFIX + column_key
    held = {c: v for c, v in reference.items() if c not in (row_column, column_column)}
    rows = summaries[[all(same_value(r[c], v) for c, v in held.items()) for _, r in summaries.iterrows()]]
    scratch_column = CONFIG_PREFIX + SCRATCH_KEY
    free = [k for k in (row_key, column_key) if k in SCRATCH_FREE_KEYS]
    shares_scratch = SCRATCH_KEY in keys and bool(free)
    scratch = np.array([same_value(v, 0.0) for v in rows[scratch_column]], dtype=bool) \
        if scratch_column in rows else np.zeros(len(rows), dtype=bool)
    values = {}
    for key, column in ((row_key, row_column), (column_key, column_column)):
        source = rows[~scratch] if shares_scratch and key in free and (~scratch).any() else rows
        values[key] = _ordered(source[column])
    if len(values[row_key]) < 2 or len(values[column_key]) < 2:
        return None

    records, shared_from = [], None
    for row_value in values[row_key]:
        for column_value in values[column_key]:
            match = rows[[same_value(r[row_column], row_value) and same_value(r[column_column], column_value)
                          for _, r in rows.iterrows()]]
            shared = False
            cell_d_coef = row_value if row_key == SCRATCH_KEY else column_value
            if match.empty and shares_scratch and same_value(cell_d_coef, 0.0) and scratch.sum() == 1:
                match, shared = rows[scratch], True
                shared_from = match.iloc[0]
            record = {row_key: row_value, column_key: column_value}
            if len(match) == 1:
                found = match.iloc[0]
                record.update({c: found[c] for c in ("score", "ci_low", "ci_high")})
                record.update(n_seeds=int(found["n_seeds"]), failed=int(found["failed"]), ran=True,
                              shared_scratch=shared)
            else:
                record.update(score=np.nan, ci_low=np.nan, ci_high=np.nan, n_seeds=0, failed=0, ran=False,
                              shared_scratch=False)
            records.append(record)
    cells = pd.DataFrame(records, columns=[row_key, column_key, *CELL_COLUMNS])

    notes = [f"Rows: {row_key}; columns: {column_key}. Each cell: the mean normalized score over seeds of that "
             "combination's last train evaluation, with its 95% percentile-bootstrap CI over seeds ((1 seed): no CI); "
             f"{NOT_RUN}: the sweep has no such combination; failed: every seed of it failed."]
    if shared_from is not None:
        free_key = free[0]
        recorded = format_value(shared_from[CONFIG_PREFIX + free_key])
        notes.append(f"d_coef = 0 is the scratch student, which uses no {free_key}: the sweep ran it once (recorded as "
                     f"{free_key}={recorded}) and it is shown under every {free_key}.")
    title = f"Normalized score, {row_key} × {column_key}"
    if held:
        title += f" ({setting_label(list(held), tuple(held.values()))})"
    return TwoWayTable(name=f"{row_key}_x_{column_key}", title=title + ", last train evaluation", row_key=row_key,
                       column_key=column_key, cells=cells, notes=tuple(notes))


def cell_text(record: dict) -> str:
    """`16.50 [15.00, 18.00]`, `10.00 (1 seed)`, `failed` or `not run`."""
    if not record["ran"]:
        return NOT_RUN
    if record["n_seeds"] == 0 or not np.isfinite(record["score"]):
        return "failed"
    if record["n_seeds"] < 2:
        return f"{number(record['score'])} (1 seed)"
    text = f"{number(record['score'])} {interval(record['ci_low'], record['ci_high'])}"
    return text if DASH not in text else number(record["score"])


def two_way_display(table: TwoWayTable) -> tuple[list[str], list[list[str]], int]:
    """Header (the row key, then `column_key=value` per column), formatted rows, 1 label column."""
    headers = [table.row_key] + [f"{table.column_key}={format_value(v)}" for v in table.column_values]
    rows = [[format_value(row_value)] + [cell_text(table.cell(row_value, v)) for v in table.column_values]
            for row_value in table.row_values]
    return headers, rows, 1


def two_way_markdown(table: TwoWayTable) -> str:
    return markdown(*two_way_display(table))


def two_way_latex(table: TwoWayTable) -> str:
    return latex(*two_way_display(table), caption=table.title, label=table.name)


def two_way_csv(table: TwoWayTable) -> str:
    """One line per combination the sweep ran: both keys (as printed elsewhere), then the numbers at
    4 decimals (empty = unknown) and whether the cell is the shared scratch setting."""
    frame = table.cells[table.cells["ran"]].drop(columns="ran").copy()
    for key in (table.row_key, table.column_key):
        frame[key] = frame[key].map(format_value)
    frame["shared_scratch"] = frame["shared_scratch"].map(lambda v: "true" if v else "false")
    return frame.to_csv(index=False, float_format="%.4f", lineterminator="\n", na_rep="")
