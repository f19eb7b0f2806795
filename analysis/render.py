"""Tables as text: Markdown, LaTeX, HTML and CSV, with fixed number formatting (same input, same bytes)."""
from __future__ import annotations

import html
import math

from analysis.paper import PAPER_LABEL
from analysis.tables import Table
from analysis.values import format_value

DASH = "–"  # printed for a number we do not have (CI of one seed, no scratch baseline, no paper number)
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  DASH: "--", "Δ": r"$\Delta$"}


def number(value: float, signed: bool = False) -> str:
    """Two decimals (the paper's precision); `DASH` for NaN."""
    if value is None or math.isnan(value):
        return DASH
    value = round(value, 2) + 0.0  # no "-0.00"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def interval(low: float, high: float) -> str:
    """`[low, high]` at two decimals; `DASH` when either bound is unknown (NaN)."""
    if math.isnan(low) or math.isnan(high):
        return DASH
    return f"[{number(low)}, {number(high)}]"


def display(table: Table) -> tuple[list[str], list[list[str]], int]:
    """Header, formatted rows, and how many leading columns are row labels (left-aligned)."""
    labels = list(table.keys) or ["setting"]
    headers = [*labels, "score", "95% CI", "IQM", "Δ vs scratch", "Δ 95% CI", "n pairs", PAPER_LABEL]
    headers += ["size (MiB)"] if table.has_size else []
    headers += ["n seeds", "failed"]
    rows = []
    for record in table.rows.to_dict("records"):
        cells = [format_value(record[key]) for key in table.keys] or ["all trials"]
        cells += [number(record["score"]), interval(record["ci_low"], record["ci_high"]), number(record["iqm"]),
                  number(record["delta_vs_scratch"], signed=True),
                  interval(record["delta_ci_low"], record["delta_ci_high"]), str(int(record["n_pairs"])),
                  number(record["paper"])]
        cells += [number(record["size_mib"])] if table.has_size else []
        cells += [str(int(record["n_seeds"])), str(int(record["failed"]))]
        rows.append(cells)
    return headers, rows, len(labels)


def markdown(headers: list[str], rows: list[list[str]], n_labels: int = 1) -> str:
    """A pipe table; label columns left-aligned, the rest right-aligned."""
    def line(cells):
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"
    rule = ["---" if i < n_labels else "---:" for i in range(len(headers))]
    return "\n".join([line(headers), line(rule), *(line(row) for row in rows)]) + "\n"


def latex(headers: list[str], rows: list[list[str]], n_labels: int, caption: str, label: str) -> str:
    """A booktabs `table` environment."""
    def line(cells):
        return " & ".join(latex_escape(cell) for cell in cells) + r" \\"
    spec = "l" * n_labels + "r" * (len(headers) - n_labels)
    return "\n".join([
        r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", rf"\label{{tab:{label}}}",
        rf"\begin{{tabular}}{{{spec}}}", r"\toprule", line(headers), r"\midrule", *(line(row) for row in rows),
        r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def html_table(headers: list[str], rows: list[list[str]], n_labels: int = 1) -> str:
    def line(tag, cells):
        attrs = ["" if i < n_labels else ' class="num"' for i in range(len(cells))]
        return "<tr>" + "".join(f"<{tag}{a}>{html.escape(c)}</{tag}>" for a, c in zip(attrs, cells)) + "</tr>"
    body = "\n".join(line("td", row) for row in rows)
    return f"<table>\n<thead>{line('th', headers)}</thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"


def csv_text(table: Table) -> str:
    """The table's numbers at 4 decimals (empty = unknown), row labels as printed in the other formats."""
    frame = table.rows.copy()
    for key in table.keys:
        frame[key] = frame[key].map(format_value)
    return frame.to_csv(index=False, float_format="%.4f", lineterminator="\n", na_rep="")


def table_markdown(table: Table) -> str:
    headers, rows, n_labels = display(table)
    return markdown(headers, rows, n_labels)


def table_latex(table: Table) -> str:
    headers, rows, n_labels = display(table)
    return latex(headers, rows, n_labels, caption=table.title, label=table.name)

