"""The sweep service: one-line refusals of bad input, a smoke sweep end to end with resume, crash
retries from checkpoints, NaN isolation, and a two-node Ray cluster on this machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "sweeps" / "run.py")]


def _run(*args: str, timeout: int = 900, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "disable", "PYTHONPATH": str(REPO), **extra_env}
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "random.pt").write_bytes(os.urandom(2048))
    torch.save({"weights": torch.zeros(3)}, root / "not_tdmpc2.pt")
    (root / "not_a_store").mkdir()
    return root


@pytest.mark.parametrize("args,fragment", [
    (["--grid", "nope"], "unknown grid 'nope'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--set", "warp_factor=9"], "unknown setting 'warp_factor'"),
    (["--set", 'eval_tasks=["walker-fly"]'], "unknown task 'walker-fly'"),
    (["--set", 'eval_tasks=["mw-reach"]'], "Meta-World"),
    (["--set", "d_coef=-0.1"], "d_coef must be >= 0"),
    (["--set", "batch_size=0"], "batch_size must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--teacher", "/no/such/teacher.pt"], "no such file"),
    (["--teacher", "{bad}/random.pt"], "not a readable torch checkpoint"),
    (["--teacher", "{bad}/not_tdmpc2.pt"], "not contain a TD-MPC2 world model"),
    (["--data", "{bad}/not_a_store"], "not_a_store"),
])
def test_bad_input_is_refused_in_one_line(bad_files, tmp_path, args, fragment):
    args = [a.replace("{bad}", str(bad_files)) for a in args]
    result = _run("--preset", "smoke", "--out", str(tmp_path / "out"), *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "ray").exists()  # refused before Ray started


def test_smoke_sweep_writes_results_and_report_then_resumes_without_rerunning(tmp_path):
    out = tmp_path / "smoke"
    result = _run("--grid", "d_coef", "--preset", "smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    train = [r for r in rows if r["phase"] == "train"]
    final = [r for r in rows if r["phase"] == "final"]
    assert sorted({r["config"]["d_coef"] for r in train}) == [0.0, 0.05, 0.1, 0.2, 0.4, 0.45, 0.6, 0.9]
    assert len(train) == 8 * 2 and all(r["status"] == "ok" and r["score"] is not None for r in rows)
    assert {r["quant"] for r in final} == {"fp32", "fp16"}
    assert all(r["size_mib"] > 0 for r in final)
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["grid"] == "d_coef" and meta["swept"] == ["d_coef"] and meta["trials"] == 8
    report = out / "report" / "report.md"
    assert report.exists() and "d_coef" in report.read_text()
    assert str(report) in result.stdout
    trial_dirs = sorted(p.name for p in (out / "ray" / "sweep").iterdir() if p.is_dir())

    again = _run("--grid", "d_coef", "--preset", "smoke", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(out) == rows  # nothing re-ran, nothing lost
    assert sorted(p.name for p in (out / "ray" / "sweep").iterdir() if p.is_dir()) == trial_dirs


def test_killed_trial_is_retried_from_its_checkpoint_and_nan_trial_is_isolated(tmp_path):
    out = tmp_path / "faults"
    result = _run("--grid", "teacher_size", "--preset", "smoke", "--seeds", "3", "--out", str(out),
                  "--set", "fault_kill_at_step=30", "--set", "fault_kill_seed=1",
                  "--set", "fault_nan_at_step=40", "--set", "fault_nan_seed=2", "--set", 'quant_modes=["fp32"]')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    by_seed: dict[int, list[dict]] = {}
    for row in rows:
        by_seed.setdefault(row["config"]["seed"], []).append(row)
    killed = [r for r in by_seed[1] if r["phase"] == "train" and r["step"] == 60]
    assert len(killed) == 2 and all(r["restored_from"] == 30 for r in killed)  # resumed, not restarted
    diverged = [r for r in by_seed[2] if r["status"] == "error"]
    assert len(diverged) == 2 and all("diverged" in r["error"] for r in diverged)
    assert not any(r["phase"] == "final" for r in by_seed[2])
    healthy = [r for r in by_seed[3] if r["phase"] == "final"]
    assert len(healthy) == 2 and all(r["status"] == "ok" for r in healthy)


@pytest.mark.skipif(shutil.which("ray") is None, reason="the ray CLI is not on PATH")
def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path):
    port = "6391"
    # the head enables token authentication (token in ~/.ray/auth_token); joiners must use it too
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "token"}
    start = ["ray", "start", "--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run([*start, "--head", "--port", port, "--include-dashboard", "false"], check=True, env=env,
                   capture_output=True, timeout=180)
    try:
        subprocess.run([*start, "--address", f"127.0.0.1:{port}"], check=True, env=env, capture_output=True, timeout=180)
        out = tmp_path / "cluster"
        result = _run("--grid", "teacher_size", "--preset", "smoke", "--seeds", "2", "--out", str(out),
                      "--address", f"127.0.0.1:{port}", "--set", 'quant_modes=["fp32"]', RAY_AUTH_MODE="token")
        assert result.returncode == 0, result.stderr[-3000:]
        nodes = {r["node_id"] for r in _rows(out)}
        assert len(nodes) == 2
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


def test_optuna_search_with_asha_runs_the_declared_space(tmp_path):
    out = tmp_path / "search"
    result = _run("--search", "optuna", "--num-samples", "3", "--preset", "smoke", "--out", str(out),
                  "--set", 'quant_modes=["fp32"]')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    trials = {r["trial_id"] for r in rows}
    assert len(trials) == 3
    assert all(0.0 <= r["config"]["d_coef"] <= 1.0 and r["config"]["batch_size"] in (128, 256, 512, 1024) for r in rows)
    assert len({r["config"]["d_coef"] for r in rows}) == 3  # sampled, not the grid
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["grid"] == "search" and meta["swept"] == ["d_coef", "batch_size", "lr"]
