"""MT30 environments against the reference rollouts of the official code (td-mpc-opt make_env)."""
from __future__ import annotations

import json

import mujoco
import numpy as np
import pytest

from agent.envs import (
    EPISODE_LENGTH, MT30, MT30_ACTION_DIM, MT30_OBS_DIM, EpisodeOverError, MetaWorldUnsupportedError, TaskSet,
    UnknownTaskError, action_dim, dm_control_names, make_env, make_multitask_env, obs_dim, pad_obs, unpad_action,
)
from agent.envs.custom import models
from agent.errors import ConfigError

TOL = 1e-5


def _key(task: str) -> str:
    return task.replace("-", "_")


@pytest.fixture(scope="module")
def fixture_meta(fixtures_dir):
    return json.loads((fixtures_dir / "fixtures.json").read_text())


@pytest.fixture(scope="module")
def rollouts(fixtures_dir):
    return dict(np.load(fixtures_dir / "env_rollouts.npz"))


@pytest.fixture(scope="module")
def full_episodes(fixtures_dir):
    return dict(np.load(fixtures_dir / "env_full_episode.npz"))


def _replay(task: str, seed: int, actions: np.ndarray):
    """Reset once, then step `actions`; returns obs (T+1, obs_dim), rewards (T,), done flags (T,)."""
    env = make_env(task, seed)
    obs, rewards, dones = [env.reset()], [], []
    for a in actions:
        o, r, terminated, truncated, _ = env.step(a)
        obs.append(o)
        rewards.append(r)
        dones.append(terminated or truncated)
    return env, np.stack(obs), np.asarray(rewards), np.asarray(dones)


def test_mt30_order_and_dims_match_official(fixture_meta):
    official = fixture_meta["mt30_tasks"]
    assert MT30 == [t["task"] for t in official]
    for t in official:
        assert (obs_dim(t["task"]), action_dim(t["task"])) == (t["obs_dim"], t["action_dim"])
        assert dm_control_names(t["task"]) == (t["dm_control_domain"], t["dm_control_task"])
    assert max(t["obs_dim"] for t in official) == MT30_OBS_DIM
    assert max(t["action_dim"] for t in official) == MT30_ACTION_DIM


@pytest.mark.parametrize("task", MT30)
def test_short_rollout_matches_official(task, rollouts, fixture_meta):
    """40 steps with fixed actions from the first reset (seed 1): obs and rewards to <= 1e-5."""
    k = _key(task)
    env, obs, rewards, dones = _replay(task, 1, rollouts[f"{k}__action"])
    spec = next(t for t in fixture_meta["mt30_tasks"] if t["task"] == task)
    assert (env.obs_dim, env.action_dim, env.max_episode_steps) == (spec["obs_dim"], spec["action_dim"], 500)
    assert obs.dtype == np.float32 and obs.shape == rollouts[f"{k}__obs"].shape
    np.testing.assert_allclose(obs, rollouts[f"{k}__obs"], rtol=0, atol=TOL)
    np.testing.assert_allclose(rewards, rollouts[f"{k}__reward_f64"], rtol=0, atol=TOL)
    np.testing.assert_array_equal(dones, rollouts[f"{k}__done"])


@pytest.mark.parametrize("task", MT30)
def test_full_episode_matches_official(task, full_episodes, fixture_meta):
    """A whole 500-step episode: obs/rewards to <= 1e-5, truncation exactly at step 500."""
    k = _key(task)
    env, obs, rewards, dones = _replay(task, 1, full_episodes[f"{k}__action"])
    np.testing.assert_allclose(obs, full_episodes[f"{k}__obs"], rtol=0, atol=TOL)
    np.testing.assert_allclose(rewards, full_episodes[f"{k}__reward_f64"], rtol=0, atol=TOL)
    np.testing.assert_array_equal(dones, full_episodes[f"{k}__done"])
    assert dones[-1] and not dones[:-1].any()
    official_sum = next(t["sum_reward"] for t in fixture_meta["files"]["env_full_episode.npz"]["per_task"]
                        if t["task"] == task)
    assert rewards.sum() == pytest.approx(official_sum, abs=1e-6)
    with pytest.raises(EpisodeOverError):
        env.step(full_episodes[f"{k}__action"][0])


def test_policy_episode_actions_replayed_through_multitask_env(fixtures_dir):
    """The official multitask env (all 30 sub-envs, seed 1, reset(task_idx)) fed the recorded
    policy actions reproduces the recorded padded observations and float32 rewards."""
    data = np.load(fixtures_dir / "policy_episodes.npz")
    env = make_multitask_env(MT30, seed=1)
    for task in ("walker-stand", "cartpole-balance", "reacher-easy", "cheetah-run"):
        k = _key(task)
        obs = [env.reset(MT30.index(task))]
        rewards = []
        for a in data[f"{k}__action"]:  # 6-dim; the env must use only the first action_dim entries
            o, r, *_ = env.step(a)
            obs.append(o)
            rewards.append(np.float32(r))
        np.testing.assert_allclose(np.stack(obs), data[f"{k}__obs"], rtol=0, atol=TOL)
        np.testing.assert_allclose(rewards, data[f"{k}__reward"], rtol=0, atol=TOL)
        assert np.sum(np.asarray(rewards, np.float64)) == pytest.approx(float(data[f"{k}__return_f64"]), rel=1e-6)


