"""Stage bookkeeping for resumable recipes: one JSON record per finished stage.

A stage is done when `<work>/stages/<name>.json` exists and its `settings` equal the settings it
would run with now; records are written atomically after the stage's outputs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class StageRecord:
    """What a finished stage did: the command that re-runs it, its settings, wall time and results."""

    name: str
    command: str
    settings: dict[str, Any]
    wall_s: float
    results: dict[str, Any] = field(default_factory=dict)
    finished_utc: str = ""


class StageLog:
    """Finished-stage records under `work/stages/`."""

    def __init__(self, work: Path):
        self.dir = Path(work) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, name: str) -> Path:
        return self.dir / f"{name.replace(':', '-')}.json"

    def get(self, name: str, settings: dict[str, Any]) -> StageRecord | None:
        """The record of `name` if it finished with exactly `settings` (JSON-normalised), else None."""
        path = self._file(name)
        if not path.exists():
            return None
        record = StageRecord(**json.loads(path.read_text()))
        return record if record.settings == json.loads(json.dumps(settings)) else None

    def put(self, record: StageRecord) -> None:
        """Write `record` (stamped now unless it carries its own finish time)."""
        record.finished_utc = record.finished_utc or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path = self._file(record.name)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record.__dict__, indent=1) + "\n")
        tmp.replace(path)

    def run(self, name: str, command: str, settings: dict[str, Any], body: Callable[[], dict[str, Any]],
            log: Callable[[str], None] = print) -> StageRecord:
        """Return the stage's record, running `body` (-> results) first unless it already finished."""
        done = self.get(name, settings)
        if done is not None:
            log(f"== {name}: done earlier ({done.wall_s:.0f}s), skipping")
            return done
        log(f"== {name}: running")
        started = time.perf_counter()
        results = body()
        record = StageRecord(name, command, json.loads(json.dumps(settings)), time.perf_counter() - started, results)
        self.put(record)
        log(f"== {name}: finished in {record.wall_s:.0f}s")
        return record


def current_command() -> str:
    """The command line of this process, as `python -m module args` when run with -m."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).parts[-2:] == ("mt_mini", "__main__.py"):
        argv[0] = "-m agent.mt_mini"
    return " ".join(["python", *argv])
