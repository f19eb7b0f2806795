"""Figures of a sweep (matplotlib `Figure` objects, no pyplot state): each function returns one figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.load import CONFIG_PREFIX, TASK_PREFIX
from analysis.paper import PAPER_LABEL
from analysis.summary import setting_label
from analysis.tables import Table
from analysis.twoway import TwoWayTable
from analysis.values import format_value, is_number, same_value, sort_key

SCORE_LABEL = "normalized score (return / 10)"
STEPS_LABEL = "training steps"
SIZE_LABEL = "model size (MiB)"
# The paper's numbers are on MT30 (30 tasks, 1M student): another scale, so they get their own axes.
PAPER_AXIS_LABEL = "paper's normalized score (MT30 scale)"
KEY_LABELS = {
    "d_coef": "distillation coefficient d_coef",
    "batch_size": "batch size (samples)",
    "steps": STEPS_LABEL,
    "teacher_size": "teacher size",
    "target": "distillation target",
    "quant": "precision",
}
MAX_LEGEND_ENTRIES = 12
MAX_ANNOTATED_CELLS = 300


def _finish(figure: Figure, axes, xlabel: str, ylabel: str, title: str, legend: bool = False) -> None:
    """Labels, title, grid (and legend) shared by the line plots."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if legend:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()


def key_label(key: str) -> str:
    return KEY_LABELS.get(key, key)