@pytest.mark.parametrize("task", ["cartpole-swingup", "cup-spin", "reacher-three-hard", "cheetah-jump"])
def test_episode_k_is_the_kth_reset_of_the_seeded_env(task):
    """Successive resets continue the task's RandomState; a new env with the same seed repeats them."""
    first = make_env(task, 7)
    starts = [first.reset() for _ in range(3)]
    second = make_env(task, 7)
    for expected in starts:
        np.testing.assert_array_equal(second.reset(), expected)
    assert not np.array_equal(starts[0], starts[1])
    assert not np.array_equal(make_env(task, 8).reset(), starts[0])


def test_unknown_task_message_lists_valid_names():
    with pytest.raises(UnknownTaskError) as info:
        make_env("walker-fly", 1)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and "walker-fly" in message
    assert all(name in message for name in MT30)
    with pytest.raises(UnknownTaskError, match="task set"):
        make_env("mt30", 1)


@pytest.mark.parametrize("name", ["mw-assembly", "mw-button-press", "mt80"])
def test_meta_world_is_refused_clearly(name):
    with pytest.raises(MetaWorldUnsupportedError) as info:
        make_env(name, 1)
    message = str(info.value)
    assert "\n" not in message and name in message
    assert "Meta-World" in message and "not installed / not supported yet" in message


def test_pad_and_unpad_helpers():
    obs = np.arange(10, dtype=np.float32).reshape(2, 5)
    padded = pad_obs(obs)
    assert padded.shape == (2, 24) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, :5], obs)
    assert not padded[:, 5:].any()
    np.testing.assert_array_equal(pad_obs(obs, obs_pad=8)[:, 5:], 0)
    with pytest.raises(ConfigError):
        pad_obs(np.zeros(25, np.float32))
    np.testing.assert_array_equal(unpad_action(np.arange(12.).reshape(2, 6), 2), [[0, 1], [6, 7]])


def test_task_set_ids_masks_and_pad_widths():
    names = ["cup-catch", "reacher-three-easy", "cartpole-balance"]
    default = TaskSet(tuple(names))
    assert (default.obs_pad, default.action_pad) == (24, 6)
    assert [default.task_id(n) for n in names] == [0, 1, 2]
    np.testing.assert_array_equal(default.action_mask(), [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    tight = TaskSet.tight(names)
    assert (tight.obs_pad, tight.action_pad) == (8, 3) and tight.obs_dims == (8, 8, 5)
    mt30 = TaskSet()
    assert mt30.task_id("pendulum-spin") == 29 and len(mt30) == 30
    with pytest.raises(ConfigError):
        TaskSet(("walker-walk",), obs_pad=17)
    with pytest.raises(ConfigError):
        default.task_id("walker-walk")
    with pytest.raises(UnknownTaskError):
        TaskSet(("cup-catch", "nope"))


@pytest.mark.parametrize("tight", [False, True])
def test_multitask_env_pads_obs_and_slices_actions(tight):
    names = ["cartpole-balance", "reacher-three-easy", "cup-spin"]
    task_set = TaskSet.tight(names) if tight else TaskSet(tuple(names))
    env = make_multitask_env(task_set, seed=3)
    rng = np.random.default_rng(0)
    for task_id, name in enumerate(names):
        single = make_env(name, 3)
        obs = env.reset(task_id)
        assert env.task == name and obs.shape == (task_set.obs_pad,)
        np.testing.assert_array_equal(obs, pad_obs(single.reset(), task_set.obs_pad))
        for _ in range(5):
            action = rng.uniform(-1, 1, task_set.action_pad).astype(np.float32)  # extra dims are junk
            o, r, terminated, truncated, info = env.step(action)
            o1, r1, *_ = single.step(action[:single.action_dim])
            np.testing.assert_array_equal(o, pad_obs(o1, task_set.obs_pad))
            assert not o[single.obs_dim:].any()
            assert r == r1 and info["task_id"] == task_id and not (terminated or truncated)
    with pytest.raises(ConfigError):
        env.step(np.zeros(task_set.action_pad + 1, np.float32))


def test_derived_custom_models():
    """Facts of the custom models, checked on the compiled MuJoCo models."""
    xml, assets = models.three_link_reacher_model()
    reacher = mujoco.MjModel.from_xml_string(xml.decode(), assets)
    joints = [reacher.joint(i).name for i in range(reacher.njnt)]
    assert joints == ["shoulder0", "shoulder1", "wrist"] and reacher.nu == 3
    assert [reacher.actuator(i).name for i in range(reacher.nu)] == joints
    np.testing.assert_array_equal(reacher.jnt_limited, [0, 1, 1])
    np.testing.assert_allclose(reacher.jnt_range[1:], np.deg2rad([[-80, 80], [-80, 80]]))
    for body in ("arm1", "hand", "finger"):
        np.testing.assert_allclose(reacher.body(body).pos, [0.09, 0, 0])
    walker = mujoco.MjModel.from_xml_string(models.walker_model()[0].decode(), assets)
    assert walker.geom("floor").size[0] == 500
    cheetah = mujoco.MjModel.from_xml_string(models.cheetah_model()[0].decode(), assets)
    assert cheetah.geom("ground").size[0] == 200


def test_episode_length_constant():
    assert EPISODE_LENGTH == 500 and make_env("pendulum-spin", 0).max_episode_steps == 500
