"""Build a sweep's report from its result files: tables (Markdown, LaTeX, CSV), plots (PNG),
report.md and a self-contained report.html.

    python analysis/report.py RESULTS_DIR [--format md,latex,csv,html] [--out DIR]
    python -m analysis.report RESULTS_DIR
    python analysis/report.py s3://BUCKET/PATH --out DIR    # a sweep's --out in an object store
    python analysis/report.py RUNS_1 RUNS_2 --out DIR       # sweeps of the same settings, other seeds, pooled
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse  # noqa: E402
import base64  # noqa: E402
import html  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterable, Sequence  # noqa: E402

from analysis.findings import (comparison, endpoint_name, episodes_text, evaluation_noise, headline, learned,  # noqa: E402
                               task_findings, verdicts)
from analysis.load import (CONFIG_PREFIX, RUN_COLUMN, ResultsError, SweepResults, fetch_results, is_uri,  # noqa: E402
                           load_results, pool_results)
from analysis.paired import (SCRATCH_FREE_KEYS, SCRATCH_KEY, paired_table, per_task_versus_scratch,  # noqa: E402
                             start_rows, versus_reference_value, versus_start)
from analysis.paper import PAPER_CITATION, PAPER_LABEL  # noqa: E402
from analysis.plots import report_figures  # noqa: E402
from analysis.render import (csv_text, display, html_table, interval, latex, markdown, number,  # noqa: E402
                             table_latex, table_markdown)
from analysis.stats import N_RESAMPLES  # noqa: E402
from analysis.summary import learning_curves, setting_label, setting_summaries  # noqa: E402
from analysis.tables import Table, build_tables, reference_setting  # noqa: E402
from analysis.trials import endpoint_outcomes, trial_outcomes  # noqa: E402
from analysis.values import format_value  # noqa: E402
from analysis.twoway import (TwoWayTable, two_way_csv, two_way_display, two_way_latex, two_way_markdown,  # noqa: E402
                             two_way_table)

FORMATS = ("md", "latex", "csv", "html")
TABLE_WRITERS = {"md": (".md", table_markdown), "latex": (".tex", table_latex), "csv": (".csv", csv_text)}
TWO_WAY_WRITERS = {"md": (".md", two_way_markdown), "latex": (".tex", two_way_latex), "csv": (".csv", two_way_csv)}
PLOT_DPI = 110
PLOT_CAPTIONS = {
    "learning_curves": "Learning curves",
    "batch_size_x_steps": "Batch size × training steps",
    "task_heatmap": "Per-task scores",
}


class UsageError(ValueError):
    """A bad command line (unknown format, missing argument)."""


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """`"md,latex"` or `("md", "latex")` -> ("md", "latex"); UsageError names an unknown format."""
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise UsageError(f"unknown format {', '.join(unknown) or '(none)'}; choose from {','.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


def build_report(results_dir: str | Path | Sequence[str | Path], formats: str | Iterable[str] = FORMATS,
                 out_dir: str | Path | None = None) -> Path:
    """Analyse `results_dir` and write the report into `out_dir` (default RESULTS_DIR/report).

    report.md and plots/*.png are always written; `formats` picks tables/<name>.md|.tex|.csv and
    report.html. Returns the path of report.md. Raises ResultsError / UsageError on bad input.

    `results_dir` may be an object store URI (s3://BUCKET/PATH, see `load.fetch_results`): its
    result files are read into a temporary directory, and `out_dir` is then required. A list of
    several directories (or URIs) pools their seeds into one report (`load.pool_results`: same
    settings, distinct seeds); `out_dir` is then required too.
    """
    formats = parse_formats(formats)
    sources = [results_dir] if isinstance(results_dir, (str, Path)) else list(results_dir)
    if not sources:
        raise UsageError("no results directory given")
    if out_dir is None and len(sources) > 1:
        raise UsageError(f"pooling {len(sources)} sweeps: give --out DIR for the pooled report")
    if out_dir is None and is_uri(sources[0]):
        raise UsageError(f"{str(sources[0]).partition('?')[0]} is in an object store: give --out DIR for the report")
    with tempfile.TemporaryDirectory(prefix="report-") as temp:
        parts = [_read_sweep(source, Path(temp) / str(i)) for i, source in enumerate(sources)]
        results = pool_results(parts, [str(source).partition("?")[0].rstrip("/") for source in sources])
        return _write_report(results, formats, Path(out_dir) if out_dir is not None else results.directory / "report")


def _read_sweep(source: str | Path, temp: Path) -> SweepResults:
    """One sweep's results; an object store's are copied into `temp` first and named as given."""
    if not is_uri(source):
        return load_results(source)
    where = str(source).partition("?")[0].rstrip("/")
    copy = temp / (where.rsplit("/", 1)[-1] or "results")
    try:
        return load_results(fetch_results(str(source), copy))
    except ResultsError as exc:  # named as the user gave it, not as the temporary copy
        raise ResultsError(str(exc).replace(str(copy), where)) from None


def _write_report(results: SweepResults, formats: tuple[str, ...], out: Path) -> Path:
    trials = trial_outcomes(results)
    summaries = setting_summaries(trials, results.setting_columns, results.task_columns)
    reference = reference_setting(results, trials)
    tables = build_tables(results, trials, summaries, reference)
    two_way = two_way_table(results, summaries, reference)
    curves = learning_curves(results, trials, reference)
    figures = report_figures(tables, summaries, curves, reference, results.setting_columns, list(results.tasks),
                             two_way=two_way)
    images = {name: _png(figure) for name, figure in figures.items()}

    _clear_previous(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for table in tables:
        for fmt in formats:
            if fmt in TABLE_WRITERS:
                suffix, render = TABLE_WRITERS[fmt]
                (out / "tables" / f"{table.name}{suffix}").write_text(render(table), encoding="utf-8")
    for fmt in formats if two_way is not None else ():
        if fmt in TWO_WAY_WRITERS:
            suffix, render = TWO_WAY_WRITERS[fmt]
            (out / "tables" / f"{two_way.name}{suffix}").write_text(render(two_way), encoding="utf-8")
    for name, png in images.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    endpoints = endpoint_outcomes(results, trials)
    task_rows = per_task_versus_scratch(endpoints, results.setting_columns, reference, results.task_columns)
    for fmt in formats if _has_pairs(task_rows) else ():
        if fmt in TABLE_WRITERS:
            suffix = TABLE_WRITERS[fmt][0]
            (out / "tables" / f"{PER_TASK_NAME}{suffix}").write_text(_per_task_text(task_rows, fmt), encoding="utf-8")

    blocks = report_blocks(results, trials, tables, images, reference, endpoints, task_rows, two_way)
    (out / "report.md").write_text(blocks_markdown(blocks), encoding="utf-8")
    if "html" in formats:
        (out / "report.html").write_text(blocks_html(blocks, images, report_title(results)), encoding="utf-8")
    return out / "report.md"


def _pooled_part(part: dict, teacher: object) -> str:
    """One pooled sweep in the facts: where, its seeds, when, and its teachers where they are not
    the ones the report's teacher line names (teacher files are not compared by content)."""
    seeds = ", ".join(format_value(seed) for seed in part["seeds"]) or "none"
    created = f", created {part['created']}" if part.get("created") else ""
    other = part.get("teacher") not in (None, teacher)
    teachers = f", teacher {json.dumps(part['teacher'], sort_keys=True)}" if other else ""
    return f"{part['directory']} (seeds {seeds}{created}{teachers})"


def _episodes(n: object) -> str:
    return f"{format_value(n)} episode{'' if format_value(n) == '1' else 's'} per task"


def protocol_fact(base: dict, swept: Iterable[str]) -> str | None:
    """The settings every trial of the sweep shares, from sweep.json's base_config (swept keys left
    out, keys the sweep did not record skipped): student, budget, optimizer and evaluation, so that a
    reader knows what the scores measure and can repeat them."""
    base = {k: v for k, v in (base or {}).items() if k not in set(swept)}
    training, evaluation = [], []
    if base.get("student_size") is not None:
        training.append(f"student of the official size {format_value(base['student_size'])}")
    elif base.get("student_dims"):
        training.append("student " + ", ".join(f"{k} {format_value(v)}" for k, v in sorted(base["student_dims"].items())))
    budget = [text.format(format_value(base[key])) for key, text in
              (("steps", "{} updates"), ("batch_size", "batch {}"), ("lr", "lr {}")) if key in base]
    if budget:
        training.append(", ".join(budget))
    if base.get("train"):
        training.append("train " + json.dumps(base["train"], sort_keys=True))
    if "eval_every" in base:
        during = _episodes(base["eval_episodes"]) if "eval_episodes" in base else "episodes unknown"
        start = ", step 0 included" if base.get("eval_at_start") else ""
        evaluation.append(f"every {format_value(base['eval_every'])} updates ({during}{start})")
    final = base.get("final_eval_episodes")
    if final is not None:
        evaluation.append(f"final {_episodes(final)}")
    if base.get("eval_max_steps") is not None:
        evaluation.append(f"{format_value(base['eval_max_steps'])}-step episodes")
    if "eval_planner" in base:
        planner = json.dumps(base["eval_planner"], sort_keys=True) if base["eval_planner"] else "the official one"
        evaluation.append(("planner " if base.get("eval_plan", True) else "no planning (policy prior); planner ") + planner)
    parts = (["training: " + "; ".join(training)] if training else []) + \
        (["evaluation: " + "; ".join(evaluation)] if evaluation else [])
    return " | ".join(parts) or None


def students_fact(directory: Path, base: dict, swept: Iterable[str]) -> str | None:
    """Where a sweep's trained students are (OUT/students/, docs/results-format.md) and the command
    that re-evaluates one as its final row was evaluated, from sweep.json's base_config; None when
    `directory` holds no students (an older sweep, or a copy of its result files alone)."""
    students = directory / "students"
    if not students.is_dir():
        return None
    where = f"`{students}/<trial_id>/seed-<seed>/<quant>.pt`"  # code spans: Markdown would take <seed> for a tag
    swept = set(swept)
    base = {k: v for k, v in (base or {}).items() if k not in swept}
    episodes = base.get("final_eval_episodes") or base.get("eval_episodes")
    if episodes is None:  # a sweep.json without the evaluation settings: the files, but no command
        return f"trained students: {where}"
    # the quant grid sweeps the trial field quant_modes under the key "quant"
    quant = base["quant_modes"][0] if base.get("quant_modes") and "quant" not in swept else "<quant>"
    command = [f"python -m agent.evaluate {students}/<trial_id>/seed-<seed>/{quant}.pt --seed <seed>",
               f"--episodes {format_value(episodes)}"]
    if base.get("eval_max_steps") is not None:
        command.append(f"--max-steps {format_value(base['eval_max_steps'])}")
    command += [f"--planner {k}={json.dumps(v)}" for k, v in sorted((base.get("eval_planner") or {}).items())]
    if base.get("eval_plan") is False:
        command.append("--policy")
    return f"trained students: {where}; one re-evaluated as its final row was: `{' '.join(command)}`"


def report_title(results: SweepResults) -> str:
    pooled = results.meta.get("pooled")
    suffix = f" ({len(pooled)} sweeps pooled)" if pooled else ""
    return f"Sweep report: {results.meta.get('name') or results.directory.name}{suffix}"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def _clear_previous(out: Path) -> None:
    """Remove what an earlier run wrote here, so no stale table or plot survives a rerun."""
    for pattern in ("tables/*.md", "tables/*.tex", "tables/*.csv", "plots/*.png", "report.html"):
        for path in out.glob(pattern):
            path.unlink()


# A report is a list of blocks, rendered once as Markdown and once as HTML:
# ("h1"|"h2"|"h3"|"p", text), ("ul", [text]), ("table", headers, rows, n_labels), ("img", plot name, caption).

def report_blocks(results: SweepResults, trials, tables: list[Table], images: dict[str, bytes],
                  reference: dict[str, object], endpoints, task_rows, two_way: TwoWayTable | None = None) -> list[tuple]:
    """The report's content, in order: headline, facts, paired differences against scratch and the
    evaluation noise, how to read the tables, tables (a crossed sweep's two-way table first) and
    plots, failed runs."""
    meta = results.meta
    n_failed = int(trials["failed"].sum())
    error_rows = int((results.evals["status"] == "error").sum())
    task_set, preset = meta.get("task_set", "unknown"), meta.get("preset", "unknown")
    facts = [
        f"grid: {meta.get('grid', 'unknown')}; swept: {', '.join(results.swept) or 'nothing'}",
        f"preset: {preset}; task set: {task_set} ({len(results.tasks)} tasks)",
        f"trials: {trials['trial_id'].nunique()}; runs (trial × seed): {len(trials)} ({n_failed} failed); "
        f"evaluations: {len(results.evals)} rows ({error_rows} error rows)",
    ]
    if "seeds" in meta:
        facts.append(f"seeds per setting (planned): {meta['seeds']}")
    protocol = protocol_fact(meta.get("base_config") or {}, results.swept)
    if protocol:
        facts.append(protocol)
    students = None if meta.get("pooled") else students_fact(results.directory, meta.get("base_config") or {},
                                                             results.swept)
    if students:
        facts.append(students)
    if isinstance(meta.get("teacher"), dict):
        facts.append("teacher: " + ", ".join(f"{k} {v if isinstance(v, str) else json.dumps(v, sort_keys=True)}"
                                             for k, v in sorted(meta["teacher"].items())))
    if meta.get("pooled"):
        facts.append("pooled from: " + "; ".join(_pooled_part(part, meta.get("teacher")) for part in meta["pooled"]))
    elif meta.get("created"):
        facts.append(f"sweep created: {meta['created']}")
    if not meta:
        facts.append("sweep.json was not found: swept keys were inferred from the trial configs")
    endpoint = endpoint_name(endpoints)
    paired = paired_table(endpoints, results.setting_columns, reference)
    between = versus_reference_values(endpoints, results.setting_columns, reference)
    # a grid over teacher size, target or batch size is about its own key: those comparisons lead
    lead = [comparison(row) for rows in between.values() for row in rows.to_dict("records")]
    summary = " ".join(lead + [headline(paired, reference, endpoint) or ""]).strip()
    blocks = [("h1", report_title(results))]
    blocks += [("h2", "Headline"), ("p", summary)] if summary else []
    blocks += [("ul", facts)]
    blocks += learning_blocks(results.evals, endpoints, results.setting_columns, reference, endpoint)
    blocks += paired_blocks(paired, endpoints, results.setting_columns, endpoint)
    blocks += per_task_blocks(task_rows, endpoint)
    blocks += between_values_blocks(between, reference, endpoint)
    blocks += [("h2", "How to read the tables"), ("ul", [
        "score: normalized score (mean over tasks of return / 10), averaged over seeds, of each run's "
        "last train-phase evaluation; in the quantization table, of the final evaluation at that precision.",
        f"95% CI: percentile bootstrap over seeds ({N_RESAMPLES} resamples, fixed seed); – with fewer than "
        "2 seeds. With 3–5 seeds such intervals cover the true mean less often than 95%.",
        "IQM: interquartile mean over tasks × seeds (25% trimmed at each end).",
        f"Δ vs scratch: the mean over seeds of (this setting's {endpoint} score − its scratch setting's), "
        "paired by seed over the seeds both ran (n pairs), with its 95% percentile-bootstrap CI (– below 2 pairs); "
        "the scratch setting has d_coef = 0 and the same other settings (– when the sweep ran none). In the "
        "quantization table, each precision's score minus the scratch setting's fp32 score.",
        "failed: runs that reported an error or a non-finite score; they are listed at the end and left "
        "out of every other column.",
        f"{PAPER_LABEL}: the number reported by {PAPER_CITATION} for the same setting, on all 30 MT30 tasks "
        f"with a 1M-parameter student. This sweep ran task set {task_set} with preset {preset}, on another "
        "scale: compare the direction of effects, not the numbers. The plots draw the paper's numbers only in "
        "their own panel, never on the axis of our scores.",
    ])]
    if len(results.setting_keys) > 1:
        held = setting_label(list(reference), tuple(reference.values()))
        blocks.append(("p", f"In a table of one swept key, the other swept keys are held at: {held}."))

    blocks.append(("h2", "Tables"))
    if two_way is not None:
        blocks += [("h3", two_way.title), ("table", *two_way_display(two_way))]
        blocks += [("p", note) for note in two_way.notes]
        if two_way.plot_name in images:
            blocks.append(("img", two_way.plot_name, f"Normalized score vs {two_way.row_key}, one line per "
                                                     f"{two_way.column_key}"))
    for table in tables:
        blocks += [("h3", table.title), ("table", *display(table))]
        plot = "quant_size_vs_score" if table.name == "quant" else f"score_vs_{table.name}"
        if plot in images:
            blocks.append(("img", plot, table.title))
    for plot, caption in PLOT_CAPTIONS.items():
        if plot in images:
            blocks += [("h2", caption), ("img", plot, caption)]

    blocks.append(("h2", "Failed runs"))
    failed = trials[trials["failed"]]
    if failed.empty:
        blocks.append(("p", "None."))
    else:
        columns = results.setting_columns
        rows = [[row[RUN_COLUMN], setting_label(columns, tuple(row[c] for c in columns)), str(row["error"])]
                for _, row in failed.iterrows()]
        blocks.append(("table", ["run", "setting", "reason"], rows, 3))
    return blocks


def learning_blocks(evals, endpoints, setting_columns: list[str], reference: dict[str, object],
                    endpoint: str) -> list[tuple]:
    """Whether the students learn: each setting's endpoint against its own students untrained
    (`versus_start`, from the step-0 rows of trials run with eval_at_start); nothing without them."""
    rows = versus_start(evals, endpoints, setting_columns, reference)
    if rows.empty:
        return []
    intro = (f"Each setting's {endpoint} score against the same students before any update (their step-0 "
             f"evaluation), seed by seed; 95% percentile-bootstrap CIs of the mean difference and of the ratio of "
             f"the means, resampling seeds ({N_RESAMPLES} resamples, fixed seed). The step-0 evaluation has "
             f"{episodes_text(start_rows(evals))} (the learning curve's), and its noise is in the CI.")
    return [("h2", "Learning: trained against untrained (paired by seed)"), ("p", intro),
            ("ul", [learned(row) for row in rows.to_dict("records")])]


def paired_blocks(paired, endpoints, setting_columns: list[str], endpoint: str) -> list[tuple]:
    """The section on paired differences against scratch (`paired.paired_table`): what is compared,
    one verdict per distilled setting, then the evaluation noise."""
    free = " and ".join(SCRATCH_FREE_KEYS)
    intro = (f"Each setting's {endpoint} score minus that of its scratch setting (d_coef = 0, the same other "
             f"settings; {free} do not change a scratch run), seed by seed over the seeds both ran; 95% "
             f"percentile-bootstrap CI of the mean difference ({N_RESAMPLES} resamples, fixed seed).")
    if endpoint != "final fp32":
        intro += " These result files have no final fp32 evaluation, so each run's last train-phase one is used."
    if paired.empty:
        sentences = ["No run has an evaluation to compare."]
    elif not paired["is_scratch"].any():
        sentences = ["This sweep has no scratch setting (d_coef = 0): no setting is compared with scratch."]
    else:
        sentences = verdicts(paired) or ["Only scratch settings ran: nothing to compare."]
    return [("h2", "Distillation vs scratch (paired by seed)"), ("p", intro), ("ul", sentences),
            ("p", evaluation_noise(endpoints, setting_columns, endpoint))]


def per_task_blocks(rows, endpoint: str) -> list[tuple]:
    """Distillation vs scratch task by task, from a `per_task_versus_scratch` frame: one table (a
    row per distilled setting, a column per task) and one sentence on the CIs that exclude 0;
    nothing when no distilled setting has a scratch setting or the rows carry no task scores."""
    if not _has_pairs(rows):
        return []
    intro = (f"Each distilled setting's {endpoint} score on one task (return / 10) minus its scratch setting's on the "
             "same task, seed by seed; mean and 95% percentile-bootstrap CI. Effects of opposite sign on different "
             "tasks cancel in the mean over tasks.")
    return [("h3", "Per task"), ("p", intro), ("table", *_per_task_display(rows)), ("p", task_findings(rows))]


PER_TASK_NAME = "per_task_vs_scratch"  # file stem under tables/


def _has_pairs(task_rows) -> bool:
    return not task_rows.empty and bool((task_rows["n_pairs"] > 0).any())


def _per_task_display(task_rows) -> tuple[list[str], list[list[str]], int]:
    """A `per_task_versus_scratch` frame as a table: a row per distilled setting, a column per
    task, cells `+1.23 [0.45, 2.01]`; header, rows and the one label column."""
    tasks, labels = list(dict.fromkeys(task_rows["task"])), list(dict.fromkeys(task_rows["label"]))
    cells = {(row["label"], row["task"]): f"{number(row['delta'], signed=True)} {interval(row['delta_ci_low'], row['delta_ci_high'])}"
             for row in task_rows.to_dict("records")}
    return ["setting", *tasks], [[label, *(cells[label, task] for task in tasks)] for label in labels], 1


def _per_task_text(task_rows, fmt: str) -> str:
    """The per-task table as md (as in report.md), tex, or csv (long: one line per setting and
    task, numbers at 4 decimals, empty = unknown)."""
    if fmt == "csv":
        frame = task_rows[["label", "task", "delta", "delta_ci_low", "delta_ci_high", "n_pairs"]]
        return frame.rename(columns={"label": "setting"}).to_csv(index=False, float_format="%.4f", lineterminator="\n",
                                                                na_rep="")
    if fmt == "latex":
        return latex(*_per_task_display(task_rows), caption="Distilled minus scratch, per task (paired by seed)",
                     label=PER_TASK_NAME)
    return markdown(*_per_task_display(task_rows))


def versus_reference_values(endpoints, setting_columns: list[str], reference: dict[str, object]) -> dict:
    """{column: `versus_reference_value` rows} for each swept key but d_coef (teacher size, target,
    batch size...) that has a distilled setting with a partner at the key's reference value."""
    compared = {}
    for column in setting_columns:
        if column.removeprefix(CONFIG_PREFIX) == SCRATCH_KEY:
            continue
        rows = versus_reference_value(endpoints, setting_columns, reference, column)
        if not rows.empty:
            compared[column] = rows
    return compared


def between_values_blocks(between: dict, reference: dict[str, object], endpoint: str) -> list[tuple]:
    """For each key of `versus_reference_values`: every distilled setting minus the same setting
    at the key's reference value, paired by seed."""
    blocks = []
    for column, rows in between.items():
        key, held = column.removeprefix(CONFIG_PREFIX), format_value(reference[column])
        intro = (f"Each distilled setting's {endpoint} score minus that of the same setting at {key}={held} "
                 f"(the value the other tables hold it at), seed by seed over the seeds both ran; 95% "
                 f"percentile-bootstrap CI of the mean difference ({N_RESAMPLES} resamples, fixed seed).")
        blocks += [("h2", f"{key}: against {key}={held} (paired by seed)"), ("p", intro),
                   ("ul", [comparison(row) for row in rows.to_dict("records")])]
    return blocks


def blocks_markdown(blocks: list[tuple]) -> str:
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + content[0] + "\n")
        elif kind == "p":
            parts.append(content[0] + "\n")
        elif kind == "ul":
            parts.append("".join(f"- {item}\n" for item in content[0]))
        elif kind == "table":
            parts.append(markdown(*content))
        elif kind == "img":
            parts.append(f"![{content[1]}](plots/{content[0]}.png)\n")
    return "\n".join(parts)


def blocks_html(blocks: list[tuple], images: dict[str, bytes], title: str) -> str:
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            parts.append(html_table(*content))
        elif kind == "img":
            data = base64.b64encode(images[content[0]]).decode("ascii")
            parts.append(f'<img alt="{html.escape(content[1])}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}"
             "td.num,th.num{text-align:right}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{style}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", nargs="+",
                        help="a sweep's --out directory (sweep.json, results.jsonl), or its object store URI "
                             "(s3://BUCKET/PATH; then --out is required); several: sweeps of the same settings "
                             "with distinct seeds, pooled into one report (then --out is required)")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help=f"comma-separated subset of {','.join(FORMATS)} (default: all); "
                             "report.md and the plots are always written")
    parser.add_argument("--out", default=None, help="where to write the report (default: RESULTS_DIR/report)")
    try:
        args = parser.parse_args(argv)
        report = build_report(args.results_dir, args.format, args.out)
    except (UsageError, ResultsError) as exc:
        print(f"report.py: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"report.py: error: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
