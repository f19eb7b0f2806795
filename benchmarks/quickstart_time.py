"""The README's main command on a fresh clone, timed against its goal of 20 minutes on 2 cores.

Clones this repository's HEAD into a work directory, makes a fresh virtualenv there and runs
`bash scripts/quickstart.sh` (install, first-use data, the quick d_coef sweep, the report) with
every cache the project writes (data and teacher targets, native kernels, inductor) inside the work
directory, and Ray's temporary files in a short-named temporary directory of their own (socket paths
are limited to 107 bytes). pip's cache is a new one there too, unless
`--pip-cache` lets pip use its usual one (a machine that has installed the packages before; pip
then reads and adds to it). Nothing else outside these two directories is written.

    install   seconds until quickstart.sh's line "quickstart: installed in ..." (venv creation included)
    total     seconds of the whole command

The last output line is one JSON object with both, whether the total is within the goal, and
the report's learning and distillation sentences. The work directory is removed afterwards unless --keep.

    python benchmarks/quickstart_time.py [--pip-cache] [--keep] [--work DIR] [-- ARGS for sweeps/run.py]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLED_LINE = "quickstart: installed in "  # what scripts/quickstart.sh prints between install and sweep
GOAL_S = 20 * 60  # issue 13: install, first-use data, sweep and report in at most 20 minutes on 2 cores


def report_sentences(report: Path) -> list[str]:
    """The bullet lines of the report's learning and distillation-vs-scratch sections."""
    if not report.is_file():
        return []
    wanted, keep = [], False
    for line in report.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            keep = line.startswith(("## Learning:", "## Distillation vs scratch"))
        elif keep and line.startswith("- "):
            wanted.append(line[2:])
    return wanted


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (clone, venv, sweep output)")
    parser.add_argument("--pip-cache", action="store_true", help="let pip use its usual cache")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="quickstart-time-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    clone, venv, out = work / "repo", work / "venv", work / "sweep"
    # Ray's sockets live under its temporary directory, and a Unix socket path has at most 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="qs-ray-", dir="/tmp" if Path("/tmp").is_dir() else None))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               "VIRTUAL_ENV": str(venv), "DISTILL_CACHE": str(work / "cache"),
               "DISTILL_NATIVE_CACHE": str(work / "native"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
               "RAY_TMPDIR": str(ray_tmp)}
        if not args.pip_cache:
            env["PIP_CACHE_DIR"] = str(work / "pip-cache")
        env.pop("PYTHONHOME", None)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        installed_at = None
        with subprocess.Popen(["bash", "scripts/quickstart.sh", "--out", str(out), *extra], cwd=clone, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                if installed_at is None and line.startswith(INSTALLED_LINE):
                    installed_at = time.perf_counter()
                print(line, end="", flush=True)
        total = time.perf_counter() - started
        result = {"returncode": proc.returncode, "install_s": None if installed_at is None else round(installed_at - started, 1),
                  "total_s": round(total, 1), "goal_s": GOAL_S, "within_goal": total <= GOAL_S,
                  "pip_cache": "usual" if args.pip_cache else "new", "cpus": os.cpu_count(),
                  "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip(),
                  "report": report_sentences(out / "report" / "report.md")}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