def _yerr(frame: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars from the CI columns; 0 where the CI is unknown (a single seed)."""
    below = (frame["score"] - frame["ci_low"]).to_numpy(dtype=float)
    above = (frame["ci_high"] - frame["score"]).to_numpy(dtype=float)
    return np.nan_to_num(np.vstack([below, above]), nan=0.0)


def _numeric_axis(values) -> bool:
    return len(values) > 0 and all(is_number(v) for v in values)


def _value_axis(axes, values: list) -> np.ndarray:
    """x positions of a key's values: the values on a numeric axis (log when they span 100×), else
    0..n-1 labelled with the values."""
    if _numeric_axis(values):
        x = np.asarray(values, dtype=float)
        if x.min() > 0 and x.max() / x.min() >= 100:
            axes.set_xscale("log")
        return x
    x = np.arange(len(values))
    axes.set_xticks(x, [format_value(v) for v in values])
    return x


def _draw_values(axes, x: np.ndarray, y, numeric: bool, yerr=None, **style) -> None:
    """y per key value: a line with error bars on a numeric axis, bars on a categorical one."""
    if numeric:
        axes.errorbar(x, y, yerr=yerr, marker="o", capsize=4, **style)
    else:
        axes.bar(x, y, yerr=yerr, capsize=4, alpha=0.8, **style)


def ablation_figure(table: Table) -> Figure:
    """Mean score per value of the table's one key, with 95% CI error bars (axes[0]). When the paper
    has numbers for some values they are drawn in a second panel (axes[1]) with its own y-axis,
    the MT30 scale: never on the axis of our scores."""
    (key,) = table.keys
    rows = table.rows
    values = list(rows[key])
    paper = rows["paper"].to_numpy(dtype=float)
    quoted = np.isfinite(paper)
    figure = Figure(figsize=(10.4 if quoted.any() else 6.4, 4.2))
    axes = figure.add_subplot(1, 2 if quoted.any() else 1, 1)
    x = _value_axis(axes, values)
    _draw_values(axes, x, rows["score"], _numeric_axis(values), yerr=_yerr(rows), color="tab:blue",
                 label="ours (95% CI)")
    _finish(figure, axes, key_label(key), SCORE_LABEL, f"Normalized score vs {key}", legend=True)
    if quoted.any():
        paper_axes = figure.add_subplot(1, 2, 2)
        paper_x = _value_axis(paper_axes, values)
        _draw_values(paper_axes, paper_x[quoted], paper[quoted], _numeric_axis(values), color="tab:red",
                     label=PAPER_LABEL)
        _finish(figure, paper_axes, key_label(key), PAPER_AXIS_LABEL, f"{PAPER_LABEL}: its own scale", legend=True)
    return figure


def two_way_figure(table: TwoWayTable) -> Figure:
    """Mean score vs the crossed sweep's first key, one line per value of its second key, with 95% CI
    error bars (cells the sweep did not run, or whose seeds all failed, are left out of their line).
    On a categorical axis the lines are nudged apart so that their error bars do not overlap."""
    figure = Figure(figsize=(7.2, 4.5))
    axes = figure.add_subplot()
    row_values = table.row_values
    x = _value_axis(axes, row_values)
    numeric = _numeric_axis(row_values)
    columns = table.column_values
    for position, value in enumerate(columns):
        line = pd.DataFrame([table.cell(r, value) for r in row_values])
        shown = line["ran"].to_numpy(dtype=bool) & np.isfinite(line["score"].to_numpy(dtype=float))
        offset = 0.0 if numeric else 0.08 * (position - (len(columns) - 1) / 2)
        axes.errorbar(x[shown] + offset, line["score"][shown], yerr=_yerr(line[shown]), marker="o", capsize=4,
                      label=f"{table.column_key}={format_value(value)}")
    if len(columns) <= MAX_LEGEND_ENTRIES:
        axes.legend(title=key_label(table.column_key), fontsize="small")
    _finish(figure, axes, key_label(table.row_key), SCORE_LABEL,
            f"Normalized score vs {table.row_key}, one line per {table.column_key}")
    return figure


def learning_curves_figure(curves: pd.DataFrame) -> Figure:
    """Score vs training step, one line per setting, shaded 95% CI over seeds."""
    figure = Figure(figsize=(7.2, 4.5))
    axes = figure.add_subplot()
    for label, curve in curves.groupby("setting", sort=False):
        line, = axes.plot(curve["step"], curve["score"], marker=".", label=label)
        axes.fill_between(curve["step"], curve["ci_low"], curve["ci_high"], color=line.get_color(), alpha=0.2)
    if curves.empty:
        axes.text(0.5, 0.5, "no successful train evaluations", ha="center", va="center", transform=axes.transAxes)
    elif curves["setting"].nunique() <= MAX_LEGEND_ENTRIES:
        axes.legend(fontsize="small")
    _finish(figure, axes, STEPS_LABEL, SCORE_LABEL, "Learning curves (mean over seeds, 95% CI)")
    return figure


def batch_steps_figure(summaries: pd.DataFrame, reference: dict[str, object]) -> Figure | None:
    """Score vs training steps, one line per batch size (other swept keys at `reference`);
    None unless both vary."""
    batch, steps = CONFIG_PREFIX + "batch_size", CONFIG_PREFIX + "steps"
    if batch not in summaries or steps not in summaries:
        return None
    held = {c: v for c, v in reference.items() if c not in (batch, steps)}
    rows = summaries[[all(same_value(r[c], v) for c, v in held.items()) for _, r in summaries.iterrows()]]
    if rows[batch].nunique() < 2 or rows[steps].nunique() < 2:
        return None
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for size in sorted(rows[batch].unique(), key=sort_key):
        line = rows[rows[batch] == size].sort_values(steps)
        axes.errorbar(line[steps], line["score"], yerr=_yerr(line), marker="o", capsize=4,
                      label=f"batch size {format_value(size)}")
    _finish(figure, axes, STEPS_LABEL, SCORE_LABEL, "Batch size × training steps", legend=True)
    return figure


def quant_size_figure(table: Table) -> Figure | None:
    """Score vs model file size per precision (None when no final row reports a size). The paper's
    numbers stay in the table: its model sizes are not ours."""
    rows = table.rows[np.isfinite(table.rows["size_mib"].to_numpy(dtype=float))]
    if rows.empty:
        return None
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    axes.errorbar(rows["size_mib"], rows["score"], yerr=_yerr(rows), fmt="o", capsize=4, label="ours (95% CI)")
    for record in rows.to_dict("records"):
        name = ", ".join(format_value(record[key]) for key in table.keys)
        axes.annotate(name, (record["size_mib"], record["score"]), textcoords="offset points", xytext=(6, 4))
    _finish(figure, axes, SIZE_LABEL, SCORE_LABEL, "Score vs model size per precision (final evaluation)", legend=True)
    return figure


def task_heatmap_figure(summaries: pd.DataFrame, setting_columns: list[str], tasks: list[str],
                        reference: dict[str, object]) -> Figure:
    """Mean per-task score (last train evaluation, over seeds): tasks × settings."""
    labels = [setting_label(setting_columns, tuple(row), reference)
              for row in summaries[setting_columns].itertuples(index=False)]
    matrix = summaries[[TASK_PREFIX + task for task in tasks]].to_numpy(dtype=float).T  # tasks × settings
    longest_label, longest_task = max(map(len, labels), default=0), max(map(len, tasks), default=0)
    width = 3.0 + 0.07 * longest_task + 0.6 * max(len(labels), 4)  # inches: tick labels + cells
    height = 1.6 + 0.07 * longest_label + 0.3 * max(len(tasks), 4)
    figure = Figure(figsize=(width, height))
    axes = figure.add_subplot()
    image = axes.imshow(matrix if matrix.size else np.full((1, 1), np.nan), aspect="auto", cmap="viridis")
    figure.colorbar(image, ax=axes, label=SCORE_LABEL)
    axes.set_xticks(range(len(labels)), labels, rotation=90)
    axes.set_yticks(range(len(tasks)), tasks)
    if 0 < matrix.size <= MAX_ANNOTATED_CELLS:
        for (task_index, setting_index), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                color = "black" if image.norm(value) > 0.6 else "white"  # readable on viridis' light end
                axes.text(setting_index, task_index, f"{value:.1f}", ha="center", va="center", color=color, fontsize=7)
    if not tasks:
        axes.text(0.5, 0.5, "no per-task scores", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("setting")
    axes.set_ylabel("task")
    axes.set_title("Per-task score (last train evaluation, mean over seeds)")
    figure.tight_layout()
    return figure


def report_figures(tables: list[Table], summaries: pd.DataFrame, curves: pd.DataFrame,
                   reference: dict[str, object], setting_columns: list[str], tasks: list[str],
                   two_way: TwoWayTable | None = None) -> dict[str, Figure]:
    """Every figure the data supports, by file stem, in report order (a crossed sweep's two-way
    plot first)."""
    figures: dict[str, Figure] = {}
    if two_way is not None and (two_way.cells["ran"] & two_way.cells["score"].notna()).any():
        figures[two_way.plot_name] = two_way_figure(two_way)
    for table in tables:
        if table.name == "quant":
            figure = quant_size_figure(table)
            if figure is not None:
                figures["quant_size_vs_score"] = figure
        elif len(table.keys) == 1 and table.name == table.keys[0] and table.rows["score"].notna().any():
            figures[f"score_vs_{table.name}"] = ablation_figure(table)
    batch_steps = batch_steps_figure(summaries, reference)
    if batch_steps is not None:
        figures["batch_size_x_steps"] = batch_steps
    figures["learning_curves"] = learning_curves_figure(curves)
    figures["task_heatmap"] = task_heatmap_figure(summaries, setting_columns, tasks, reference)
    return figures
