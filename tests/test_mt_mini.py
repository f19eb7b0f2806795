"""MT-mini: the shipped assets are consistent, the recipe runs end to end and resumes, the dataset
cache is built once, and re-evaluating a teacher reproduces its manifest score."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from agent.mt_mini import benchmark as mt_mini
from agent.mt_mini.recipe import RecipeConfig, TeacherRecipe, build, stage_names, store_sha256
from agent.checkpoint import load_world_model
from agent.data import EpisodeStore
from agent.errors import ConfigError

TINY_TASKS = ("cartpole-balance", "cup-catch")


def tiny_recipe() -> RecipeConfig:
    """Minimal step budgets: 3 ten-step episodes per task, 3 updates per teacher, 1 eval episode."""
    return RecipeConfig(tasks=TINY_TASKS, episode_steps=10, online_steps=30, online_seed_steps=10,
                        teachers=(TeacherRecipe("small", dict(enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2), 3),
                                  TeacherRecipe("large", dict(enc_dim=64, mlp_dim=64, latent_dim=32, task_dim=8, num_q=2), 3)),
                        eval_episodes=1)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("mt-mini-build")
    build(tiny_recipe(), out, log=lambda msg: None)
    return out


# -- shipped assets -----------------------------------------------------------------------------

def test_shipped_manifest_names_loadable_teachers_matching_it():
    m = mt_mini.manifest()
    assert m["benchmark"] == "mt-mini" and m["tasks"] == mt_mini.mt_mini_tasks()
    assert len(m["tasks"]) >= 2
    for size in mt_mini.TEACHER_SIZES:
        entry = m["teachers"][size]
        model = load_world_model(mt_mini.teacher_path(size))
        assert model.cfg.tasks == m["tasks"]
        assert (model.cfg.obs_dim, model.cfg.action_dim) == (m["obs_dim"], m["action_dim"])
        for name, value in entry["dims"].items():
            assert getattr(model.cfg, name) == value, (size, name)
        assert model.num_parameters() == entry["params"]
        assert set(entry["task_scores"]) == set(m["tasks"])
    assert m["teachers"]["large"]["params"] > m["teachers"]["small"]["params"]
    student = mt_mini.student_config()
    assert student.tasks == m["tasks"]
    from agent.world_model import WorldModel
    # student : small teacher : large teacher at least 1 : 10 : 50 (the paper: 1 : 48 : 317)
    student_params = WorldModel(student).num_parameters()
    assert m["teachers"]["small"]["params"] >= 10 * student_params
    assert m["teachers"]["large"]["params"] >= 50 * student_params


def test_shipped_large_teacher_is_worth_distilling_and_the_small_one_is_weaker():
    m = mt_mini.manifest()
    large, small = m["teachers"]["large"], m["teachers"]["small"]
    assert m["evaluation"]["episodes"] >= 10
    assert all(len(v) == m["evaluation"]["episodes"] for v in large["episode_scores"].values())
    assert min(large["task_scores"].values()) >= 0.5 * m["score_max"]  # every task at least 50% of the maximum
    assert large["score"] >= 0.6 * m["score_max"]                      # and 60% on average
    assert small["score"] < large["score"]


def test_shipped_teachers_beat_an_untrained_model():
    m = mt_mini.manifest()
    assert m["teachers"]["large"]["score"] > m["baselines"]["untrained"]["score"]
    for stage in m["stages"]:
        assert stage["command"].startswith("python") and stage["wall_s"] >= 0 and "seed" in stage


def test_unknown_teacher_size_is_one_clear_error():
    with pytest.raises(mt_mini.MiniBenchmarkError, match="small"):
        mt_mini.teacher_path("medium")


# -- recipe -------------------------------------------------------------------------------------

def test_tiny_build_completes_and_resumes_without_repeating_work(tiny_build: Path):
    cfg = tiny_recipe()
    m = json.loads((tiny_build / "MANIFEST.json").read_text())
    assert (tiny_build / "MANIFEST.md").read_text().startswith("# MT-mini")
    assert [s["name"] for s in m["stages"]] == stage_names(cfg)
    assert m["tasks"] == list(TINY_TASKS)
    for size in ("small", "large"):
        model = load_world_model(mt_mini.teacher_path(size, tiny_build))
        assert model.cfg.tasks == list(TINY_TASKS)
    records = sorted((tiny_build / "work" / "stages").glob("*.json"))
    assert len(records) == len(stage_names(cfg))
    before = {p.name: p.read_text() for p in records}

    messages: list[str] = []
    again = build(cfg, tiny_build, log=messages.append)
    assert {p.name: p.read_text() for p in records} == before  # no stage re-ran
    assert sum("skipping" in msg for msg in messages) == len(stage_names(cfg))
    assert again["teachers"] == m["teachers"]


def test_changed_budget_reruns_only_the_affected_stage(tiny_build: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "build"
    shutil.copytree(tiny_build, copy)
    cfg = tiny_recipe()
    teachers = (cfg.teachers[0], TeacherRecipe(**{**cfg.teachers[1].__dict__, "steps": 4}))
    messages: list[str] = []
    m = build(RecipeConfig(**{**cfg.__dict__, "teachers": teachers}), copy, log=messages.append)
    ran = [msg[3:].rsplit(": ", 1)[0] for msg in messages if msg.endswith(": running")]
    assert ran == ["teacher:large", "eval:teacher-large"]
    assert m["teachers"]["large"]["steps"] == 4


def test_build_from_a_finished_build_reruns_only_what_changed(tiny_build: Path, tmp_path: Path):
    # a fresh work directory: no online replay, only the finished build's data, teachers and manifest
    cfg = tiny_recipe()
    small = TeacherRecipe("small", dict(enc_dim=48, mlp_dim=48, latent_dim=16, task_dim=8, num_q=2), 3)
    messages: list[str] = []
    out = tmp_path / "rebuilt"
    m = build(RecipeConfig(**{**cfg.__dict__, "teachers": (small, cfg.teachers[1])}), out,
              seed_from=tiny_build, log=messages.append)
    ran = [msg[3:].rsplit(": ", 1)[0] for msg in messages if msg.endswith(": running")]
    assert ran == ["teacher:small", "eval:teacher-small"]
    before = json.loads((tiny_build / "MANIFEST.json").read_text())
    assert m["teachers"]["small"]["dims"] == small.dims
    assert m["teachers"]["small"]["params"] > before["teachers"]["small"]["params"]
    assert m["teachers"]["large"] == before["teachers"]["large"]
    assert (out / "teacher-large.pt").read_bytes() == (tiny_build / "teacher-large.pt").read_bytes()
    assert m["baselines"] == before["baselines"] and m["task_selection"] == before["task_selection"]
    assert m["data"]["sha256"] == before["data"]["sha256"]
    carried = {s["name"]: s for s in before["stages"] if not s["name"].endswith("small")}
    assert [s["name"] for s in m["stages"] if s["name"] not in carried] == ["teacher:small", "eval:teacher-small"]
    for stage in m["stages"]:
        if stage["name"] in carried:
            assert stage == carried[stage["name"]], stage["name"]  # command, wall time, finish time, results


def test_build_from_refuses_what_is_not_a_finished_build(tiny_build: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert mt_mini.main(["build", "--from", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --from") and "no MANIFEST.json" in err[0]
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_build, damaged)
    reward = next((damaged / "data").glob("reward*.npy"))
    reward.write_bytes(reward.read_bytes()[:-4] + b"\0\0\0\1")
    assert mt_mini.main(["build", "--from", str(damaged), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the sha256" in err[0]
    assert not out.exists()  # refused before anything was written


# -- dataset ------------------------------------------------------------------------------------

def test_ensure_dataset_copies_the_pooled_replay_once_and_checks_it(tiny_build: Path, tmp_path: Path):
    m = mt_mini.manifest(tiny_build)
    cfg = tiny_recipe()
    first = mt_mini.ensure_dataset(tmp_path, progress=False, directory=tiny_build)
    store = EpisodeStore(first)
    episodes_per_task = -(-cfg.online_steps // cfg.episode_steps)
    assert store.num_episodes == m["data"]["episodes"] == episodes_per_task * len(TINY_TASKS)
    assert store.tasks == list(TINY_TASKS) and store.episode_length == cfg.episode_steps + 1
    # task by task, each task's online run from its first (random) episode to its last
    assert store.task.tolist() == [0] * episodes_per_task + [1] * episodes_per_task
    assert m["data"]["sha256"] == store_sha256(first) and m["data"]["transitions"] == store.num_episodes * cfg.episode_steps
    uid = store.uid
    second = mt_mini.ensure_dataset(tmp_path, progress=False, directory=tiny_build)
    assert second == first and EpisodeStore(second).uid == uid
    # a damaged shipped copy is refused with one clear error, nothing half-copied is left
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_build, damaged)
    reward = next((damaged / "data").glob("reward*.npy"))
    reward.write_bytes(reward.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ConfigError, match="checksum differs"):
        mt_mini.ensure_dataset(tmp_path / "other", progress=False, directory=damaged)
    assert not any((tmp_path / "other").glob("pool-*"))


def test_dataset_cache_root_follows_env(monkeypatch, tmp_path: Path):
    from agent.mt_mini.dataset import default_cache_root

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "mt-mini"
    monkeypatch.delenv("DISTILL_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "distill-sweeps" / "mt-mini"


# -- reproduction -------------------------------------------------------------------------------

def test_verify_step_reproduces_a_tiny_build_score(tiny_build: Path):
    result = mt_mini.verify_step("eval:teacher-large", tiny_build, log=lambda msg: None)
    assert result["ok"], result


def test_verify_step_retrains_a_teacher_from_the_published_data(tiny_build: Path, tmp_path: Path):
    # no work directory beside the build (like the shipped assets): the teacher trains on data/
    copy = tmp_path / "build"
    shutil.copytree(tiny_build, copy, ignore=shutil.ignore_patterns("work"))
    result = mt_mini.verify_step("teacher:large", copy, log=lambda msg: None)
    assert result["ok"] and result["measured"] == pytest.approx(result["expected"], abs=1e-4), result


@pytest.mark.slow
def test_shipped_teacher_reevaluation_matches_manifest():
    torch.set_num_threads(1)
    result = mt_mini.verify_step("eval:teacher-large", log=lambda msg: None)
    assert result["ok"], result
