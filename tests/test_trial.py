"""One trial without Ray: a setting's seeds train as one population, one row per member and
evaluation; a diverged member leaves, the others finish; a restored trial continues."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from agent.errors import ConfigError
from sweeps.config import preset_config
from sweeps.setup import resolve_inputs
from sweeps.results import STUDENTS_DIR, student_file
from sweeps.trial import MEMBERS_FILE, TRAINER_FILE, TrialContext, run_trial


@pytest.fixture(scope="module")
def smoke_inputs(tmp_path_factory):
    return resolve_inputs("smoke", [], None, tmp_path_factory.mktemp("setup"))


def _config(inputs, **overrides):
    values = dict(data=inputs.data, teacher=inputs.teachers["large"], num_seeds=3, steps=20, eval_every=10,
                  quant_modes=["fp32"], d_coef=0.45)
    return preset_config("smoke").with_overrides({**values, **overrides})


class Collect:
    def __init__(self, keep_checkpoint: Path | None = None):
        self.reports: list[list[dict]] = []
        self.keep = keep_checkpoint
        self.with_students: list[int] = []  # the reports whose checkpoint holds students/

    def __call__(self, rows, checkpoint_dir):
        self.reports.append(rows)
        if checkpoint_dir is not None and (checkpoint_dir / STUDENTS_DIR).is_dir():
            self.with_students.append(len(self.reports) - 1)
        if checkpoint_dir is not None and self.keep is not None:
            for name in (TRAINER_FILE, MEMBERS_FILE):
                (self.keep / name).write_bytes((checkpoint_dir / name).read_bytes())
            if (checkpoint_dir / STUDENTS_DIR).is_dir():
                shutil.copytree(checkpoint_dir / STUDENTS_DIR, self.keep / STUDENTS_DIR, dirs_exist_ok=True)

    @property
    def rows(self):
        return [r for rows in self.reports for r in rows]


def test_trial_trains_its_seeds_as_one_population_with_a_row_per_member(smoke_inputs):
    collect = Collect()
    run_trial(_config(smoke_inputs), TrialContext("t1"), collect)
    train = [r for r in collect.rows if r["phase"] == "train"]
    assert [(r["step"], r["config"]["seed"]) for r in train] == [(10, 1), (10, 2), (10, 3), (20, 1), (20, 2), (20, 3)]
    assert all(r["executor"] == "population" and r["members"] == 3 for r in train)
    assert all(r["eval_se"] is None and math.isfinite(r["score"]) for r in train)  # smoke: 1 episode per task
    # the members are different students: different seeds, different weights, different scores
    assert len({round(r["score"], 6) for r in train if r["step"] == 20}) > 1
    final = [r for r in collect.rows if r["phase"] == "final"]
    assert sorted(r["config"]["seed"] for r in final) == [1, 2, 3] and all(r["quant"] == "fp32" for r in final)


def test_one_student_on_cpu_trains_in_the_single_student_trainer(smoke_inputs, tmp_path):
    """A one-seed trial on CPU runs the single-student Trainer (its fused update is faster than a
    population of one): its rows say `separate`, and its student is the one a Trainer built
    directly with that seed trains."""
    from agent.train import offline_trainer
    from sweeps.trial import build_student, train_config

    cfg = _config(smoke_inputs, steps=10, num_seeds=1, d_coef=0.45, eval_at_start=False)
    collect = Collect(keep_checkpoint=tmp_path)
    run_trial(cfg, TrialContext("k1"), collect)
    train = [r for r in collect.rows if r["phase"] == "train"]
    assert [(r["step"], r["executor"], r["members"]) for r in train] == [(10, "separate", 1)]
    from agent.data import EpisodeStore
    tasks = list(EpisodeStore(cfg.data).manifest.tasks)
    direct = offline_trainer(build_student(cfg, tasks, 1), cfg.data, train_config(cfg), cfg.teacher)
    direct.train(10)
    saved = torch.load(tmp_path / TRAINER_FILE, weights_only=True)["members"][0]["model"]["model"]
    for name, value in direct.model.state_dict().items():
        assert torch.equal(saved[name], value), name
    # the library's choice, and the population of one that benchmarks ask for instead
    from agent.population import Population, SeparateMembers, offline_members
    one = offline_members([build_student(cfg, tasks, 1)], cfg.data, train_config(cfg), [1], cfg.teacher, log=lambda _: None)
    assert isinstance(one, SeparateMembers) and one.train(2)[0]["step"] == 2.0 and one.step == 2
    forced = offline_members([build_student(cfg, tasks, 1)], cfg.data, train_config(cfg), [1], cfg.teacher,
                             log=lambda _: None, population_of_one=True)
    assert isinstance(forced, Population) and forced.K == 1


def test_executor_choice_for_one_student():
    from agent.config import TrainConfig
    from agent.population import single_student_reason

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "single-student Trainer" in single_student_reason(1, TrainConfig(), cpu, "fp32")
    assert single_student_reason(2, TrainConfig(), cpu, "fp32") is None           # a population
    assert single_student_reason(1, TrainConfig(compile="on"), cpu, "fp32") is None  # only the population compiles
    assert single_student_reason(1, TrainConfig(), cuda, "fp32") is None          # CUDA: the population's paths
    assert single_student_reason(1, TrainConfig(), cpu, "bf16") is None


def test_diverged_member_leaves_and_the_others_finish(smoke_inputs):
    collect = Collect()
    run_trial(_config(smoke_inputs, fault_nan_at_step=12, fault_nan_seed=2), TrialContext("t2"), collect)
    errors = [r for r in collect.rows if r["status"] == "error"]
    assert [(r["config"]["seed"], r["step"]) for r in errors] == [(2, 13)]  # the first update from NaN weights and "diverged" in errors[0]["error"]
    finals = sorted(r["config"]["seed"] for r in collect.rows if r["phase"] == "final")
    assert finals == [1, 3]
    assert [r["config"]["seed"] for r in collect.rows if r["phase"] == "train" and r["step"] == 20] == [1, 3]


def test_restored_trial_continues_from_its_checkpoint(smoke_inputs, tmp_path):
    first = Collect(keep_checkpoint=tmp_path)
    cfg = _config(smoke_inputs, steps=10)
    run_trial(cfg, TrialContext("t3"), first)
    cfg20 = _config(smoke_inputs)
    resumed = Collect()
    run_trial(cfg20, TrialContext("t3", restore_dir=tmp_path), resumed)
    train = [r for r in resumed.rows if r["phase"] == "train"]
    assert [r["step"] for r in train] == [20, 20, 20] and all(r["restored_from"] == 10 for r in train)
    straight = Collect()
    run_trial(cfg20, TrialContext("t4"), straight)
    expect = {r["config"]["seed"]: r["score"] for r in straight.rows if r["phase"] == "train" and r["step"] == 20}
    assert {r["config"]["seed"]: r["score"] for r in train} == pytest.approx(expect, abs=1e-9)


def test_gpu_requests_this_machine_cannot_meet_are_refused(monkeypatch):
    import torch

    from sweeps.run import UsageError, check_cluster_gpus, check_local_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        check_local_gpus(0.25, preset_config("smoke"))
    with pytest.raises(UsageError, match="device=cuda needs --gpus-per-trial"):
        check_local_gpus(0, preset_config("smoke").with_overrides({"device": "cuda"}))
    check_local_gpus(0, preset_config("smoke"))  # CPU trials need nothing
    with pytest.raises(UsageError, match="the Ray cluster has 0 GPUs"):
        check_cluster_gpus(1, 0.0)
    check_cluster_gpus(0.25, 1.0)


def test_trial_device_follows_the_setting_and_the_gpus_ray_gave(monkeypatch):
    import torch

    from sweeps.trial import trial_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert trial_device(preset_config("smoke")).type == "cpu"
    assert trial_device(preset_config("smoke").with_overrides({"device": "cpu"})).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            trial_device(preset_config("smoke").with_overrides({"device": "cuda"}))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_population_trial_on_cuda_matches_cpu(smoke_inputs):
    cpu, cuda = Collect(), Collect()
    run_trial(_config(smoke_inputs, device="cpu", steps=10, num_seeds=2), TrialContext("c1"), cpu)
    run_trial(_config(smoke_inputs, device="cuda", steps=10, num_seeds=2), TrialContext("c2"), cuda)
    assert all(r["device"] == "cuda" for r in cuda.rows if r["phase"] == "train")
    # same seeds, same batches: scores agree up to float differences of the two devices
    for a, b in zip(cpu.rows, cuda.rows):
        assert a["config"]["seed"] == b["config"]["seed"]
        assert abs(a["score"] - b["score"]) < 2.0


def test_bf16_is_a_cuda_option(smoke_inputs):
    import torch

    from agent.errors import ConfigError

    if torch.cuda.is_available():
        collect = Collect()
        run_trial(_config(smoke_inputs, device="cuda", precision="bf16", steps=10, num_seeds=2), TrialContext("b1"), collect)
        train = [r for r in collect.rows if r["phase"] == "train"]
        assert [r["config"]["seed"] for r in train] == [1, 2] and all(r["status"] == "ok" for r in train)
    else:
        with pytest.raises(ConfigError, match="bf16 is a CUDA option"):
            run_trial(_config(smoke_inputs, device="cpu", precision="bf16", steps=10), TrialContext("b1"), Collect())


def test_final_fp32_row_equals_a_fresh_evaluation_of_the_saved_file(smoke_inputs, tmp_path):
    """The final fp32 row reuses the last training evaluation: it must be what evaluating the
    saved fp32 file gives."""
    from agent.checkpoint import load_world_model, save_world_model
    from agent.population import offline_members
    from sweeps.trial import _evaluate, build_student, train_config

    cfg = _config(smoke_inputs, steps=10, num_seeds=1, d_coef=0.0)
    collect = Collect(keep_checkpoint=tmp_path)
    run_trial(cfg, TrialContext("f1"), collect)
    final = [r for r in collect.rows if r["phase"] == "final"][0]
    from agent.data import EpisodeStore
    tasks = list(EpisodeStore(cfg.data).manifest.tasks)
    members = offline_members([build_student(cfg, tasks, 1)], cfg.data, train_config(cfg), [1], log=lambda _: None)
    members.load(tmp_path / TRAINER_FILE)
    path = save_world_model(members.member(0), tmp_path / "student.pt")
    fresh, = _evaluate([load_world_model(path)], cfg, tasks, [1], cfg.steps)
    assert final["task_scores"] == pytest.approx(fresh.task_scores, abs=1e-9)
    # the trial's kept fp32 student is that student
    kept = load_world_model(tmp_path / STUDENTS_DIR / student_file(1, "fp32")).state_dict()
    assert kept.keys() == members.member(0).state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in members.member(0).state_dict().items())


def test_the_trained_students_of_every_precision_go_with_the_last_report(smoke_inputs, tmp_path):
    """The last report's checkpoint holds students/seed-<seed>/<quant>.pt for every member and
    precision (and the training state, like every checkpoint): the very files whose size and
    evaluation the final rows report."""
    from agent.quantize import MIB

    collect = Collect(keep_checkpoint=tmp_path)
    run_trial(_config(smoke_inputs, steps=10, num_seeds=2, quant_modes=["fp32", "fp16"]), TrialContext("s1"), collect)
    assert collect.with_students == [len(collect.reports) - 1]
    students = tmp_path / STUDENTS_DIR
    assert sorted(str(p.relative_to(students)) for p in students.rglob("*.pt")) == [
        "seed-1/fp16.pt", "seed-1/fp32.pt", "seed-2/fp16.pt", "seed-2/fp32.pt"]
    final = [r for r in collect.rows if r["phase"] == "final"]
    assert len(final) == 4
    for row in final:
        path = students / student_file(row["config"]["seed"], row["quant"])
        assert row["size_mib"] == path.stat().st_size / MIB
        payload = torch.load(path, weights_only=True)
        dtypes = {t.dtype for t in payload["model"].values() if t.is_floating_point()}
        assert dtypes == ({torch.float16} if row["quant"] == "fp16" else {torch.float32})
    assert (tmp_path / MEMBERS_FILE).read_text() == "[1, 2]"


def test_eval_at_start_reports_the_untrained_members_first(smoke_inputs):
    """eval_at_start: one row per member at step 0, the evaluation of the untrained student of that
    seed, checkpointed like any other; training then goes on exactly as without it."""
    from agent.data import EpisodeStore
    from sweeps.trial import _evaluate, build_student

    cfg = _config(smoke_inputs, steps=10, eval_every=10, num_seeds=2, eval_at_start=True)
    collect = Collect()
    run_trial(cfg, TrialContext("s0"), collect)
    train = [r for r in collect.rows if r["phase"] == "train"]
    assert [(r["step"], r["config"]["seed"]) for r in train] == [(0, 1), (0, 2), (10, 1), (10, 2)]
    assert all(r["updates_per_s"] is None for r in train[:2]) and all(r["updates_per_s"] > 0 for r in train[2:])
    tasks = list(EpisodeStore(cfg.data).manifest.tasks)
    untrained = _evaluate([build_student(cfg, tasks, seed) for seed in (1, 2)], cfg, tasks, [1, 2], 0)
    assert [r["task_scores"] for r in train[:2]] == [u.task_scores for u in untrained]
    # evaluating (at start, or more often) leaves training as it is: same scores at step 10
    for eval_every in (10, 5):
        plain = Collect()
        run_trial(_config(smoke_inputs, steps=10, eval_every=eval_every, num_seeds=2), TrialContext("s1"), plain)
        assert [r["score"] for r in plain.rows if r["phase"] == "train" and r["step"] == 10] == [
            r["score"] for r in train[2:]], eval_every


def test_the_final_evaluation_uses_final_eval_episodes(smoke_inputs, monkeypatch):
    """Curve points use eval_episodes per task; the last step and quantized models use
    final_eval_episodes, and every row says how many episodes it averages."""
    import sweeps.trial as trial

    asked = []
    real = trial.evaluate_members

    def counting(models, tasks, episodes, *args, **kwargs):
        asked.append(episodes)
        return real(models, tasks, episodes, *args, **kwargs)

    monkeypatch.setattr(trial, "evaluate_members", counting)
    cfg = _config(smoke_inputs, steps=20, eval_every=10, num_seeds=1, d_coef=0.0, eval_episodes=1,
                  final_eval_episodes=2, quant_modes=["fp32", "fp16"])
    collect = Collect()
    run_trial(cfg, TrialContext("fe"), collect)
    assert asked == [1, 2, 2]  # step 10, step 20 (reused by the fp32 row), the fp16 model
    episodes = {(r["phase"], r["step"], r["quant"]): r["episodes"] for r in collect.rows}
    assert episodes == {("train", 10, "fp32"): 1, ("train", 20, "fp32"): 2, ("final", 20, "fp32"): 2,
                        ("final", 20, "fp16"): 2}
    with pytest.raises(ConfigError, match="final_eval_episodes must be >= 1"):
        cfg.with_overrides({"final_eval_episodes": 0}).validate()


def test_eval_se_is_the_standard_error_of_the_task_mean(smoke_inputs, monkeypatch):
    import pandas as pd

    import sweeps.trial as trial

    frame = pd.DataFrame({"task": ["a", "a", "a", "b", "b", "b"], "episode": [0, 1, 2, 0, 1, 2],
                          "return": [0.0] * 6, "score": [1.0, 2.0, 3.0, 10.0, 10.0, 13.0]})
    monkeypatch.setattr(trial, "evaluate_members", lambda models, *a, **k: [frame] * len(models))
    result, = trial._evaluate([None], _config(smoke_inputs), ["a", "b"], seeds=[1], step=1)
    # var_a = 1, var_b = 3 (ddof 1), 3 episodes: se = sqrt(1/3 + 3/3) / 2
    assert result.se == pytest.approx(math.sqrt(1 / 3 + 1) / 2)
    assert result.task_scores == {"a": 2.0, "b": 11.0}


def test_teacher_size_and_target_grids_carry_their_scratch_partner():
    from sweeps.grids import grid_points, swept_keys

    base = preset_config("quick")
    for grid in ("teacher_size", "target"):
        points = grid_points(grid, base, ["small", "large"])
        assert points[-1] == {"ablation": grid, "d_coef": 0.0}
        assert all(p.get("d_coef", base.d_coef) > 0 for p in points[:-1])
        assert swept_keys(grid) == [grid, "d_coef"]


def test_row_stream_appends_as_reported_and_never_duplicates(tmp_path):
    import json

    from sweeps.results import RESULTS_FILE, RowStream

    def row(seed, step, score):
        return {"trial_id": "t", "config": {"seed": seed}, "phase": "train", "quant": "fp32", "step": step,
                "status": "ok", "score": score}

    stream = RowStream(tmp_path)
    stream.add_result({"row_json": json.dumps([row(1, 10, 1.0), row(2, 10, 2.0)])})
    on_disk = [json.loads(x) for x in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert [(r["config"]["seed"], r["step"]) for r in on_disk] == [(1, 10), (2, 10)]
    # a resumed driver re-reads the file; a re-reported row is kept once, the first copy wins
    again = RowStream(tmp_path)
    again.add([row(1, 10, 9.0), row(1, 20, 3.0)])
    on_disk = [json.loads(x) for x in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert [(r["config"]["seed"], r["step"], r["score"]) for r in on_disk] == [(1, 10, 1.0), (2, 10, 2.0), (1, 20, 3.0)]


def test_every_agent_training_setting_can_be_set_from_the_trial():
    from agent.errors import ConfigError
    from sweeps.run import list_settings

    cfg = preset_config("quick").with_overrides({"train.loss.rho": 0.7, "train.horizon": 5, "d_coef": 0.2})
    train = cfg.validate().train_config()
    assert (train.loss.rho, train.horizon, train.distill.d_coef, train.batch_size) == (0.7, 5, 0.2, cfg.batch_size)
    assert train.loss.consistency_coef == 20.0  # untouched entries keep the agent's defaults
    for bad, fragment in (({"train.horizon": 0}, "horizon"), ({"train.warp": 1}, "warp"),
                          ({"train.lr": 1e-3}, "set it as the trial setting 'lr'"),
                          ({"train.distill.d_coef": 0.3}, "set it as the trial setting 'd_coef'")):
        with pytest.raises(ConfigError, match=fragment):
            preset_config("quick").with_overrides(bad).validate()
    listing = list_settings("quick")
    assert "  train.loss.rho = 0.5" in listing and "  num_seeds = 5" in listing and "  train.lr = " not in listing
    assert '  train.lr_schedule = "constant"' in listing


class Events:
    """Both reporters of a trial, in the order they were called: ("rows", step) / ("metrics", step, metrics)."""

    def __init__(self):
        self.events: list[tuple] = []

    def rows(self, rows, checkpoint_dir):
        self.events.append(("rows", rows[0]["step"], rows))

    def metrics(self, step, metrics):
        self.events.append(("metrics", step, metrics))

    def logged(self):
        return [e for e in self.events if e[0] == "metrics"]


def test_training_metrics_are_reported_every_log_every_updates_averaged_over_members(smoke_inputs):
    quick = preset_config("quick")
    assert 10 <= quick.steps // quick.log_every <= 40  # a learning curve of ~20 points by default
    events = Events()
    cfg = _config(smoke_inputs, num_seeds=2, log_every=5)
    run_trial(cfg, TrialContext("m1"), events.rows, metrics=events.metrics)
    assert [e[1] for e in events.logged()] == [5, 10, 15, 20]
    # at an evaluation step the evaluation is reported first (a scheduler reading the score sees it)
    order = [(e[0], e[1]) for e in events.events
             if e[1] in (10, 20) and not (e[0] == "rows" and e[2][0]["phase"] == "final")]
    assert order == [("rows", 10), ("metrics", 10), ("rows", 20), ("metrics", 20)]
    for _, _, metrics in events.logged():
        for key in ("consistency", "reward", "value", "distill", "pi_loss", "total", "grad_norm", "updates_per_s"):
            assert math.isfinite(metrics[key]), key
        assert metrics["lr"] == cfg.lr and metrics["distill"] > 0  # d_coef 0.45: the teacher term trains
        assert sorted(metrics["seed"]) == ["1", "2"]
        assert metrics["total"] == pytest.approx((metrics["seed"]["1"]["total"] + metrics["seed"]["2"]["total"]) / 2)
        assert metrics["member_updates_per_s"] == pytest.approx(2 * metrics["updates_per_s"])
    # the rows are those of a trial without the metrics reporter (the seam is optional)
    plain = Collect()
    run_trial(cfg, TrialContext("m2"), plain)
    with_metrics = [r for e in events.events if e[0] == "rows" for r in e[2]]
    assert [(r["step"], r["config"]["seed"], r["score"]) for r in with_metrics] == \
        [(r["step"], r["config"]["seed"], r["score"]) for r in plain.rows]


def test_a_cosine_lr_schedule_spans_the_trials_updates(smoke_inputs):
    from agent.train import lr_factor

    cfg = preset_config("quick").with_overrides({"train.lr_schedule": "cosine", "steps": 3000}).validate()
    train = cfg.train_config()
    assert (train.lr_schedule, train.lr_schedule_steps) == ("cosine", 3000)
    pinned = preset_config("quick").with_overrides({"train.lr_schedule": "cosine", "train.lr_schedule_steps": 100})
    assert pinned.validate().train_config().lr_schedule_steps == 100  # an explicit span is kept
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, cosine, got 'linear'"):
        preset_config("quick").with_overrides({"train.lr_schedule": "linear"}).validate()
    # the lr logged at step s is the one the s-th update ran with, lr x lr_factor(s - 1): it follows the cosine
    events = Events()
    run_trial(_config(smoke_inputs, num_seeds=2, log_every=5, **{"train.lr_schedule": "cosine"}), TrialContext("c1"),
              events.rows, metrics=events.metrics)
    logged = {e[1]: e[2]["lr"] for e in events.logged()}
    schedule = _config(smoke_inputs, **{"train.lr_schedule": "cosine"}).train_config()
    assert logged == {step: pytest.approx(schedule.lr * lr_factor(schedule, step - 1)) for step in (5, 10, 15, 20)}
    assert logged[20] < 0.01 * schedule.lr < logged[5]


def test_training_metrics_leave_out_a_diverged_member(smoke_inputs):
    events = Events()
    run_trial(_config(smoke_inputs, fault_nan_at_step=12, fault_nan_seed=2, log_every=5), TrialContext("m3"),
              events.rows, metrics=events.metrics)
    logged = {step: metrics for _, step, metrics in events.logged()}
    assert sorted(logged) == [5, 10, 15, 20]
    assert sorted(logged[10]["seed"]) == ["1", "2", "3"] and sorted(logged[15]["seed"]) == ["1", "3"]
    assert all(math.isfinite(m["total"]) for m in logged.values())


def test_quick_preset_settings_are_pinned():
    """The quick preset's budget, sizes and grid were fixed on scratch students before any d_coef
    was compared; a change here changes what the README's measured figures mean."""
    from agent.mt_mini.benchmark import manifest
    from sweeps.grids import grid_points

    quick = preset_config("quick")
    assert quick.student_dims == dict(enc_dim=64, mlp_dim=64, latent_dim=32, task_dim=16, num_q=2)
    assert (quick.num_seeds, quick.steps, quick.batch_size, quick.lr) == (5, 3000, 256, 3e-3)
    assert (quick.eval_every, quick.eval_episodes, quick.final_eval_episodes, quick.eval_max_steps) == (1000, 1, 6, 200)
    assert quick.eval_at_start  # the curve starts at the untrained students (step 0): 4 points
    assert quick.train == {} and quick.train_config().compile == "auto"  # eager on CPU, compiled on CUDA
    assert 1 + quick.steps // quick.eval_every >= 4  # every learning curve has at least 4 points, step 0 included
    assert [p["d_coef"] for p in grid_points("d_coef", quick, [])] == [0.0, 0.45, 0.9]
    assert [(p.get("target"), p["d_coef"]) for p in grid_points("target", quick, []) if "d_coef" in p] == [(None, 0.0)]
    assert [p["target"] for p in grid_points("target", quick, []) if "target" in p] == [
        "reward", "latent_linear", "latent_pca"]  # the paper's target ablation, plus scratch
    assert len(grid_points("target", preset_config("paper"), [])) == 8  # every target, plus scratch
    assert [p["d_coef"] for p in grid_points("d_coef", preset_config("paper"), [])] == [
        0.0, 0.05, 0.1, 0.2, 0.4, 0.45, 0.6, 0.9]
    baseline = manifest()["baselines"]["untrained"]  # the MANIFEST's untrained student is the quick student
    assert baseline["dims"] == quick.student_dims and baseline["params"] == 66_875


