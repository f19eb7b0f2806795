"""Read one sweep's result files (docs/results-format.md) into one tidy DataFrame, or several
sweeps of the same settings with different seeds, pooled (`pool_results`).

Only `sweep.json` and `results.jsonl` are read, so a copied directory works without Ray.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis.values import format_value, is_missing

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
CONFIG_PREFIX = "config."  # config.d_coef, config.seed, ... (config.quant is the training precision)
TASK_PREFIX = "task:"  # task:walker-walk = that task's return / 10
SEED_KEY = "seed"
# A swept `quant` is the precision of the `final` evaluations (the row's `quant`), not a training
# setting: config.quant is always the default training precision, so it never tells settings apart.
QUANT_KEY = "quant"
STATUSES = ("ok", "error")
PHASES = ("train", "final")
EVAL_COLUMNS = ("line", "trial_id", "status", "phase", "step", "quant", "score", "eval_se", "size_mib", "episodes",
                "error")
# One trained student: a trial, or one member of a population trial (a trial whose rows carry
# several config.seed values, one per member); every per-student statistic groups by it.
RUN_COLUMN = "run"


class ResultsError(ValueError):
    """Result files that cannot be analysed; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class SweepResults:
    """Everything `analysis` knows about one sweep.

    `evals` has one row per evaluation (run × step × phase × precision) with the columns
    EVAL_COLUMNS (`line` = line number in results.jsonl; `eval_se` NaN where a row has none),
    RUN_COLUMN, one `config.<key>` column per config key and one `task:<name>` column per task.
    Error rows are kept, with NaN scores.
    """

    directory: Path
    meta: dict  # sweep.json as written ({} when the file is absent)
    evals: pd.DataFrame
    swept: tuple[str, ...]  # config keys whose values vary across settings (the table rows)
    tasks: tuple[str, ...]  # task names: sweep.json's order, then any others found, sorted

    @property
    def task_columns(self) -> list[str]:
        return [TASK_PREFIX + task for task in self.tasks]

    @property
    def setting_keys(self) -> list[str]:
        """The swept config keys that tell settings apart (trials of one setting differ by seed)."""
        return [key for key in self.swept if key != QUANT_KEY]

    @property
    def setting_columns(self) -> list[str]:
        return [CONFIG_PREFIX + key for key in self.setting_keys]


