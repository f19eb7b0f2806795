"""benchmarks/: ratios only against what the same run measures; a figure from elsewhere may be
printed, labelled with its source, machine and date, never divided by; the last line is one JSON object."""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _fixed_figures(tree: ast.Module) -> set[str]:
    """Module-level names bound to numbers written as literals (alone, or inside a dict/list/tuple):
    figures typed in, as opposed to units (2**20) or values measured at run time."""
    def literal_numbers(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
        if isinstance(node, ast.Dict):
            return any(v is not None and literal_numbers(v) for v in node.values)
        if isinstance(node, (ast.List, ast.Tuple)):
            return any(literal_numbers(e) for e in node.elts)
        return False

    names = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and literal_numbers(stmt.value):
            names |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None and literal_numbers(stmt.value):
            names |= {stmt.target.id} if isinstance(stmt.target, ast.Name) else set()
    return names


def _divisions_by(tree: ast.Module, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Div, ast.FloorDiv)):
            used = {n.id for side in (node.left, node.right) for n in ast.walk(side) if isinstance(n, ast.Name)}
            found += [f"line {node.lineno}: {ast.unparse(node)}" for _ in (used & names)][:1]
    return found


# (script, name) of typed-in module constants that may take part in a division, each with why it is
# not a figure from elsewhere (e.g. a batch size the script itself uses). None are needed today.
ALLOWED: dict[tuple[str, str], str] = {}


def _assert_ratio_of_rounded(ratio, numerator, denominator, half_step, den_half_step=None, ratio_half_step=0.005):
    """A benchmark prints two figures rounded (to within `half_step`, or `den_half_step` for the
    denominator) and their ratio, from the unrounded figures, rounded to within `ratio_half_step`:
    the ratio must lie in the range those roundings allow."""
    den_half_step = half_step if den_half_step is None else den_half_step
    low = (numerator - half_step) / (denominator + den_half_step) - ratio_half_step
    high = ((numerator + half_step) / (denominator - den_half_step) + ratio_half_step
            if denominator > den_half_step else math.inf)
    assert low <= ratio <= high, (ratio, numerator, denominator)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_never_divides_by_a_typed_in_figure(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    figures = {n for n in _fixed_figures(tree) if (path.name, n) not in ALLOWED}
    assert _divisions_by(tree, figures) == [], (
        f"{path.name} divides by a figure typed into the script ({', '.join(sorted(figures))}): a ratio must be "
        "against something measured in the same run; print a figure from elsewhere, labelled, instead")


def test_the_rule_catches_the_old_update_speed_division():
    old = ast.parse('AUTHORS_MS = {"no_teacher": 185.0}\nms = 90.0\nspeedup = round(AUTHORS_MS["no_teacher"] / ms, 2)\n')
    assert _divisions_by(old, _fixed_figures(old))


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("update_speed.py", ["--threads", "1", "--rounds", "1", "--updates", "1"]),
                                         ("act_latency.py", ["--threads", "1", "--repeats", "1"])])
