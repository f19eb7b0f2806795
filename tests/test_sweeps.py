"""The sweep service: one-line refusals of bad input, a smoke sweep end to end with resume, crash
retries from checkpoints, NaN isolation, and a two-node Ray cluster on this machine."""
from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock
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
    """Run the CLI in-process with `args`; assert a one-line refusal (exit 2), before Ray started,
    that wrote nothing; return the line."""
    import ray

    out = tmp_path / "out"
    argv = ["--preset", preset, *args] if "--out" in args else ["--preset", preset, "--out", str(out), *args]
    with mock.patch.object(ray, "init", side_effect=AssertionError("Ray was started before the refusal")):
        code = sweeps_run.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()  # nothing written
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
    "log_every": [("x", "log_every must be an integer"), ("0", "log_every must be >= 1")],
    "eval_episodes": [("x", "eval_episodes must be an integer"), ("0", "eval_episodes must be >= 1")],
    "final_eval_episodes": [("x", "final_eval_episodes must be an integer"), ("0", "final_eval_episodes must be >= 1")],
    "eval_plan": [("yes", "eval_plan must be true or false"), ("1", "eval_plan must be true or false, got integer 1")],
    "eval_at_start": [("yes", "eval_at_start must be true or false"),
                      ("0", "eval_at_start must be true or false, got integer 0")],
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
    # every final row's student is kept, the very file whose size the row reports
    from agent.checkpoint import load_world_model
    from agent.quantize import MIB

    for row in final:
        path = out / "students" / row["trial_id"] / f"seed-{row['config']['seed']}" / f"{row['quant']}.pt"
        assert row["size_mib"] == path.stat().st_size / MIB
    assert len(list((out / "students").rglob("*.pt"))) == len(final) == 8 * 2
    assert load_world_model(path).cfg.latent_dim > 0
    assert f"students: {out / 'students'}/<trial_id>/seed-<seed>/<quant>.pt" in result.stdout
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["grid"] == "d_coef" and meta["swept"] == ["d_coef"] and meta["trials"] == 8
    report = out / "report" / "report.md"
    assert report.exists() and "d_coef" in report.read_text()
    assert str(report) in result.stdout
    trial_dirs = sorted(p.name for p in (out / "ray" / "sweep").iterdir() if p.is_dir())
    assert {name.rsplit("_", 2)[0] for name in trial_dirs} == {f"d_coef={d},seed=1" for d in
                                                               ("0", "0.05", "0.1", "0.2", "0.4", "0.45", "0.6", "0.9")}
    # forced experiment snapshots (CheckpointConfig(num_to_keep=1)) warned here at every evaluation
    assert "snapshotting" not in result.stderr

    # a driver killed before copying a finished trial's students: the resumed sweep copies them from its checkpoint
    kept = {p.relative_to(out): p.read_bytes() for p in (out / "students").rglob("*.pt")}
    shutil.rmtree(out / "students" / row["trial_id"])
    again = _run("--grid", "d_coef", "--preset", "smoke", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(out) == rows  # nothing re-ran, nothing lost
    assert {p.relative_to(out): p.read_bytes() for p in (out / "students").rglob("*.pt")} == kept
    assert sorted(p.name for p in (out / "ray" / "sweep").iterdir() if p.is_dir()) == trial_dirs


def test_dry_run_checks_and_prints_the_sweep_without_starting_ray_or_writing(sweeps_run, capsys, tmp_path):
    """--dry-run: every check a sweep makes, then the trials (label, updates, batch, teacher), the
    resources this machine gives each, the evaluations and OUT; Ray never starts, nothing is written;
    input a sweep refuses is refused the same way."""
    out = tmp_path / "out"
    assert sweeps_run.main(["--dry-run", "--preset", "smoke", "--out", str(out), "--set", "steps=90"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("grid: d_coef, preset smoke: 8 trials x 1 seed = 8 students, on 2 tasks "
                        "(cartpole-balance, pendulum-swingup)")
    trials = [line.split() for line in lines if line.startswith("  ")]
    assert [t[0] for t in trials] == [f"d_coef={d},seed=1" for d in ("0", "0.05", "0.1", "0.2", "0.4", "0.45", "0.6", "0.9")]
    assert " ".join(trials[0][1:]) == "90 updates, batch 32, no teacher"
    assert all(" ".join(t[1:]) == "90 updates, batch 32, teacher large (the smoke preset's teacher-large, built in "
               "OUT/_setup)" for t in trials[1:])
    cpus = os.cpu_count() or 1
    each = sweeps_run.trial_cpus(None, 8, float(cpus), 0.0, None)
    assert f"each trial: {each:g} CPU, 0 GPU; this machine's own Ray with {cpus} CPUs runs {min(8, int(cpus // each))} " \
        "of the 8 trials at once" in lines
    assert ("evaluation: after updates 30, 60 (1 episode per task) and after the last (1 episode per task), 20-step "
            "episodes; final precisions: fp32, fp16") in lines
    assert lines[-1] == f"results: {out} (sweep.json, results.jsonl, report/, students/)"
    assert not out.exists()
    assert "d_coef must be >= 0, got -1" in _refusal(sweeps_run, capsys, tmp_path, "--dry-run", "--set", "d_coef=-1")


def test_a_trials_students_are_copied_from_its_stored_checkpoint_to_out(tmp_path, capsys):
    """Driver side, local OUT: a checkpoint with students/ (a trial's last) is copied to
    OUT/students/<trial_id>/, one taken during training is not; a copy that fails warns once and
    the sweep goes on."""
    import types

    import pyarrow.fs as pafs
    from ray import tune

    from sweeps.tune_adapter import StreamRows

    out, stored = tmp_path / "out", tmp_path / "ray" / "sweep" / "trial" / "checkpoint_000003"
    for name, data in (("trainer.pt", b"state"), ("students/seed-4/fp32.pt", b"a"), ("students/seed-4/fp16.pt", b"b")):
        (stored / name).parent.mkdir(parents=True, exist_ok=True)
        (stored / name).write_bytes(data)
    during = tmp_path / "ray" / "sweep" / "trial" / "checkpoint_000002"
    during.mkdir()
    (during / "trainer.pt").write_bytes(b"state")
    stream = StreamRows(out)
    trial = types.SimpleNamespace(trial_id="abc_00001")
    stream.on_checkpoint(0, [], trial, tune.Checkpoint(str(during), pafs.LocalFileSystem()))
    assert not (out / "students").exists()
    stream.on_checkpoint(0, [], trial, tune.Checkpoint(str(stored), pafs.LocalFileSystem()))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "students/abc_00001/seed-4/fp16.pt", "students/abc_00001/seed-4/fp32.pt"]
    assert (out / "students" / "abc_00001" / "seed-4" / "fp16.pt").read_bytes() == b"b"
    (out / "students" / "abc_00001" / "seed-4" / "fp16.pt").unlink()
    stream.keep_students("abc_00001", tune.Checkpoint(str(stored), pafs.LocalFileSystem()), missing_only=True)
    assert not (out / "students" / "abc_00001" / "seed-4" / "fp16.pt").exists()  # the trial's directory is there
    stream.keep_students("abc_00001", tune.Checkpoint(str(stored), pafs.LocalFileSystem()))
    assert (out / "students" / "abc_00001" / "seed-4" / "fp16.pt").read_bytes() == b"b"

    (out / "students" / "other").write_text("a file where the trial's directory goes")
    for _ in range(2):
        stream.on_checkpoint(0, [], types.SimpleNamespace(trial_id="other"),
                             tune.Checkpoint(str(stored), pafs.LocalFileSystem()))

    class Unreachable:  # a store that fails even to list the checkpoint: the sweep goes on all the same
        def get_file_info(self, path):
            raise OSError("connection refused")

    stream.keep_students("third", types.SimpleNamespace(path="bucket/ckpt", filesystem=Unreachable()), missing_only=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not copy trial other's students to students/")
    assert err[0].endswith(f"they stay in its checkpoint {stored}")


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


# -- issue 17 item 2: a readable progress table, trial directories named after what they are, no
#    experiment-snapshot warnings

def _stub_trial(config: dict, namer=None):
    from ray.tune.experiment import Trial

    return Trial("trainable", config=config, stub=True, trial_name_creator=namer)


def test_trials_and_their_directories_are_named_after_their_setting_and_seeds():
    from sweeps.config import preset_config
    from sweeps.tune_adapter import TrialNamer

    base = preset_config("smoke").with_overrides({"num_seeds": 5}).to_dict()
    grid = TrialNamer(["d_coef"])
    assert grid.label({"trial": {**base, "d_coef": 0.45}}) == "d_coef=0.45,seeds=1-5"
    assert grid.label({"trial": {**base, "d_coef": 0.45, "num_seeds": 1, "seed": 3}}) == "d_coef=0.45,seed=3"
    crossed = TrialNamer(["d_coef", "teacher_size"])
    assert crossed.label({"trial": {**base, "d_coef": 0.4, "teacher_size": "small"}}) == \
        "d_coef=0.4,teacher_size=small,seeds=1-5"
    assert crossed.label({"trial": {**base, "d_coef": 0.0}}) == "d_coef=0,teacher_size=none,seeds=1-5"  # scratch
    paper = TrialNamer(None)  # the paper grid: each trial's own ablation
    assert paper.label({"trial": {**base, "ablation": "batch_size", "batch_size": 1024}}) == "batch_size=1024,seeds=1-5"
    assert paper.label({"trial": {**base, "ablation": "quant", "quant_modes": ["fp32", "int8"]}}) == \
        "quant=fp32+int8,seeds=1-5"
    search = TrialNamer(["d_coef", "batch_size", "lr"])  # sampled values sit at the top of the config
    assert search.label({"trial": base, "d_coef": 0.123456, "batch_size": 512, "lr": 0.00031}) == \
        "d_coef=0.1235,batch_size=512,lr=0.00031,seeds=1-5"

    trial = _stub_trial({"trial": {**base, "d_coef": 0.45}}, grid)
    assert str(trial) == "d_coef=0.45,seeds=1-5"  # the table's and the logs' trial name
    assert TrialNamer(["d_coef"], dirname=True)(trial) == f"d_coef=0.45,seeds=1-5_{trial.trial_id}"
    odd = TrialNamer(["teacher_size"], dirname=True)(_stub_trial({"trial": {**base, "teacher_size": "a/../b c"}}))
    assert odd.startswith("teacher_size=a_.._b_c,seeds=1-5_")


def test_progress_table_shows_swept_parameters_seeds_step_and_score():
    from ray.tune.progress_reporter import _trial_progress_table

    from sweeps.config import preset_config
    from sweeps.tune_adapter import TrialNamer, progress_reporter

    base = preset_config("smoke").with_overrides({"num_seeds": 5}).to_dict()
    trial = _stub_trial({"trial": {**base, "d_coef": 0.45, "teacher_size": "small"}}, TrialNamer(["d_coef", "teacher_size"]))
    trial.update_last_result({"score": 3.21, "step": 500, "seeds": "1-5", "members": 4, "loss": 1.5,
                              "row_json": json.dumps([{"config": base}] * 5)})
    reporter = progress_reporter(["d_coef", "teacher_size"])
    lines = _trial_progress_table([trial], metric_columns=reporter._metric_columns,
                                  parameter_columns=reporter._parameter_columns,
                                  max_column_length=reporter._max_column_length)
    lines = "\n".join(lines).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    assert cells[0] == ["Trial name", "status", "loc", "d_coef", "teacher_size", "seeds", "members", "step", "score",
                        "loss"]
    assert cells[1][0] == "d_coef=0.45,teacher_size=small,seeds=1-5"
    assert cells[1][3:] == ["0.45", "small", "1-5", "4", "500", "3.21", "1.5"]
    assert "{" not in "\n".join(lines)  # no config dict, no rows
    searched = progress_reporter(["d_coef", "lr"], searched=["d_coef", "lr"])
    assert searched._parameter_columns == {"d_coef": "d_coef", "lr": "lr"}  # sampled: top level of the config


def test_sweep_tuner_uses_the_table_and_names_and_forces_no_experiment_snapshots(sweeps_run, tmp_path):
    """Tune forces an experiment snapshot (and warns "Experiment state snapshotting has been triggered
    multiple times") whenever a trial has checkpointed CheckpointConfig.num_to_keep times since the
    last snapshot: with num_to_keep=1 at every evaluation of every trial."""
    from ray import tune
    from ray.tune import CLIReporter
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from sweeps.tune_adapter import StreamRows, TrialNamer

    for i, extra in enumerate(([], ["--search", "optuna"], ["--grid", "paper"])):
        out = tmp_path / f"out{i}"  # each a new sweep: an OUT holding Tune state is refused without --resume
        args = sweeps_run.build_parser().parse_args(["--preset", "smoke", "--out", str(out), *extra])
        base, overrides = sweeps_run.validate_args(args)
        configs = sweeps_run.trial_configs(args, base, {"large": "t.pt", "small": "s.pt"}, "large", overrides)
        tuner = sweeps_run._new_tuner(args, tune.with_resources(lambda config: None, {"cpu": 1}), configs, base,
                                      str(out / "ray"), out)
        run_config, tune_config = tuner._local_tuner._run_config, tuner._local_tuner._tune_config
        assert isinstance(run_config.progress_reporter, CLIReporter)
        assert isinstance(tune_config.trial_name_creator, TrialNamer)
        assert isinstance(tune_config.trial_dirname_creator, TrialNamer) and tune_config.trial_dirname_creator.dirname
        assert [type(c) for c in run_config.callbacks] == [StreamRows]
        manager = _ExperimentCheckpointManager(storage=None, checkpoint_period="auto",
                                               sync_every_n_trial_checkpoints=run_config.checkpoint_config.num_to_keep)
        for _ in range(4):
            manager.on_trial_checkpoint("a trial")
        assert not manager._should_force_sync_up


# -- issue 17 item 3: training curves and per-task scores in Tune's results (and so TensorBoard), opt-in W&B

def _event_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files under `directory`: tag -> [(step, value)]."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # TFRecord: length (8), its crc (4), data, data crc (4)
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _eval_row(seed: int, step: int, phase: str, quant: str, task_scores: dict) -> dict:
    return {"trial_id": "t", "status": "ok", "config": {"seed": seed}, "step": step, "phase": phase, "quant": quant,
            "score": sum(task_scores.values()) / len(task_scores), "task_scores": task_scores, "members": 2}


def test_tune_results_carry_training_curves_and_per_task_scores_to_tensorboard(tmp_path):
    from ray.tune.logger import TBXLoggerCallback

    from sweeps.tune_adapter import TuneReporter

    sent = []
    reporter = TuneReporter({"seed": 1, "num_seeds": 2}, send=lambda metrics, checkpoint=None: sent.append((metrics, checkpoint)))
    train = {"consistency": 0.5, "reward": 0.2, "value": 0.3, "pi_loss": -1.0, "distill": 0.1, "total": 12.0,
             "grad_norm": 4.0, "lr": 3e-4, "updates_per_s": 50.0, "seed": {"1": {"total": 11.0}, "2": {"total": 13.0}}}
    reporter.metrics(10, train)
    rows = [_eval_row(1, 20, "train", "fp32", {"cup-catch": 1.0, "walker-stand": 3.0}),
            _eval_row(2, 20, "train", "fp32", {"cup-catch": 3.0, "walker-stand": 5.0})]
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    reporter.rows(rows, checkpoint)
    reporter.metrics(20, {**train, "total": 10.0})
    reporter.rows([_eval_row(1, 20, "final", "fp16", {"cup-catch": 0.0, "walker-stand": 2.0}),
                   _eval_row(2, 20, "final", "fp16", {"cup-catch": 2.0, "walker-stand": 2.0})], None)

    results = [metrics for metrics, _ in sent]
    assert math.isnan(results[0]["score"]) and "row_json" not in results[0]  # no evaluation yet
    assert [r["step"] for r in results] == [r["timesteps_total"] for r in results] == [10, 20, 20, 20]
    assert all(r["seeds"] == "1-2" for r in results)
    assert results[1]["eval"] == {"score": 3.0, "cup-catch": 2.0, "walker-stand": 4.0} and results[1]["score"] == 3.0
    assert json.loads(results[1]["row_json"]) == rows and sent[1][1] is not None  # rows whole, with the checkpoint
    assert results[2]["score"] == 3.0 and results[2]["train"]["total"] == 10.0  # the train score carries on
    assert [r["loss"] for r in results] == [12.0, 12.0, 10.0, 10.0]  # the table's loss column: the latest logged
    assert results[3]["final"] == {"fp16": {"score": 1.5, "cup-catch": 1.0, "walker-stand": 2.0}}
    assert results[3]["final_score_fp16"] == 1.5 and results[3]["score"] == 3.0  # searchers rank the fp32 student

    class Trial:  # what Tune's TensorBoard logger needs of a trial
        local_path, evaluated_params = str(tmp_path / "trial"), {}

        def init_local_path(self):
            Path(self.local_path).mkdir(parents=True, exist_ok=True)

    logger, trial = TBXLoggerCallback(), Trial()
    for iteration, result in enumerate(results, 1):
        logger.log_trial_result(iteration, trial, {**result, "training_iteration": iteration})
    logger.log_trial_end(trial)
    scalars = _event_scalars(tmp_path / "trial")
    for key in ("consistency", "reward", "value", "pi_loss", "distill", "total", "grad_norm", "lr", "updates_per_s"):
        assert [step for step, _ in scalars[f"ray/tune/train/{key}"]] == [10, 20], key
    assert scalars["ray/tune/train/total"] == [(10, 12.0), (20, 10.0)]
    assert scalars["ray/tune/train/seed/2/total"][0] == (10, 13.0)  # each member's own curve
    assert scalars["ray/tune/eval/score"] == [(20, 3.0)] and scalars["ray/tune/eval/walker-stand"] == [(20, 4.0)]
    assert scalars["ray/tune/final/fp16/cup-catch"] == [(20, 1.0)]


def test_wandb_is_ray_tunes_own_callback_and_refused_in_one_line_without_the_package(sweeps_run, capsys, monkeypatch,
                                                                                       tmp_path):
    monkeypatch.setattr(sweeps_run, "wandb_installed", lambda: False)
    line = _refusal(sweeps_run, capsys, tmp_path, "--wandb", "my-project")
    assert "--wandb my-project: the wandb package is not installed" in line

    import ray.air.integrations.wandb as tune_wandb

    monkeypatch.setattr(tune_wandb, "wandb", object())  # stands in for the package; nothing is sent
    args = sweeps_run.build_parser().parse_args(["--preset", "smoke", "--wandb", "my-project", "--out", str(tmp_path / "o")])
    callbacks = sweeps_run.run_callbacks(args, tmp_path / "o")
    assert type(callbacks[1]) is tune_wandb.WandbLoggerCallback
    assert callbacks[1].project == "my-project" and callbacks[1].group == "o" and "row_json" in callbacks[1].excludes
    args = sweeps_run.build_parser().parse_args(["--preset", "smoke", "--out", str(tmp_path / "o")])
    assert len(sweeps_run.run_callbacks(args, tmp_path / "o")) == 1  # opt-in


# -- issue 17 item 5: --resume says what it does

def _recorded_sweep(sweeps_run, out: Path, *args: str, restorable: bool = True) -> None:
    """OUT as a sweep started with `args` leaves it: sweep.json (what run_sweep records) and Tune's state."""
    from sweeps.results import write_sweep_meta

    parsed = sweeps_run.build_parser().parse_args(["--out", str(out), *args])
    base, _ = sweeps_run.validate_args(parsed)
    write_sweep_meta(out, {**sweeps_run.sweep_identity(parsed, base), "grid": "whatever", "created": "then"})
    if restorable:
        (out / "ray" / "sweep").mkdir(parents=True)
        (out / "ray" / "sweep" / sweeps_run.TUNER_STATE).write_bytes(b"")


def test_resume_with_nothing_to_resume_is_refused_in_one_line(sweeps_run, capsys, tmp_path):
    line = _refusal(sweeps_run, capsys, tmp_path, "--resume")
    assert f"nothing to resume at {tmp_path / 'out'}" in line
    started = tmp_path / "started"  # sweep.json written, the fit never began
    _recorded_sweep(sweeps_run, started, "--preset", "smoke", restorable=False)
    line = _refusal(sweeps_run, capsys, tmp_path, "--resume", "--out", str(started))
    assert f"nothing to resume at {started}" in line


@pytest.mark.parametrize("args,fragment", [
    (["--grid", "batch_size"], "--grid batch_size here, --grid d_coef in the sweep being resumed"),
    (["--grid", "d_coef=0,0.2"], "--grid d_coef=0,0.2 here, --grid d_coef in the sweep being resumed"),
    (["--grid", "d_coef", "--grid", "teacher_size"], "--grid d_coef --grid teacher_size here, --grid d_coef in"),
    (["--set", "d_coef=0.3"], "--set d_coef=0.3 here, d_coef=0.45 in the sweep being resumed"),
    (["--set", "train.horizon=5"], "--set train.horizon=5 here, no train.horizon in the sweep being resumed"),
    (["--seeds", "2"], "--seeds 2 here, --seeds 1 in the sweep being resumed"),
    (["--preset", "quick"], "--preset quick here, --preset smoke in the sweep being resumed"),
    (["--search", "optuna"], "--search optuna here, --search grid in the sweep being resumed"),
])
def test_resume_with_other_arguments_is_refused_naming_the_difference(sweeps_run, capsys, tmp_path, args, fragment):
    out = tmp_path / "sweep"
    _recorded_sweep(sweeps_run, out, "--preset", "smoke", "--grid", "d_coef")
    line = _refusal(sweeps_run, capsys, tmp_path, "--resume", "--out", str(out), *args)  # a later --preset wins
    assert f"--resume at {out}: {fragment}" in line, line


def test_resume_with_the_sweeps_own_arguments_passes_the_checks(sweeps_run, tmp_path):
    out = tmp_path / "sweep"
    own = ["--preset", "smoke", "--grid", "d_coef=0,0.4", "--grid", "teacher_size", "--set", "train.horizon=2",
           "--seeds", "2"]
    _recorded_sweep(sweeps_run, out, *own)
    from ray import tune

    assert tune.Tuner.can_restore(str(out / "ray" / "sweep"))  # what the check looks for is what Tune restores from
    args = sweeps_run.build_parser().parse_args(["--out", str(out), "--resume", *own])
    sweeps_run.validate_args(args)


def test_a_new_sweep_into_an_earlier_sweeps_out_is_refused_and_leaves_it_as_it_was(sweeps_run, capsys, tmp_path):
    """Without --resume, an OUT that holds result rows or Tune state is refused before anything
    is written (a new sweep would replace its sweep.json and mix its rows into the report); an OUT
    where a sweep was started but wrote neither is a fresh start."""
    done = tmp_path / "done"
    _recorded_sweep(sweeps_run, done, "--preset", "smoke")
    (done / "results.jsonl").write_text('{"trial_id": "t"}\n\n{"trial_id": "u"}\n')
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    line = _refusal(sweeps_run, capsys, tmp_path, "--out", str(done), "--set", "seed=6")
    assert line == (f"error: --out {done} already holds a sweep (2 result rows and Tune state): --resume continues it "
                    "(with its own arguments); start a new sweep in another --out (more seeds: run them into a new "
                    "--out and pool both with python analysis/report.py OUT1 OUT2 --out DIR)")
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before
    rows_only = tmp_path / "rows-only"  # Tune state gone, rows kept: nothing to resume, still not overwritten
    rows_only.mkdir()
    (rows_only / "results.jsonl").write_text('{"trial_id": "t"}\n')
    line = _refusal(sweeps_run, capsys, tmp_path, "--out", str(rows_only))
    assert "already holds a sweep (1 result row): start a new sweep in another --out" in line
    started = tmp_path / "started"  # sweep.json written, no row, no Tune state
    _recorded_sweep(sweeps_run, started, "--preset", "smoke", restorable=False)
    sweeps_run.validate_args(sweeps_run.build_parser().parse_args(["--preset", "smoke", "--out", str(started)]))


# -- issue 17 item 9: grids the user writes, and crossed grids

def _configs(sweeps_run, tmp_path, *args: str) -> list[dict]:
    parsed = sweeps_run.build_parser().parse_args(["--preset", "smoke", "--out", str(tmp_path / "out"), *args])
    base, overrides = sweeps_run.validate_args(parsed)
    return sweeps_run.trial_configs(parsed, base, {"small": "s.pt", "large": "l.pt"}, "large", overrides)


def test_user_grid_values_are_typed_as_the_setting(sweeps_run, tmp_path):
    configs = _configs(sweeps_run, tmp_path, "--grid", "d_coef=0,0.2,0.4")
    assert [c["d_coef"] for c in configs] == [0.0, 0.2, 0.4] and all(type(c["d_coef"]) is float for c in configs)
    assert [c["batch_size"] for c in _configs(sweeps_run, tmp_path, "--grid", "batch_size=16,32")] == [16, 32]
    steps = _configs(sweeps_run, tmp_path, "--grid", "steps=20,40")
    assert [(c["steps"], c["eval_every"]) for c in steps] == [(20, 20), (40, 30)]
    teachers = _configs(sweeps_run, tmp_path, "--grid", "teacher_size=small")  # labels stay strings; scratch partner
    assert [(c["teacher_size"], c["teacher"], c["d_coef"]) for c in teachers] == [("small", "s.pt", 0.45),
                                                                                 ("large", "l.pt", 0.0)]
    quant = _configs(sweeps_run, tmp_path, "--grid", "quant=fp32,int8")
    assert [c["quant_modes"] for c in quant] == [["fp32", "int8"]]


def test_crossed_grids_run_the_product_with_one_scratch_partner(sweeps_run, tmp_path):
    from sweeps.grids import parse_grids, specs_swept_keys

    configs = _configs(sweeps_run, tmp_path, "--grid", "d_coef", "--grid", "teacher_size")
    points = [(c["d_coef"], c["teacher_size"]) for c in configs]
    assert points[0] == (0.0, "large")  # the scratch student once: it uses no teacher
    assert sorted(points[1:]) == sorted((d, t) for d in (0.05, 0.1, 0.2, 0.4, 0.45, 0.6, 0.9) for t in ("small", "large"))
    assert all(c["ablation"] == "d_coef x teacher_size" for c in configs)
    assert specs_swept_keys(parse_grids(["d_coef", "teacher_size"])) == ["d_coef", "teacher_size"]

    configs = _configs(sweeps_run, tmp_path, "--grid", "teacher_size", "--grid", "batch_size=16,32")
    assert sorted((c["d_coef"], c["teacher_size"] if c["d_coef"] else "-", c["batch_size"]) for c in configs) == \
        sorted([(0.45, t, b) for t in ("small", "large") for b in (16, 32)] + [(0.0, "-", 16), (0.0, "-", 32)])
    # the user's d_coef values without 0: the teacher grid's scratch partner is kept
    configs = _configs(sweeps_run, tmp_path, "--grid", "d_coef=0.2", "--grid", "teacher_size")
    assert sorted((c["d_coef"], c["teacher_size"]) for c in configs) == [(0.0, "large"), (0.2, "large"), (0.2, "small")]


@pytest.mark.parametrize("args,fragment", [
    (["--grid", "d_coef=abc"], '--grid d_coef=abc: d_coef must be a number, got string "abc"'),
    (["--grid", "d_coef=0,-1"], "--grid d_coef=0,-1: d_coef must be >= 0, got -1.0"),
    (["--grid", "steps=2.5"], "--grid steps=2.5: steps must be an integer, got number 2.5"),
    (["--grid", "batch_size=0"], "--grid batch_size=0: batch_size must be >= 1"),
    (["--grid", "d_coef="], "--grid d_coef=: give comma-separated values"),
    (["--grid", "d_coef=0.2,0.2"], "value 0.2 given twice"),
    (["--grid", "warp=1,2"], "--grid warp=1,2: cannot give values for 'warp'"),
    (["--grid", "quant=fp7"], "unknown quantization mode 'fp7'"),
    (["--grid", "target=telepathy"], "unknown distillation target 'telepathy'"),
    (["--grid", "teacher_size=huge"], "--grid teacher_size=huge: no teacher labelled 'huge'"),
    (["--grid", "d_coef", "--grid", "d_coef=0.3"], "--grid d_coef given twice"),
    (["--grid", "paper", "--grid", "d_coef"], "cannot be crossed"),
])
def test_bad_user_grids_are_refused_in_one_line(sweeps_run, capsys, tmp_path, args, fragment):
    assert fragment in _refusal(sweeps_run, capsys, tmp_path, *args)


@pytest.mark.slow
def test_crossed_user_grid_sweep_shows_its_table_names_its_trials_and_logs_curves(tmp_path):
    out = tmp_path / "crossed"
    result = _run("--grid", "d_coef=0,0.4", "--grid", "teacher_size", "--preset", "smoke", "--seeds", "2",
                  "--out", str(out), "--set", 'quant_modes=["fp32"]')
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["swept"] == ["d_coef", "teacher_size"] and meta["grids"] == ["d_coef=0,0.4", "teacher_size"]
    assert meta["grid"] == "d_coef=0,0.4 x teacher_size" and meta["trials"] == 3
    rows = _rows(out)
    assert {(r["config"]["d_coef"], r["config"]["teacher_size"]) for r in rows} == {(0.0, "large"), (0.4, "small"),
                                                                                     (0.4, "large")}
    assert {r["config"]["seed"] for r in rows} == {1, 2}
    # the progress table: the swept values, seeds, step and score as columns; no config dicts
    header = [line for line in result.stdout.splitlines() if line.startswith("| Trial name")][-1]  # the last table
    assert [c.strip() for c in header.strip("|").split("|")][3:] == ["d_coef", "teacher_size", "seeds", "members", "step",
                                                                    "score", "loss"]
    output = result.stdout + result.stderr
    assert "snapshotting" not in output and "ignoring passed-in ProgressReporter" not in output
    dirs = {p.name.rsplit("_", 2)[0]: p for p in (out / "ray" / "sweep").iterdir() if p.is_dir()}
    assert set(dirs) == {"d_coef=0,teacher_size=none,seeds=1-2", "d_coef=0.4,teacher_size=small,seeds=1-2",
                         "d_coef=0.4,teacher_size=large,seeds=1-2"}
    tasks = meta["tasks"]
    for path in dirs.values():  # `tensorboard --logdir OUT` reads these
        scalars = _event_scalars(path)
        for key in ("consistency", "reward", "value", "pi_loss", "distill", "grad_norm", "lr", "updates_per_s"):
            assert [step for step, _ in scalars[f"ray/tune/train/{key}"]] == [10, 20, 30, 40, 50, 60], key
        assert [step for step, _ in scalars["ray/tune/eval/score"]] == [30, 60]
        assert all(f"ray/tune/eval/{task}" in scalars for task in tasks)

    again = _run("--grid", "d_coef", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--resume", timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --resume at {out}: --grid d_coef here, --grid d_coef=0,0.4 --grid teacher_size in the sweep being "
        "resumed; resume with the sweep's own arguments, or start a new sweep in another --out"]


def test_search_space_is_the_users_and_is_checked_in_one_line():
    from agent.errors import ConfigError
    from sweeps.space import DEFAULT_SPACE, corner_points, parse_space

    dims = parse_space(["d_coef=uniform:0:0.9", "batch_size=choice:128,512", "steps=randint:100:400"])
    assert [(d.key, d.kind, d.values) for d in dims] == [("d_coef", "uniform", (0.0, 0.9)),
                                                         ("batch_size", "choice", (128, 512)),
                                                         ("steps", "randint", (100, 400))]
    assert len(corner_points(dims)) == 8 and {"d_coef": 0.9, "batch_size": 512, "steps": 399} in corner_points(dims)
    assert [d.key for d in parse_space(None)] == [item.split("=")[0] for item in DEFAULT_SPACE]
    for bad, fragment in (("d_coef=normal:0:1", "KIND one of"), ("warp=uniform:0:1", "unknown setting 'warp'"),
                          ("lr=loguniform:0:1e-3", "LOW > 0"), ("d_coef=uniform:1:0", "LOW < HIGH"),
                          ("batch_size=choice:128,abc", "batch_size must be"), ("d_coef=uniform:-1:1", "d_coef")):
        with pytest.raises(ConfigError, match=fragment):
            parse_space([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_space(["lr=loguniform:1e-4:1e-3", "lr=uniform:1e-4:1e-3"])


@pytest.mark.parametrize("args,fragment", [
    (["--space", "d_coef=uniform:0:1"], "add --search optuna"),
    (["--search", "optuna", "--space", "d_coef=gauss:0:1"], "KIND one of"),
])
def test_bad_search_space_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, args, fragment):
    import ray

    from sweeps import run

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    assert run.main(["--preset", "smoke", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "out").exists()


# -- issue 17 item 7: object storage (an S3-compatible server of the test's own: moto's server mode)

def _member_row(seed: int, step: int, score: float = 1.0) -> dict:
    return {"trial_id": "t", "config": {"seed": seed, "d_coef": 0.2}, "phase": "train", "quant": "fp32", "step": step,
            "status": "ok", "score": score}


def _bucket_rows(s3, bucket: str, key: str) -> list[dict]:
    data = s3.get(bucket, key)
    return [] if data is None else [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def test_remote_out_is_staged_outside_the_checkout_mirrored_to_the_store_and_checked(sweeps_run, capsys, monkeypatch,
                                                                                    tmp_path):
    """A remote OUT without Ray: the staging copy's place, the endpoint in the environment or in the
    URI, refusals before Ray starts, results.jsonl mirrored as rows arrive, sweep.json and --resume
    read from the store, and a driver on another machine continuing from the store's files."""
    import pickle

    from sweeps import storage
    from sweeps.results import read_rows, write_rows, write_sweep_meta
    from sweeps.tune_adapter import StreamRows
    from s3_server import moto_s3

    with moto_s3(tmp_path / "moto.log") as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
        s3.create_bucket("sweeps")
        out, in_uri = "s3://sweeps/d_coef", "s3://sweeps/d_coef" + s3.query  # endpoint: environment / URI
        staging = tmp_path / "cache" / "remote" / "s3" / "sweeps" / "d_coef"
        assert sweeps_run._local_out(out) == sweeps_run._local_out(in_uri) == staging
        assert sweeps_run._storage(in_uri) == (True, "s3://sweeps/d_coef/ray" + s3.query)  # the query stays last
        monkeypatch.delenv("DISTILL_CACHE")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert sweeps_run._local_out(out) == tmp_path / "home/.cache/distill-sweeps/remote/s3/sweeps/d_coef"
        monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
        assert REPO not in staging.parents

        # refused in one line before Ray starts: a bucket that is not there, nothing to resume
        assert "--out s3://nobucket/x: no bucket 'nobucket'" in _refusal(sweeps_run, capsys, tmp_path, "--out",
                                                                           "s3://nobucket/x")
        assert _refusal(sweeps_run, capsys, tmp_path, "--out", in_uri, "--resume") == (
            "error: --resume: nothing to resume at s3://sweeps/d_coef (no Tune experiment state in it); drop --resume "
            "to start the sweep there")

        # the sweep as started here (checked while the store holds none of its rows)
        own = ["--preset", "smoke", "--grid", "d_coef"]
        parsed = sweeps_run.build_parser().parse_args(["--out", in_uri, *own])
        base, _ = sweeps_run.validate_args(parsed)

        # rows: the first report is uploaded at once, later ones at most every few seconds and at the end
        stream = StreamRows(tmp_path / "another-machine", remote=in_uri)  # the staging copy is recomputed here
        stream.on_trial_result(0, [], None, {"row_json": json.dumps([_member_row(1, 10), _member_row(2, 10)])})
        assert stream.out == staging
        assert [(r["config"]["seed"], r["step"]) for r in _bucket_rows(s3, "sweeps", "d_coef/results.jsonl")] == \
            [(1, 10), (2, 10)]
        stream.on_trial_result(0, [], None, {"row_json": json.dumps([_member_row(1, 10, 9.0), _member_row(1, 20)])})
        assert len(read_rows(staging)) == 3
        stream.on_experiment_end([])
        rows = _bucket_rows(s3, "sweeps", "d_coef/results.jsonl")
        assert [(r["config"]["seed"], r["step"], r["score"]) for r in rows] == [(1, 10, 1.0), (2, 10, 1.0), (1, 20, 1.0)]
        restored = pickle.loads(pickle.dumps(stream))
        assert (restored.remote, restored.stream, restored.mirror) == (in_uri, None, None)

        # sweep.json in the store: --resume is checked against it (the staging copy is not consulted)
        write_sweep_meta(staging, {**sweeps_run.sweep_identity(parsed, base), "created": "then"})
        storage.upload_results(staging, in_uri, report=False)
        s3.put("sweeps", "d_coef/ray/sweep/" + sweeps_run.TUNER_STATE, b"")
        (staging / "sweep.json").unlink()
        assert "--resume at s3://sweeps/d_coef: --seeds 2 here, --seeds 1 in the sweep being resumed" in \
            _refusal(sweeps_run, capsys, tmp_path, "--out", out, "--resume", *own, "--seeds", "2")
        sweeps_run.validate_args(sweeps_run.build_parser().parse_args(["--out", out, "--resume", *own]))
        # a new sweep (no --resume) into that OUT is refused: the store holds its rows and Tune state
        assert "already holds a sweep (3 result rows and Tune state): --resume continues it" in \
            _refusal(sweeps_run, capsys, tmp_path, "--out", out, *own)

        # the sweep's Tuner streams rows to the store; a restored one is pointed at this command's --out
        from ray import tune

        configs = sweeps_run.trial_configs(parsed, base, {"large": "t.pt", "small": "s.pt"}, "large", {})
        tuner = sweeps_run._new_tuner(parsed, tune.with_resources(lambda config: None, {"cpu": 1}), configs, base,
                                      sweeps_run._storage(in_uri)[1], staging)
        [callback] = tuner._local_tuner.get_run_config().callbacks
        assert (callback.out, callback.remote) == (staging, in_uri)
        sweeps_run._retarget_rows(tuner, staging, out)
        assert (callback.out, callback.remote) == (staging, out)

        # a driver elsewhere (another cache) starts from the store's files; a stale copy of another
        # sweep is replaced, a copy of the same sweep keeps the rows it wrote after the last upload
        elsewhere = tmp_path / "elsewhere"
        write_rows(elsewhere, [_member_row(7, 10)])
        storage.download_results(in_uri, elsewhere)
        assert read_rows(elsewhere) == rows and (elsewhere / "sweep.json").read_bytes() == \
            s3.get("sweeps", "d_coef/sweep.json")
        write_rows(elsewhere, rows + [_member_row(2, 20)])
        storage.download_results(in_uri, elsewhere)
        assert read_rows(elsewhere)[-1] == _member_row(2, 20) and len(read_rows(elsewhere)) == 4
        empty = tmp_path / "empty"
        write_rows(empty, rows)
        storage.download_results("s3://sweeps/nothing-here" + s3.query, empty)
        assert not (empty / "results.jsonl").exists()

        # the end of a sweep: the result files and the report go to the store, the inputs stay here
        (staging / "report" / "tables").mkdir(parents=True)
        (staging / "report" / "report.md").write_text("# report\n")
        (staging / "report" / "tables" / "d_coef.md").write_text("| d_coef |\n")
        (staging / "_setup").mkdir()
        (staging / "_setup" / "teacher.pt").write_bytes(b"x")
        storage.upload_results(staging, in_uri)
        assert [k for k in s3.keys("sweeps", "d_coef/") if not k.endswith("/") and "/ray/" not in k] == [
            "d_coef/report/report.md", "d_coef/report/tables/d_coef.md", "d_coef/results.jsonl", "d_coef/sweep.json"]

        # a trial's last checkpoint, stored by Tune in the bucket: its students are copied to OUT/students/<trial_id>/
        import types

        from ray import tune

        checkpoint_key = "d_coef/ray/sweep/d_coef=0.2_t/checkpoint_000002"
        for name in ("trainer.pt", "students/seed-1/fp32.pt", "students/seed-1/fp16.pt"):
            s3.put("sweeps", f"{checkpoint_key}/{name}", name.encode())
        fs, _ = storage.filesystem(in_uri)
        stream.on_checkpoint(0, [], types.SimpleNamespace(trial_id="t"), tune.Checkpoint(f"sweeps/{checkpoint_key}", fs))
        assert [k for k in s3.keys("sweeps", "d_coef/students/") if not k.endswith("/")] == [
            "d_coef/students/t/seed-1/fp16.pt", "d_coef/students/t/seed-1/fp32.pt"]
        assert s3.get("sweeps", "d_coef/students/t/seed-1/fp16.pt") == b"students/seed-1/fp16.pt"
        assert not (staging / "students").exists()  # the store holds them, not the staging copy


def _row_key(row: dict) -> tuple:
    return row["trial_id"], row["config"]["seed"], row["phase"], row["quant"], row["step"], row["status"]


@pytest.mark.slow
def test_sweep_in_an_s3_bucket_survives_a_killed_driver_and_resumes_and_reports_from_the_bucket(tmp_path):
    """--out s3://... on a local S3-compatible server: Tune's storage in the bucket, rows streamed to
    it, the driver killed (its process group, which holds Ray's processes too) once rows are there,
    --resume (the endpoint given in the URI the first time, in the environment the second), then
    the report built from the bucket's copy and straight from the bucket."""
    from s3_server import moto_s3

    with moto_s3(tmp_path / "moto.log") as s3:
        s3.create_bucket("sweeps")
        cache = tmp_path / "cache"
        env = {**os.environ, "MUJOCO_GL": "disable", "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local",
               "DISTILL_CACHE": str(cache), "HOME": str(tmp_path / "home"), **s3.env(endpoint=False)}
        args = ["--grid", "d_coef", "--preset", "smoke"]
        with open(tmp_path / "first.out", "w") as stdout, open(tmp_path / "first.err", "w") as stderr:
            driver = subprocess.Popen([*RUN, *args, "--out", "s3://sweeps/x" + s3.query], env=env, cwd=REPO,
                                      stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while len(_bucket_rows(s3, "sweeps", "x/results.jsonl")) < 4:  # a few trials' first evaluations
                assert driver.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "no rows in the bucket after 10 minutes"
                time.sleep(1)
            assert "x/ray/sweep/tuner.pkl" in s3.keys("sweeps", "x/ray/")
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started: Ray included
            driver.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _process_group(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _process_group(driver.pid)
        before = _bucket_rows(s3, "sweeps", "x/results.jsonl")
        meta = s3.get("sweeps", "x/sweep.json")
        assert 0 < len(before) < 8 * 2 * 2 and json.loads(meta)["grid"] == "d_coef"  # killed partway

        again = _run(*args, "--out", "s3://sweeps/x", "--resume", timeout=900, DISTILL_CACHE=str(cache),
                     HOME=str(tmp_path / "home"), **s3.env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert "results: s3://sweeps/x/results.jsonl" in again.stdout
        assert "Failed to fetch metrics" not in again.stderr
        rows = _bucket_rows(s3, "sweeps", "x/results.jsonl")
        keys = [_row_key(r) for r in rows]
        assert len(keys) == len(set(keys)) == 8 * 2 * 2  # 8 trials x (2 train + 2 final evaluations), once each
        assert {_row_key(r) for r in before} <= set(keys)
        assert sorted({r["config"]["d_coef"] for r in rows}) == [0.0, 0.05, 0.1, 0.2, 0.4, 0.45, 0.6, 0.9]
        assert all(r["status"] == "ok" for r in rows)
        assert s3.get("sweeps", "x/sweep.json") == meta  # the resumed sweep keeps its record
        # every trial's students in the bucket, whichever driver saw the trial end
        students = [k for k in s3.keys("sweeps", "x/students/") if k.endswith(".pt")]
        assert sorted(students) == sorted(f"x/students/{r['trial_id']}/seed-{r['config']['seed']}/{r['quant']}.pt"
                                          for r in rows if r["phase"] == "final")
        assert "students: s3://sweeps/x/students/<trial_id>/seed-<seed>/<quant>.pt" in again.stdout
        assert "x/report/report.md" in s3.keys("sweeps", "x/report/")
        staging = cache / "remote" / "s3" / "sweeps" / "x"
        assert (staging / "results.jsonl").read_bytes() == s3.get("sweeps", "x/results.jsonl")
        assert not (REPO / "runs" / ".remote" / "sweeps" / "x").exists()

        copy = tmp_path / "copy"  # the bucket's result files, downloaded: all a report needs
        copy.mkdir()
        for name in ("sweep.json", "results.jsonl"):
            (copy / name).write_bytes(s3.get("sweeps", f"x/{name}"))
        report = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), str(copy)], capture_output=True,
                                text=True, timeout=300, cwd=tmp_path)
        assert report.returncode == 0, report.stderr[-3000:]
        text = (copy / "report" / "report.md").read_text()
        assert "| d_coef | score |" in text and "runs (trial × seed): 8 (0 failed)" in text
        direct = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), "s3://sweeps/x" + s3.query,
                                 "--out", str(tmp_path / "direct")], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env={**os.environ, **s3.env(endpoint=False)})
        assert direct.returncode == 0, direct.stderr[-3000:]
        assert (tmp_path / "direct" / "report.md").read_text() == text


def test_trials_that_would_leave_a_second_round_half_empty_share_the_cpus():
    from sweeps.run import trial_cpus

    assert trial_cpus(None, 3, 2.0, 0.0, None) == 0.666  # 3 at once on 2 CPUs (3 x 0.666 fits)
    assert 3 * trial_cpus(None, 3, 2.0, 0.0, None) <= 2.0
    assert trial_cpus(None, 5, 4.0, 0.0, None) == 0.8
    assert trial_cpus(None, 4, 2.0, 0.0, None) == 1.0  # whole rounds: one CPU each
    assert trial_cpus(None, 2, 2.0, 0.0, None) == 1.0
    assert trial_cpus(None, 8, 2.0, 0.0, None) == 1.0
    assert trial_cpus(None, 3, 2.0, 0.5, None) == 1.0  # GPU trials and clusters keep one CPU each
    assert trial_cpus(None, 3, 2.0, 0.0, "auto") == 1.0
    assert trial_cpus(1.5, 3, 2.0, 0.0, None) == 1.5  # what the user asks for