def load_results(directory: str | Path) -> SweepResults:
    """Read `directory`'s sweep.json (optional) and results.jsonl; raise ResultsError on bad input."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ResultsError(f"{directory}: no such directory")
    results_path = directory / RESULTS_FILE
    if not results_path.is_file():
        raise ResultsError(f"{directory}: no {RESULTS_FILE} (expected a sweep's --out directory)")
    meta = read_sweep_meta(directory / SWEEP_FILE)
    rows = read_evaluations(results_path)
    evals = evaluations_frame(rows, meta.get("tasks") or [])
    tasks = tuple(column[len(TASK_PREFIX):] for column in evals.columns if column.startswith(TASK_PREFIX))
    swept = swept_keys(meta, evals, directory / SWEEP_FILE)
    return SweepResults(directory=directory, meta=meta, evals=evals, swept=swept, tasks=tasks)


# sweep.json base_config keys in which pooled sweeps may differ: which seeds they ran
POOL_FREE_KEYS = (SEED_KEY, "num_seeds")


def pool_results(parts: Sequence[SweepResults], names: Sequence[str] | None = None) -> SweepResults:
    """One SweepResults over sweeps that ran the same settings with different seeds (e.g. a sweep
    repeated with `--set seed=6` to add seeds 6-10 to one that ran 1-5).

    Raises ResultsError, naming both directories, when two sweeps differ in their tasks, swept keys
    or settings (sweep.json's base_config and grids, seeds aside; sweeps without sweep.json are
    compared by swept keys and tasks only; teacher files are compared by their config labels, not
    their contents), or when one setting's seed is in both. Trial ids are prefixed with the sweep's
    directory name where two sweeps share one; `line` keeps the order of the files as given.
    `names` (default: the directories) name the sweeps in messages and in meta["pooled"].
    """
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    names = [str(part.directory) for part in parts] if names is None else list(names)
    first = parts[0]
    for other, name in zip(parts[1:], names[1:]):
        _check_poolable(first, other, f"cannot pool {name} with {names[0]}")
    _check_distinct_seeds(parts, names)
    trial_sets = [set(part.evals["trial_id"].astype(str)) for part in parts]
    shared_ids = len(set().union(*trial_sets)) < sum(len(ids) for ids in trial_sets)
    frames, offset = [], 0
    for part in parts:
        frame = part.evals.drop(columns=[RUN_COLUMN]).assign(line=part.evals["line"] + offset)
        if shared_ids:
            frame["trial_id"] = part.directory.name + "/" + frame["trial_id"].astype(str)
        offset = int(frame["line"].max())
        frames.append(frame)
    evals = pd.concat(frames, ignore_index=True)
    evals.insert(2, RUN_COLUMN, run_ids(evals))
    meta = dict(first.meta)
    meta["pooled"] = [{"directory": name, "created": part.meta.get("created"), "seeds": sorted(_seed_values(part)),
                       "teacher": part.meta.get("teacher")} for part, name in zip(parts, names)]
    for key in ("seeds", "trials"):
        values = [part.meta.get(key) for part in parts]
        if all(isinstance(v, int) for v in values):
            meta[key] = sum(values)
    return SweepResults(directory=first.directory, meta=meta, evals=evals, swept=first.swept, tasks=first.tasks)


def _poolable_config(meta: dict) -> dict | None:
    """What must be equal in sweeps that are pooled: base_config without POOL_FREE_KEYS, grids."""
    if not meta:
        return None
    base = {k: v for k, v in (meta.get("base_config") or {}).items() if k not in POOL_FREE_KEYS}
    return {**{f"base_config.{k}": v for k, v in base.items()}, "grids": meta.get("grids"),
            "task_set": meta.get("task_set")}


def _check_poolable(first: SweepResults, other: SweepResults, where: str) -> None:
    if other.tasks != first.tasks:
        raise ResultsError(f"{where}: their tasks differ ({', '.join(first.tasks)} vs {', '.join(other.tasks)})")
    if other.swept != first.swept:
        raise ResultsError(f"{where}: their swept keys differ ({', '.join(first.swept) or 'none'} vs "
                           f"{', '.join(other.swept) or 'none'})")
    a, b = _poolable_config(first.meta), _poolable_config(other.meta)
    if a is not None and b is not None and a != b:
        key = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[0]
        raise ResultsError(f"{where}: their settings differ in {key} ({json.dumps(a.get(key), sort_keys=True)} vs "
                           f"{json.dumps(b.get(key), sort_keys=True)})")


def _seed_values(part: SweepResults) -> set:
    column = CONFIG_PREFIX + SEED_KEY
    if column not in part.evals.columns:
        return set()
    return {v for v in part.evals[column] if not is_missing(v)}


def _check_distinct_seeds(parts: Sequence[SweepResults], names: Sequence[str]) -> None:
    """No (setting, seed) in two sweeps: pooled seeds must be independent runs."""
    owner: dict[tuple, int] = {}
    seed_column = CONFIG_PREFIX + SEED_KEY
    for index, (part, name) in enumerate(zip(parts, names)):
        if seed_column not in part.evals.columns:
            raise ResultsError(f"cannot pool {name}: its rows carry no config.seed")
        columns = part.setting_columns + [seed_column]
        for values in part.evals[columns].drop_duplicates().itertuples(index=False):
            key = tuple(json.dumps(v, sort_keys=True, default=str) for v in values)
            if key in owner and owner[key] != index:
                setting = ", ".join(f"{c[len(CONFIG_PREFIX):]}={format_value(v)}"
                                    for c, v in zip(part.setting_columns, values)) or "the only setting"
                raise ResultsError(f"cannot pool {name} with {names[owner[key]]}: both ran seed "
                                   f"{format_value(values[-1])} of {setting}; pooled sweeps need distinct seeds "
                                   "(run the later one with --set seed=N)")
            owner[key] = index


def is_uri(results_dir: str | Path) -> bool:
    """True for an object store location (s3://BUCKET/PATH, gs://..., any pyarrow file system URI)."""
    return "://" in str(results_dir)


def fetch_results(uri: str, into: Path) -> Path:
    """Copy sweep.json (when there is one) and results.jsonl of the sweep at `uri` into directory
    `into`, through pyarrow's file systems (an S3-compatible store: the endpoint in the environment,
    AWS_ENDPOINT_URL_S3, or in the URI, ?endpoint_override=HOST:PORT&scheme=http). Returns `into`."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise ResultsError(f"{uri}: reading an object store needs pyarrow (pip install pyarrow)") from None
    base, mark, query = str(uri).partition("?")
    shown = base.rstrip("/")
    into.mkdir(parents=True, exist_ok=True)
    for name, required in ((SWEEP_FILE, False), (RESULTS_FILE, True)):
        try:
            fs, path = pafs.FileSystem.from_uri(f"{shown}/{name}{mark}{query}")
            data = None
            if fs.get_file_info(path).type == pafs.FileType.File:
                with fs.open_input_stream(path) as handle:
                    data = handle.read()
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ResultsError(f"{shown}/{name}: cannot read it ({first})") from None
        if data is not None:
            (into / name).write_bytes(data)
        elif required:
            raise ResultsError(f"{shown}: no {RESULTS_FILE} (expected a sweep's --out)")
    return into


def read_sweep_meta(path: Path) -> dict:
    """sweep.json as a dict; {} when absent (then the swept keys are inferred from the configs)."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    for key in ("swept", "tasks"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ResultsError(f"{path}: '{key}' must be a list of strings")
    return meta


def read_evaluations(path: Path) -> list[dict]:
    """The rows of results.jsonl, each checked against the contract; blank lines are skipped."""
    rows = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                rows.append(_parse_row(text, f"{path}: line {number}") | {"line": number})
    if not rows:
        raise ResultsError(f"{path}: no evaluations (the file is empty)")
    return rows


def _parse_row(text: str, where: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object")
    missing = [key for key in ("trial_id", "status", "config") if key not in row]
    if missing:
        raise ResultsError(f"{where}: missing key(s) {', '.join(missing)}")
    if row["status"] not in STATUSES:
        raise ResultsError(f"{where}: status {row['status']!r} is not one of {', '.join(STATUSES)}")
    if not isinstance(row["config"], dict):
        raise ResultsError(f"{where}: config must be a JSON object")
    if row["status"] == "ok":
        if row.get("phase") not in PHASES:
            raise ResultsError(f"{where}: phase {row.get('phase')!r} is not one of {', '.join(PHASES)}")
        if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise ResultsError(f"{where}: step must be an integer")
        if not isinstance(row.get("score"), (int, float)) or isinstance(row.get("score"), bool):
            raise ResultsError(f"{where}: status 'ok' needs a numeric score")
    task_scores = row.get("task_scores")
    if task_scores is not None and not isinstance(task_scores, dict):
        raise ResultsError(f"{where}: task_scores must be a JSON object")
    return row


def evaluations_frame(rows: list[dict], task_order: list[str]) -> pd.DataFrame:
    """One row per evaluation; a re-written (run, phase, step, precision, status) keeps its last line."""
    config_keys = sorted({key for row in rows for key in row["config"]})
    found_tasks = {task for row in rows for task in (row.get("task_scores") or {})}
    tasks = list(task_order) + sorted(found_tasks - set(task_order))
    records = []
    for row in rows:
        record = {column: row.get(column) for column in EVAL_COLUMNS}
        for key in config_keys:
            record[CONFIG_PREFIX + key] = _scalar(row["config"].get(key))
        task_scores = row.get("task_scores") or {}
        for task in tasks:
            record[TASK_PREFIX + task] = _number(task_scores.get(task))
        record["score"] = _number(record["score"])
        record["size_mib"] = _number(record["size_mib"])
        record["eval_se"] = _number(record["eval_se"])
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame.insert(2, RUN_COLUMN, run_ids(frame))
    frame = frame.drop_duplicates(subset=[RUN_COLUMN, "phase", "step", "quant", "status"], keep="last")
    return frame.sort_values("line", kind="stable").reset_index(drop=True)


def run_ids(frame: pd.DataFrame) -> pd.Series:
    """RUN_COLUMN of each row: its `trial_id`, or `<trial_id> seed=<seed>` when rows of that trial
    carry more than one config.seed (a population trial reports one row per member)."""
    seed_column = CONFIG_PREFIX + SEED_KEY
    if seed_column not in frame.columns:
        return frame["trial_id"].astype(str)
    seeds = frame[seed_column].map(lambda seed: None if is_missing(seed) else format_value(seed))
    members = seeds.groupby(frame["trial_id"]).transform("nunique")
    labelled = frame["trial_id"].astype(str) + " seed=" + seeds.fillna("none")
    return labelled.where(members > 1, frame["trial_id"].astype(str))


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _scalar(value: object) -> object:
    """Config values as comparable scalars: nested lists/objects become their canonical JSON text."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def swept_keys(meta: dict, evals: pd.DataFrame, sweep_path: Path) -> tuple[str, ...]:
    """sweep.json's `swept` (minus the seed), or, without it, the config keys that vary across trials."""
    config_columns = [c for c in evals.columns if c.startswith(CONFIG_PREFIX)]
    if meta.get("swept") is not None:
        keys = [key for key in meta["swept"] if key != SEED_KEY]
        absent = [key for key in keys if CONFIG_PREFIX + key not in config_columns]
        if absent:
            raise ResultsError(f"{sweep_path}: swept key(s) {', '.join(absent)} not in any trial's config")
        return tuple(keys)
    varying = []
    for column in config_columns:
        key = column[len(CONFIG_PREFIX):]
        values = {json.dumps(v, sort_keys=True, default=str) for v in evals[column] if not is_missing(v)}
        if key != SEED_KEY and len(values) > 1:
            varying.append(key)
    return tuple(varying)