def test_external_figures_are_labelled_and_no_ratio_uses_them(script, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                            timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = _last_json(result.stdout)
    external = data["external_not_measured_here"]
    assert {"source", "machine", "date"} <= set(external)
    assert "authors" not in json.dumps(data["rows"])  # no speed-up against the authors' figures
    assert "not measured in this run" in result.stdout


def test_population_benchmark_ratios_are_its_own_measurements():
    """One tiny run: each ratio is the population's rate over the separate processes' rate, both
    measured in that run, and the population ran on the threads asked for."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "benchmarks" / "population.py")
    result = subprocess.run([sys.executable, script, "--members", "2", "--updates", "2", "--compile", "off",
                             "--threads", "1"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = _last_json(result.stdout)
    assert data["population_threads"] == 1 and set(data["members"]) == {"2"}
    row = data["members"]["2"]
    assert row["separate_updates_per_s"] > 0 and row["eager"]["population_updates_per_s"] > 0
    _assert_ratio_of_rounded(row["eager"]["ratio"], row["eager"]["population_updates_per_s"],
                             row["separate_updates_per_s"], half_step=0.05)
    bad = subprocess.run([sys.executable, script, "--threads", "0"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=REPO)
    assert bad.returncode == 2 and "--threads must be >= 1, got 0" in bad.stderr


def test_whole_trial_benchmark_times_both_sides_as_sweeps_run_them(tmp_path):
    """--trials' measurement on the smoke preset, two settings of K = 2 seeds: 4 one-seed trials and
    two 2-seed trials each train and evaluate every member, and the ratio is the two wall times of
    this run; a bad --settings is refused before anything runs."""
    sys.path.insert(0, str(REPO / "benchmarks"))  # the spawned trial processes import the script too
    try:
        import population

        before = os.environ.get("DISTILL_CACHE")
        result = population.whole_trials(2, steps=3, threads=1, work=tmp_path, preset="smoke", settings=2)
        assert os.environ.get("DISTILL_CACHE") == before  # the caller's environment is put back
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert result["scores"] == {"separate": 4, "population": 4}  # one final fp32 row per member, both sides
    assert result["settings"] == 2 and result["members"] == 2
    # a one-seed trial on CPU trains in the single-student Trainer, the K-seed one as a population
    assert result["executors"] == {"separate": ["separate"], "population": ["population"]}
    assert result["final_eval_episodes"] == 1 and result["steps"] == 3
    _assert_ratio_of_rounded(result["ratio"], result["separate_s"], result["population_s"], half_step=0.05)
    assert math.isfinite(result["separate_mean_score"]) and math.isfinite(result["population_mean_score"])
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "population.py"), "--trials", "--settings", "0"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert bad.returncode == 2 and "--settings must be >= 1, got 0" in bad.stderr


def test_population_cost_model_fits_and_bounds_its_own_timings():
    """One tiny --cost-model run: the fitted lines are the least-squares lines through the timings it
    printed, and each ceiling is the separate update time over the population's per-sample cost
    times B, all from that run; one batch size is refused before anything is timed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "benchmarks" / "population.py")
    result = subprocess.run([sys.executable, script, "--cost-model", "--batches", "4,32", "--members", "1,2",
                             "--updates", "2"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = _last_json(result.stdout)
    assert data["benchmark"] == "population-cost-model" and data["threads"] == 1
    assert set(data["separate_ms"]) == {"4", "32"}
    assert set(data["population_ms"]) == {"K=1,B=4", "K=2,B=4", "K=1,B=32", "K=2,B=32"}
    slope, intercept = np.polyfit([4, 32], [data["separate_ms"]["4"], data["separate_ms"]["32"]], 1)
    assert data["separate_fit"]["fixed_ms"] == pytest.approx(intercept, abs=0.02)
    assert data["separate_fit"]["per_sample_us"] == pytest.approx(1e3 * slope, abs=0.5)
    kb = [int(k[2:].split(",")[0]) * int(k.split("B=")[1]) for k in data["population_ms"]]
    slope, intercept = np.polyfit(kb, list(data["population_ms"].values()), 1)
    assert data["population_fit"]["fixed_ms"] == pytest.approx(intercept, abs=0.05)
    assert data["population_fit"]["per_sample_us"] == pytest.approx(1e3 * slope, abs=0.5)
    per_sample = data["population_fit"]["per_sample_us"]
    for b in ("4", "32"):
        ceiling = data["ceiling_ratio_at_batch"][b]
        if ceiling is None:  # the fitted per-sample cost was not positive
            assert per_sample <= 0.005
        else:  # times printed to 0.01 ms and 0.01 us
            _assert_ratio_of_rounded(ceiling, 1e3 * data["separate_ms"][b], per_sample * int(b), half_step=5,
                                     den_half_step=0.005 * int(b))
        floor = data["matmul_floor"]
        assert floor["per_sample_us"] == pytest.approx(1e-3 * floor["flops_per_sample"] / floor["gemm_gflops"], rel=0.01)
        _assert_ratio_of_rounded(data["ceiling_ratio_at_matmul_floor"][b], 1e3 * data["separate_ms"][b],
                                 floor["per_sample_us"] * int(b), half_step=5, den_half_step=0.005 * int(b))
    # the quick student's update: ~1.66 MFLOP of matmuls per sample (FlopCounterMode of the reference update)
    assert 1.0e6 < data["matmul_floor"]["flops_per_sample"] < 2.5e6
    bad = subprocess.run([sys.executable, script, "--cost-model", "--batches", "64"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)
    assert bad.returncode == 2 and "--cost-model needs two or more batch sizes" in bad.stderr


def test_member_eval_benchmark_compares_its_own_two_timings_of_the_same_returns():
    """One tiny run: the speed-up is separate seconds over together seconds from that run, and
    evaluating the members together gave exactly the returns of evaluating them one by one."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MUJOCO_GL": "disable"}
    script = str(REPO / "benchmarks" / "member_eval.py")
    result = subprocess.run([sys.executable, script, "--members", "2", "--episodes", "1", "--steps", "3"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = _last_json(result.stdout)
    assert (data["members"], data["episodes"], data["steps"], data["threads"]) == (2, 1, 3, 1)
    assert data["together_s"] > 0 and data["separate_s"] > 0 and data["same_returns"] is True
    _assert_ratio_of_rounded(data["speedup"], data["separate_s"], data["together_s"], half_step=0.0005,
                             ratio_half_step=0.0005)
    bad = subprocess.run([sys.executable, script, "--members", "0"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=REPO)
    assert bad.returncode == 2 and "--members must be >= 1, got 0" in bad.stderr


def test_quickstart_timer_reads_the_reports_learning_and_distillation_sentences(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quickstart_time
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    report = tmp_path / "report.md"
    report.write_text("# Sweep\n\n## Headline\n\n- not this\n\n## Learning: trained against untrained (paired by seed)\n\n"
                      "intro\n\n- d_coef=0: learns\n\n## Distillation vs scratch (paired by seed)\n\n- d_coef=0.45: +1\n"
                      "- d_coef=0.9: -1\n\n## How to read the tables\n\n- score: ...\n")
    assert quickstart_time.report_sentences(report) == ["d_coef=0: learns", "d_coef=0.45: +1", "d_coef=0.9: -1"]
    assert quickstart_time.report_sentences(tmp_path / "missing.md") == []


@pytest.mark.slow
def test_quickstart_timer_runs_the_readme_command_on_a_fresh_clone(tmp_path):
    """The whole path (clone, venv, install, sweep, report) with the smoke preset and one seed; pip
    gets a new cache in the work directory (so it needs the package index or $PIP_FIND_LINKS)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quickstart_time.py"),
                          "--work", str(tmp_path / "work"), "--", "--preset", "smoke", "--seeds", "1"],
                         capture_output=True, text=True, timeout=1800)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and result["returncode"] == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert 0 < result["install_s"] < result["total_s"] and result["within_goal"] == (result["total_s"] <= 1200)
    assert any(s.startswith("d_coef=0.45:") for s in result["report"])  # the smoke d_coef grid's distilled setting
    assert not (tmp_path / "work").exists()  # removed without --keep


def test_quickstart_script_installs_without_byte_compiling_then_announces_the_sweep(tmp_path):
    """scripts/quickstart.sh with a python3 that records its arguments: three pip installs with
    --no-compile (runtime requirements only), then the line quickstart_time.py waits for, then the
    sweep with the user's extra arguments."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quickstart_time
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), "--seeds", "2"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    assert calls.read_text().splitlines() == [
        "-m pip install -q --no-compile torch==2.13.0", "-m pip install -q --no-compile -r requirements.txt",
        "-m pip install -q --no-compile -e . --no-deps", "sweeps/run.py --grid d_coef --seeds 2"]
    line, = out.stdout.splitlines()
    assert line.startswith(quickstart_time.INSTALLED_LINE) and line.endswith("running python3 sweeps/run.py --grid d_coef --seeds 2")
    assert "pytest" not in (REPO / "requirements.txt").read_text()
    assert "-r requirements.txt" in (REPO / "requirements-test.txt").read_text()
