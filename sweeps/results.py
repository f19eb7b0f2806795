"""Result files of a sweep (docs/results-format.md): sweep.json and results.jsonl, written
atomically; rows of earlier runs of the same sweep are kept (a resumed sweep only adds)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

RESULTS_FILE = "results.jsonl"
SWEEP_FILE = "sweep.json"
STUDENTS_DIR = "students"  # OUT/students/<trial_id>/, and students/ in a trial's last checkpoint


def student_file(seed: int | str, quant: str) -> str:
    """Where the trained student of member `seed` at precision `quant` is, relative to its trial's
    students directory (OUT/students/<trial_id>/): `seed-<seed>/<quant>.pt`."""
    return f"seed-{seed}/{quant}.pt"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["trial_id"], (row.get("config") or {}).get("seed"), row["phase"], row["quant"], row["step"], row["status"])


def merge_rows(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Union of old and new rows, one per (trial, member seed, phase, precision, step, status); old rows win."""
    merged: dict[tuple, dict[str, Any]] = {}
    for row in list(old) + list(new):
        merged.setdefault(_row_key(row), row)
    return sorted(merged.values(), key=lambda r: (r["trial_id"], r["phase"] != "train", r["step"], r["quant"],
                                                  (r.get("config") or {}).get("seed") or 0))


def write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out / RESULTS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_sweep_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(out / SWEEP_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _trial_id(result) -> str:
    """Ray's trial id (as the trial itself reports it), from the metrics or the trial directory name."""
    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    match = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", result.path.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else result.path.rstrip("/").rsplit("/", 1)[-1]


def _reported_rows(values: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of a trial's reports: each report carries a JSON list of rows (one per member)."""
    rows: list[dict[str, Any]] = []
    for text in values:
        value = json.loads(text)
        rows += value if isinstance(value, list) else [value]
    return rows


def rows_from_result_grid(grid) -> list[dict[str, Any]]:
    """Every reported row of every trial, plus one error row per failed trial."""
    rows: list[dict[str, Any]] = []
    for result in grid:
        df = result.metrics_dataframe
        reported = [] if df is None or "row_json" not in df else _reported_rows(df["row_json"].dropna())
        rows += reported
        if result.error is not None and not any(r["status"] == "error" for r in reported):
            config = dict(result.config.get("trial", {}))
            config.update({k: v for k, v in result.config.items() if k != "trial"})
            message = str(result.error).strip().splitlines()
            first = int(config.get("seed") or 1)
            for seed in range(first, first + int(config.get("num_seeds") or 1)):  # one error row per member
                rows.append({"trial_id": _trial_id(result), "status": "error",
                             "config": {**{k: config.get(k) for k in ("d_coef", "batch_size", "steps", "teacher_size",
                                                                      "target", "ablation", "lr")}, "seed": seed},
                             "step": reported[-1]["step"] if reported else 0, "phase": "train", "quant": "fp32",
                             "score": None, "task_scores": None, "size_mib": None,
                             "episodes": config.get("eval_episodes"),
                             "error": (message[-1] if message else type(result.error).__name__)[:300]})
    return rows


class RowStream:
    """Writes every reported row to OUT/results.jsonl as it arrives (on the driver, atomically,
    merged with the rows already there: a resumed sweep adds, a killed driver loses nothing
    reported). `add(rows)` takes one report's rows; `from ray.tune` glue calls it per result."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.rows = read_rows(self.out)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            self.rows = merge_rows(self.rows, rows)
            write_rows(self.out, self.rows)

    def add_result(self, result: dict[str, Any]) -> None:
        """One Tune result (its `row_json` carries the report's rows)."""
        text = result.get("row_json")
        if text:
            self.add(_reported_rows([text]))
