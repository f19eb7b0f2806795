"""The sweep service: one-line refusals of bad input, a smoke sweep end to end with resume, crash
retries from checkpoints, NaN isolation, and a two-node Ray cluster on this machine."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "sweeps" / "run.py")]


def _run(*args: str, timeout: int = 900, **extra_env: str) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: without --address the CLI's ray.init() starts a Ray of its own, never joining
    # a cluster that the user runs on this machine (ray.init() with no address joins the latest one)
    env = {**os.environ, "MUJOCO_GL": "disable", "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", **extra_env}
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



# -- issue 16: every bad setting refused in one line, in-process, before Ray starts or anything is written

@pytest.fixture
def sweeps_run(monkeypatch):
    """sweeps.run with `ray.init` made to fail the test if anything reaches it."""
    import ray

    from sweeps import run

    def ray_init(*args, **kwargs):
        raise AssertionError("ray.init was called: the bad input was not refused before Ray started")

    monkeypatch.setattr(ray, "init", ray_init)
    return run


def _refusal(sweeps_run, capsys, tmp_path, *args: str, preset: str = "smoke") -> str:
    """Run the CLI in-process with `args`; assert a one-line refusal (exit 2) within a few seconds
    that wrote nothing; return the line."""
    out = tmp_path / "out"
    argv = ["--preset", preset, *args] if "--out" in args else ["--preset", preset, "--out", str(out), *args]
    started = time.perf_counter()
    code = sweeps_run.main(argv)
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()  # nothing written
    assert seconds < 5, f"refused after {seconds:.1f} s"
    return lines[0]


# One bad value of each kind for every trial setting (wrong type; out of range; unknown name; not
# available in the sweep's store/teacher; too large for this machine), with a fragment of the refusal.
BAD_SETTINGS: dict[str, list[tuple[str, str]]] = {
    "preset": [("5", "preset must be a string"), ("huge", "unknown preset 'huge'")],
    "ablation": [("5", "ablation must be a string")],
    "teacher": [("[]", "teacher must be a string"), ("/no/such/teacher.pt", "no such file")],
    "teacher_size": [("[1]", "teacher_size must be a string")],
    "data": [("5", "data must be a string"), ("/no/such/store", "/no/such/store")],
    "eval_tasks": [('"walker-run"', "eval_tasks must be a list of strings"),
                   ('["walker-fly"]', "unknown task 'walker-fly'"), ('["mw-reach"]', "Meta-World"),
                   ('["walker-run"]', "'walker-run' is not in the episode store's task set")],
    "student_size": [('"big"', "student_size must be an integer or null"), ("3", "student_size must be one of")],
    "student_dims": [("[1]", "student_dims must be an object"), ('{"warp": 1}', "student_dims: unknown key 'warp'"),
                     ('{"enc_dim": "wide"}', "student_dims.enc_dim must be an integer"),
                     ('{"enc_dim": -3}', "enc_dim must be positive, got -3"),
                     ('{"latent_dim": 20}', "latent_dim 20 is not a multiple of simnorm_dim")],
    "steps": [("abc", 'steps must be an integer, got string "abc"'), ("2.5", "steps must be an integer, got number"),
              ("true", "steps must be an integer, got boolean"), ("0", "steps must be >= 1")],
    "batch_size": [("abc", "batch_size must be an integer"), ("0", "batch_size must be >= 1"),
                   ("100000000", "batch_size 100000000: one update of 1 student(s) needs at least")],
    "d_coef": [("abc", 'd_coef must be a number, got string "abc"'), ("-1", "d_coef must be >= 0"),
               ("NaN", "d_coef must be a finite number")],
    "target": [("5", "target must be a string"), ("telepathy", "unknown distillation target 'telepathy'")],
    "lr": [("fast", "lr must be a number"), ("0", "lr must be > 0"), ("Infinity", "lr must be a finite number")],
    "seed": [("one", "seed must be an integer"), ("-1", "seed must be >= 0")],
    "num_seeds": [("x", "num_seeds must be an integer"), ("0", "num_seeds must be >= 1")],
    "eval_every": [("x", "eval_every must be an integer"), ("0", "eval_every must be >= 1")],
    "eval_episodes": [("x", "eval_episodes must be an integer"), ("0", "eval_episodes must be >= 1")],
    "eval_plan": [("yes", "eval_plan must be true or false"), ("1", "eval_plan must be true or false, got integer 1")],
    "eval_max_steps": [("long", "eval_max_steps must be an integer or null"), ("0", "eval_max_steps must be >= 1")],
    "eval_planner": [("[1]", "eval_planner must be an object"), ('{"warp": 1}', "eval_planner: unknown key 'warp'"),
                     ('{"num_samples": "many"}', "eval_planner.num_samples must be an integer"),
                     ('{"horizon": 0}', "horizon and num_samples must be >= 1")],
    "quant_modes": [('"fp16"', "quant_modes must be a list of strings"), ('["fp7"]', "unknown quantization mode 'fp7'")],
    "device": [("5", "device must be a string"), ("tpu", "device must be one of")],
    "precision": [("5", "precision must be a string"), ("fp8", "precision must be one of")],
    "train": [("5", "train must be"), ('{"horizon": 0}', "horizon must be >= 1"),
              ('{"warp": 1}', "warp"), ('{"lr": 0.1}', "set it as the trial setting 'lr'")],
    **{name: [("x", f"{name} must be an integer or null"), ("-1", f"{name} must be >= 0")]
       for name in ("fault_kill_at_step", "fault_kill_seed", "fault_nan_at_step", "fault_nan_seed")},
}


def test_every_trial_setting_has_bad_value_cases():
    from dataclasses import fields

    from sweeps.config import TrialConfig

    assert set(BAD_SETTINGS) == {f.name for f in fields(TrialConfig)}


@pytest.mark.parametrize("key,value,fragment", [(k, v, f) for k, cases in BAD_SETTINGS.items() for v, f in cases],
                         ids=lambda x: str(x)[:24])
def test_bad_setting_is_refused_before_ray_starts(sweeps_run, capsys, tmp_path, key, value, fragment):
    line = _refusal(sweeps_run, capsys, tmp_path, "--set", f"{key}={value}")
    assert fragment in line and key in line, line


@pytest.mark.parametrize("args,fragment", [
    (["--set", "precision=bf16", "--set", "target=latent_linear"], "needs the population executor"),
    (["--grid", "target", "--set", "precision=bf16"], 'trial target="latent_linear": precision'),  # one grid point
    (["--search", "optuna", "--set", "steps=0"], "steps must be >= 1"),
    (["--seeds", "abc"], "argument --seeds: invalid int value"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--set", "nokey"], "--set expects key=value"),
])
def test_bad_combination_or_flag_is_refused_in_one_line(sweeps_run, capsys, tmp_path, args, fragment):
    assert fragment in _refusal(sweeps_run, capsys, tmp_path, *args)


def test_bad_out_is_refused_before_anything_is_written(sweeps_run, capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [(str(a_file), "exists and is not a directory"),
             (str(a_file / "sub"), "is a file, not a directory"),
             ("", "--out is empty"),
             (str(REPO / "sweeps" / "runs"), "inside the sweeps/ package"),
             (str(REPO / "agent"), "inside the agent/ package"),
             (str(REPO), "the repository root"),
             ("ftp://host/x", "unsupported storage scheme 'ftp'"),
             ("s3://", "no bucket or path after s3://")]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((str(locked / "out"), "is not writable"))
    for out, fragment in cases:
        line = _refusal(sweeps_run, capsys, tmp_path, "--out", out)
        assert fragment in line, (out, line)
    assert a_file.read_text() == "not a directory"
    assert not (REPO / "sweeps" / "runs").exists()


@pytest.mark.parametrize("args", [["--grid", g] for g in ("d_coef", "batch_size", "steps", "teacher_size", "target",
                                                          "quant", "paper")]
                         + [["--search", "optuna"], ["--grid", "teacher_size", "--seeds", "3"]])
def test_good_smoke_sweeps_pass_the_checks_without_writing(sweeps_run, tmp_path, args):
    parsed = sweeps_run.build_parser().parse_args(["--preset", "smoke", "--out", str(tmp_path / "out"), *args])
    base, _ = sweeps_run.validate_args(parsed)
    assert base.preset == "smoke" and not (tmp_path / "out").exists()


def test_planned_smoke_inputs_are_what_the_sweep_builds(tmp_path):
    """The checks describe the smoke teachers and store without building them; pin that description
    to what `resolve_inputs` builds."""
    from dataclasses import replace

    from agent.checkpoint import load_world_model
    from sweeps.preflight import StoreFacts, plan_inputs
    from sweeps.setup import resolve_inputs

    plan = plan_inputs("smoke", [], None)
    built = resolve_inputs("smoke", [], None, tmp_path / "_setup")
    assert built.default_teacher == plan.inputs.default_teacher and set(built.teachers) == set(plan.inputs.teachers)
    assert replace(StoreFacts.of(built.data), path="") == replace(plan.store(plan.inputs.data), path="")
    for label, path in built.teachers.items():
        assert load_world_model(path).cfg == plan.teacher(plan.inputs.teachers[label])


def _error_row(trial: str, seed: int, error: str | None, step: int = 30) -> dict:
    return {"trial_id": trial, "status": "error" if error else "ok", "config": {"seed": seed}, "step": step,
            "phase": "train", "quant": "fp32", "score": None if error else 1.0, "error": error}


@pytest.mark.parametrize("rows,code,fragment", [
    ([_error_row("a", 1, "ConfigError: x"), _error_row("a", 2, "ConfigError: x"), _error_row("b", 1, "ConfigError: x"),
      _error_row("b", 2, "OOM")], 1, "all 2 trials failed; most common error (2 of them): ConfigError: x"),
    ([_error_row("a", 1, None), _error_row("a", 2, None), _error_row("b", 1, "OOM"), _error_row("b", 2, "OOM")],
     0, "warning: 1 of 2 trials failed; most common error (1 of them): OOM"),
    # a diverged member does not fail its trial while another member goes on
    ([_error_row("a", 1, "diverged"), _error_row("a", 2, None, step=60)], 0, None),
    ([], 1, "the sweep reported no result rows"),
])
def test_failed_trials_are_summarised_in_one_line(sweeps_run, monkeypatch, capsys, tmp_path, rows, code, fragment):
    from sweeps.results import write_rows

    write_rows(tmp_path, rows)
    monkeypatch.setattr(sweeps_run, "run_sweep", lambda args: tmp_path)
    assert sweeps_run.main(["--preset", "smoke", "--out", str(tmp_path)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    if fragment is None:
        assert err == []
    else:
        assert len(err) == 1 and fragment in err[0] and str(tmp_path / "results.jsonl") in err[0], err

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
    trials = len({r["trial_id"] for r in rows})  # the teacher_size grid: each teacher, and the scratch student
    assert trials == 3
    killed = [r for r in by_seed[1] if r["phase"] == "train" and r["step"] == 60]
    assert len(killed) == trials and all(r["restored_from"] == 30 for r in killed)  # resumed, not restarted
    diverged = [r for r in by_seed[2] if r["status"] == "error"]
    assert len(diverged) == trials and all("diverged" in r["error"] for r in diverged)
    assert not any(r["phase"] == "final" for r in by_seed[2])
    healthy = [r for r in by_seed[3] if r["phase"] == "final"]
    assert len(healthy) == trials and all(r["status"] == "ok" for r in healthy)


def _start_own_cluster(nodes: int, ray_tmp: Path, log: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """A Ray cluster of `nodes` nodes from Ray's own multi-node test helper (ray.cluster_utils.Cluster)
    in a process of the test's own (`tests/ray_cluster_process.py`: a session and process group of
    its own, free ports, Ray's files under `ray_tmp`). Returns the process and the cluster address."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "ray_cluster_process.py"), "--nodes", str(nodes)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
                                start_new_session=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    address = proc.stdout.readline().strip() if ready else ""
    if not address:
        _stop_own_cluster(proc)
        pytest.fail(f"the test's Ray cluster did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    return proc, address


def _stop_own_cluster(proc: subprocess.Popen) -> None:
    """Stop a cluster process this test started, and only it: close its stdin (it shuts its own nodes
    down); if it does not exit cleanly, end its process group, which holds nothing but what it started."""
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    if proc.returncode != 0:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _process_group(pgid: int) -> set[tuple[int, str]]:
    """(pid, start time) of the live processes of group `pgid`, from /proc."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.add((int(entry), fields[19]))
    return members


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes_and_leaves_other_rays_alone(tmp_path):
    """Trials of a sweep on a two-node cluster run on both nodes. The test starts its nodes itself and
    stops them by its own process's id (never `ray stop`), with free ports and a Ray temp dir of its
    own: a bystander Ray (standing in for a user's) is alive and untouched afterwards."""
    temp_dirs = [Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")) for _ in range(2)]  # short: unix sockets
    bystander, _ = _start_own_cluster(1, temp_dirs[0], tmp_path / "bystander.log")
    try:
        before = _process_group(bystander.pid)
        assert len(before) > 2  # the helper, its GCS server, raylet, ...
        cluster, address = _start_own_cluster(2, temp_dirs[1], tmp_path / "cluster.log")
        try:
            out = tmp_path / "cluster"
            result = _run("--grid", "teacher_size", "--preset", "smoke", "--seeds", "2", "--out", str(out),
                          "--address", address, "--set", 'quant_modes=["fp32"]', RAY_TMPDIR=str(temp_dirs[1]))
            assert result.returncode == 0, result.stderr[-3000:]
            nodes = {r["node_id"] for r in _rows(out)}
            assert len(nodes) == 2
        finally:
            _stop_own_cluster(cluster)
        assert cluster.returncode == 0 and not _process_group(cluster.pid)  # all of ours stopped
        assert bystander.poll() is None and _process_group(bystander.pid) >= before  # nothing of the other
    finally:
        _stop_own_cluster(bystander)
        for path in temp_dirs:
            shutil.rmtree(path, ignore_errors=True)


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