def test_a_trial_trains_the_same_whether_or_not_it_built_the_teacher_cache(smoke_inputs, tmp_path):
    """Building the teacher-target cache loads (and so first initialises) a teacher, drawing from
    torch's global stream, which dropout then draws from: the trial that builds the cache must
    train exactly like one that finds it built."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(smoke_inputs.data, store, ignore=shutil.ignore_patterns("teacher_cache"))
    cfg = _config(smoke_inputs, data=str(store), steps=10, eval_every=10, num_seeds=2, d_coef=0.45,
                  student_dims=dict(enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2, dropout=0.1))
    runs = []
    for name in ("builds", "reads"):
        (tmp_path / name).mkdir()
        collect = Collect(keep_checkpoint=tmp_path / name)
        run_trial(cfg, TrialContext(name), collect)
        runs.append(torch.load(tmp_path / name / TRAINER_FILE, weights_only=True))
    assert (store / "teacher_cache").is_dir()
    built, read = (r["params"] if "params" in r else r for r in runs)
    for name, value in built.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, read[name]), name


def test_python_m_agent_evaluate_reproduces_a_kept_students_final_row(smoke_inputs, tmp_path, capsys):
    """A kept fp16 student, evaluated by `python -m agent.evaluate` with the trial's final
    evaluation settings (its seed, episodes, episode length and planner), scores exactly what its
    final row says; the printed score and standard error are those of the episodes it wrote."""
    import json

    import pandas as pd

    from agent.evaluate import main as evaluate_main

    cfg = _config(smoke_inputs, steps=10, num_seeds=2, quant_modes=["fp16"], final_eval_episodes=2)
    collect = Collect(keep_checkpoint=tmp_path)
    run_trial(cfg, TrialContext("e1"), collect)
    row = next(r for r in collect.rows if r["phase"] == "final" and r["config"]["seed"] == 2)
    planner = [f"--planner={k}={json.dumps(v)}" for k, v in cfg.eval_planner.items()]
    csv = tmp_path / "episodes.csv"
    path = tmp_path / STUDENTS_DIR / student_file(2, "fp16")
    capsys.readouterr()
    assert evaluate_main([str(path), "--seed", "2", "--episodes", str(cfg.episodes_at(cfg.steps)), "--max-steps",
                          str(cfg.eval_max_steps), *planner, "--csv", str(csv)]) == 0
    episodes = pd.read_csv(csv)
    assert len(episodes) == 2 * len(row["task_scores"]) and set(episodes["checkpoint"]) == {str(path)}
    means = episodes.groupby("task")["score"].mean().to_dict()
    assert means == pytest.approx(row["task_scores"], abs=1e-6)
    printed = capsys.readouterr().out
    assert f"normalized score {row['score']:.2f} ± {row['eval_se']:.2f}" in printed
    for task, score in row["task_scores"].items():
        assert f"{task}" in printed and f"{score:7.2f}" in printed
