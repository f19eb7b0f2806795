"""Trainer: the official update against the TD-MPC-Opt fixture, learning on a synthetic store,
bit-exact kill-and-resume, cached-teacher distillation, and the online loop."""
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from agent.batches import StoreBatches
from agent.checkpoint import load_world_model, read_checkpoint, save_world_model
from agent.config import DistillConfig, LossConfig, OnlineConfig, TrainConfig, model_config
from agent.errors import ConfigError
from agent.losses import loss_terms
from agent.online import OnlineLoop
from agent.tasksets import MT30
from agent.train import Trainer, lr_factor, offline_trainer, read_trainer_model
from agent.world_model import WorldModel


TASKS = ["cartpole-balance", "reacher-easy", "cup-catch"]


def _no_dropout(model: WorldModel) -> WorldModel:
    out = WorldModel(replace(model.cfg, dropout=0.0))
    out.load_state_dict(model.state_dict())
    return out


def _small(seed: int, tasks=None, **dims) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(model_config(None, tasks=tasks, **{**dict(enc_dim=32, mlp_dim=48, latent_dim=16, task_dim=8), **dims}))


def _perturbed(model: WorldModel, seed: int) -> WorldModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _synthetic_store(path, tasks=TASKS, episodes=24, length=21, seed=0):
    """Learnable episodes: linear-ish dynamics driven by the action, reward a smooth function of
    the state. Padding as in MT30 (obs 24, action 6, zero beyond the task dims)."""
    from agent.data import write_store
    from agent.tasksets import task_spec

    rng = np.random.default_rng(seed)
    task = rng.integers(0, len(tasks), episodes)
    obs = np.zeros((episodes, length, 24), np.float32)
    action = np.zeros((episodes, length, 6), np.float32)
    reward = np.zeros((episodes, length), np.float32)
    for n in range(episodes):
        spec = task_spec(tasks[task[n]])
        state = rng.standard_normal(spec.obs_dim) * 0.5
        obs[n, 0, : spec.obs_dim] = state
        for t in range(1, length):
            a = rng.uniform(-1, 1, spec.action_dim)
            drive = np.resize(a, spec.obs_dim)
            state = 0.9 * state + 0.3 * drive
            obs[n, t, : spec.obs_dim] = state
            action[n, t, : spec.action_dim] = a
            reward[n, t] = np.exp(-np.sum(state[:2] ** 2)) + 0.2 * task[n]
    action[:, 0], reward[:, 0] = np.nan, np.nan
    return write_store(path, obs, action, reward, task, tasks=list(tasks), task_set="test")


# -- the official update ---------------------------------------------------------------------

@pytest.mark.parametrize("student_name", ["same", "perturbed"])
def test_update_matches_td_mpc_opt_fixture(fixtures_dir, student_name):
    info = json.loads((fixtures_dir / "fixtures.json").read_text())["files"]["loss.npz"]["official_stats"]
    official = info[student_name]["official_update_stats"]
    data = np.load(fixtures_dir / "loss.npz")
    path = {"same": "published/mt30_1M_steps_045dist_fp16.pt", "perturbed": "loss_student.pt"}[student_name]
    student = _no_dropout(load_world_model(fixtures_dir / path))
    teacher = _no_dropout(load_world_model(fixtures_dir / "published/mt30_1M_steps_045dist_fp16.pt"))
    cfg = TrainConfig(batch_size=32, loss=LossConfig(policy_entropy="td_mpc_opt"))
    trainer = Trainer(student, cfg, teacher=teacher)
    batch = tuple(torch.from_numpy(data[k]) for k in ("in_obs", "in_action", "in_reward", "in_task"))
    metrics = trainer.update(batch, eps_td=torch.from_numpy(data["in_eps_td"]), eps_pi=torch.from_numpy(data["in_eps_pi"]))
    # total and grad_norm: before the Adam step; pi_scale and pi_loss: after it (the step itself is checked)
    for ours, theirs in (("total", "total_loss"), ("grad_norm", "grad_norm"), ("pi_scale", "pi_scale"), ("pi_loss", "pi_loss"),
                         ("consistency", "consistency_loss"), ("reward", "reward_loss"), ("value", "value_loss")):
        assert metrics[ours] == pytest.approx(official[theirs], rel=1e-5, abs=1e-7), ours
    assert metrics["distill"] == pytest.approx(official["reward_distill_loss"], rel=1e-4, abs=1e-9)


# -- learning --------------------------------------------------------------------------------

def test_offline_updates_lower_the_loss(tmp_path):
    store = _synthetic_store(tmp_path / "store")
    model = _small(0, tasks=TASKS)
    cfg = TrainConfig(batch_size=32, seed=3)
    trainer = Trainer(model, cfg, StoreBatches(store, cfg.batch_size, cfg.horizon, seed=cfg.seed))
    held_out = StoreBatches(store, 64, 3, seed=99)()
    eps_td = torch.randn(3, 64, 6, generator=torch.Generator().manual_seed(0))

    def weighted_loss() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            terms = loss_terms(model.eval(), held_out, eps_td=eps_td)
        return float(20 * terms["consistency"] + 0.1 * terms["reward"] + 0.1 * terms["value"])

    seen = []
    before = weighted_loss()
    trainer.train(300, callback=lambda step, m: seen.append((step, m)))
    after = weighted_loss()
    assert [s for s, _ in seen] == list(range(1, 301))
    assert {"consistency", "reward", "value", "distill", "total", "grad_norm", "pi_loss", "pi_scale",
            "updates_per_s"} <= set(seen[-1][1])
    assert after < 0.5 * before, (before, after)
    assert np.mean([m["reward"] for _, m in seen[-20:]]) < 0.5 * np.mean([m["reward"] for _, m in seen[:20]])


# -- resume ----------------------------------------------------------------------------------

def _resume_setup(store, teacher, student_seed, source_seed, lr_schedule="constant"):
    student = _perturbed(_small(student_seed), 1)
    cfg = TrainConfig(batch_size=16, seed=source_seed, distill=DistillConfig(target="latent_linear", d_coef=0.45),
                      lr_schedule=lr_schedule, lr_schedule_steps=None if lr_schedule == "constant" else 8)
    return Trainer(student, cfg, StoreBatches(store, cfg.batch_size, cfg.horizon, seed=source_seed), teacher=teacher)


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, lr_schedule):
    store = _synthetic_store(tmp_path / "store", tasks=MT30[:3])
    teacher = _perturbed(_small(5, tasks=MT30, latent_dim=24, task_dim=12, num_q=3, mlp_dim=40), 2).eval()
    total, kill_at = 9, 4

    def fresh_streams():
        torch.manual_seed(11)
        random.seed(11)

    fresh_streams()
    uninterrupted = _resume_setup(store, teacher, 0, 21, lr_schedule)
    uninterrupted.train(total)

    fresh_streams()
    first = _resume_setup(store, teacher, 0, 21, lr_schedule)
    first.train(kill_at)
    path = first.save(tmp_path / "run" / "trainer.pt")
    assert isinstance(read_checkpoint(path), dict)  # weights_only=True loads it
    del first
    torch.randn(1000), random.random(), np.random.rand(10)  # whatever happens in between
    resumed = _resume_setup(store, teacher, 123, 456, lr_schedule).load(path)  # other init, other sampler seed: all overwritten
    assert resumed.step == kill_at
    resumed.train(total - kill_at)

    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert a["step"] == b["step"] == total
    for key, value in a["model"]["model"].items():
        assert torch.equal(value, b["model"]["model"][key]), key
    for key, value in a["projection"].items():
        assert torch.equal(value, b["projection"][key]), key
    for name in ("optim", "pi_optim"):
        for index, state in a[name]["state"].items():
            for field, tensor in state.items():
                assert torch.equal(tensor, b[name]["state"][index][field]), (name, index, field)
    assert torch.equal(a["scale"]["value"], b["scale"]["value"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["batch_source"] == b["rng"]["batch_source"]
    restored = read_trainer_model(path)
    assert restored.cfg == resumed.model.cfg


# -- distillation wiring ---------------------------------------------------------------------

def test_offline_trainer_distils_from_the_cache_without_a_live_teacher(tmp_path):
    store = _synthetic_store(tmp_path / "store", tasks=MT30[:3])
    teacher_path = save_world_model(_perturbed(_small(5, tasks=MT30[:3], latent_dim=24, task_dim=12), 3), tmp_path / "t.pt")
    student = _small(0, tasks=MT30[:3])
    trainer = offline_trainer(student, store, TrainConfig(batch_size=16), teacher_path)
    assert trainer.teacher is None and trainer.target == "reward"
    metrics = trainer.train(3)
    assert metrics["distill"] > 0
    plain = offline_trainer(_small(0, tasks=MT30[:3]), store, TrainConfig(batch_size=16))
    assert plain.target is None and plain.train(1)["distill"] == 0.0


def test_targets_needing_a_live_teacher_are_refused_without_one():
    with pytest.raises(ConfigError, match="live teacher"):
        Trainer(_small(0), TrainConfig(distill=DistillConfig(target="latent_linear")), cached_teacher=True)
    with pytest.raises(ConfigError, match="live teacher"):
        Trainer(_small(0), TrainConfig(distill=DistillConfig(target="value")), cached_teacher=True)
    trainer = Trainer(_small(0), TrainConfig(batch_size=4), cached_teacher=True)
    batch = (torch.randn(4, 4, 24), torch.zeros(3, 4, 6), torch.zeros(3, 4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="no cached teacher outputs"):
        trainer.update(batch)


# -- online ----------------------------------------------------------------------------------

class _ToyEnv:
    """Deterministic fixed-length env: obs drifts with the action, reward = -|obs[0]|."""

    def __init__(self, obs_dim: int, action_dim: int, seed: int):
        self.obs_dim, self.action_dim, self.max_episode_steps = obs_dim, action_dim, 1000
        self.rng = np.random.default_rng(seed)
        self.t = 0

    def reset(self):
        self.t, self.state = 0, self.rng.standard_normal(self.obs_dim).astype(np.float32)
        return self.state

    def step(self, action):
        assert action.shape == (self.action_dim,)
        self.t += 1
        self.state = (0.9 * self.state + 0.1 * np.resize(action, self.obs_dim)).astype(np.float32)
        return self.state, float(-abs(self.state[0])), False, self.t >= self.max_episode_steps, {}


def test_online_loop_collects_and_trains_multitask(tmp_path):
    from agent.tasksets import task_spec

    model = _small(0, tasks=TASKS)
    trainer = Trainer(model, TrainConfig(batch_size=8, seed=2))
    cfg = OnlineConfig(steps=36, seed_steps=12, num_envs=2, episode_length=6,
                       planner=dict(iterations=1, num_samples=16, num_elites=4, num_pi_trajs=2))
    factory = lambda task, seed: _ToyEnv(task_spec(task).obs_dim, task_spec(task).action_dim, seed)  # noqa: E731
    loop = OnlineLoop(trainer, TASKS[:2], cfg, env_factory=factory)
    events = []
    summary = loop.run(callback=lambda kind, info: events.append(kind))
    assert summary["env_steps"] == 36 and summary["episodes"] == 6
    assert loop.buffer.num_episodes == 6 and sorted(set(loop.buffer.task.tolist())) == [0, 1]
    # 12 pretraining updates once seeding ends, then one per environment step
    assert trainer.step == 12 + (36 - 12) and events.count("update") == trainer.step
    assert np.isnan(loop.buffer.action[:, 0]).all() and not np.isnan(loop.buffer.action[:, 1:]).any()
    assert (loop.buffer.action[loop.buffer.task == 0][:, 1:, 1:] == 0).all()  # cartpole: 1 action dim
    store = loop.buffer.save(tmp_path / "online_store", task_set="test")
    assert store.num_episodes == 6 and store.episode_length == 7


def test_online_loop_with_a_real_environment():
    model = _small(0, tasks=["cartpole-balance"], task_dim=0)
    trainer = Trainer(model, TrainConfig(batch_size=8))
    cfg = OnlineConfig(steps=10, seed_steps=5, episode_length=5,
                       planner=dict(iterations=1, num_samples=16, num_elites=4, num_pi_trajs=2))
    summary = OnlineLoop(trainer, ["cartpole-balance"], cfg).run()
    assert summary["episodes"] == 2 and trainer.step == 5 + 5 and summary["mean_return"] > 0


def test_resumed_online_run_equals_an_uninterrupted_one(tmp_path):
    """Stop after 2 of 4 episodes (past pretraining), resume in a fresh loop: same data, returns, weights."""
    def online(steps: int, checkpoint_dir=None) -> OnlineLoop:
        trainer = Trainer(_small(0, tasks=["cartpole-balance"], task_dim=0), TrainConfig(batch_size=8, seed=3))
        cfg = OnlineConfig(steps=steps, seed_steps=20, episode_length=20, updates_per_step=0.5, env_seed=5,
                           checkpoint_dir=checkpoint_dir,
                           planner=dict(iterations=1, num_samples=16, num_elites=4, num_pi_trajs=2))
        loop = OnlineLoop(trainer, ["cartpole-balance"], cfg)
        loop.run()
        return loop

    straight = online(80)
    assert not online(40, str(tmp_path)).resumed
    resumed = online(80, str(tmp_path))
    assert resumed.resumed and resumed.episodes == straight.episodes == 4
    assert resumed.trainer.step == straight.trainer.step == 20 + 30
    assert resumed.episode_returns == straight.episode_returns
    for name in ("obs", "action", "reward", "task"):
        np.testing.assert_array_equal(getattr(resumed.buffer, name), getattr(straight.buffer, name), err_msg=name)
    for key, value in straight.trainer.model.state_dict().items():
        assert torch.equal(resumed.trainer.model.state_dict()[key], value), key


def test_store_task_ids_are_translated_to_the_model_task_list(tmp_path):
    store = _synthetic_store(tmp_path / "store", tasks=["reacher-easy", "cartpole-balance"], episodes=8)
    mapped = StoreBatches(store, 64, 3, seed=0, model_tasks=TASKS)()  # TASKS: cartpole-balance, reacher-easy, ...
    raw = StoreBatches(store, 64, 3, seed=0)()
    assert torch.equal(mapped.task, torch.tensor([1, 0])[raw.task]) and torch.equal(mapped.obs, raw.obs)
    with pytest.raises(ConfigError, match="not in the model's task set"):
        StoreBatches(store, 8, 3, model_tasks=["cup-catch"])


def test_cosine_schedule_sets_every_groups_lr_from_its_own_base():
    cfg = TrainConfig(lr=1e-3, lr_schedule="cosine", lr_schedule_steps=4)
    assert [lr_factor(cfg, s) for s in range(6)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0], abs=1e-6)
    assert lr_factor(TrainConfig(), 10**6) == 1.0  # constant: the official setting
    for bad, fragment in ((dict(lr_schedule="cosine"), "needs lr_schedule_steps"),
                          (dict(lr_schedule="step"), "lr_schedule must be one of constant, cosine"),
                          (dict(lr_schedule_steps=0), "lr_schedule_steps must be an integer >= 1")):
        with pytest.raises(ConfigError, match=fragment):
            TrainConfig(**bad).validate()
    model = _small(0)
    trainer = Trainer(model, cfg)
    g = torch.Generator().manual_seed(0)
    tasks = len(model.cfg.tasks)
    for step in range(3):
        trainer.update((torch.randn(4, 16, model.cfg.obs_dim, generator=g), torch.rand(3, 16, model.cfg.action_dim, generator=g) * 2 - 1,
                        torch.rand(3, 16, 1, generator=g), torch.randint(0, tasks, (16,), generator=g)))
        # the update after `step + 1` updates will use factor(step + 1); the last one used factor(step)
        lrs = [group["lr"] for group in trainer.optim.param_groups]
        assert lrs[0] == pytest.approx(1e-3 * 0.3 * lr_factor(cfg, step))  # the encoder keeps its 0.3 scale
        assert lrs[1:] == pytest.approx([1e-3 * lr_factor(cfg, step)] * (len(lrs) - 1))
        assert trainer.pi_optim.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(cfg, step))


def test_trainer_compiles_mish_only_where_the_native_kernels_do_not_run(monkeypatch):
    """The compiled Mish serves `ln_mish`'s torch fallback only: a CPU Trainer with the native
    kernels in use does not compile it (seconds per process); with them switched off it does."""
    import agent.train as train_module
    from agent import native, ops

    if not native.available():
        pytest.skip("the native kernels cannot be built here")
    calls = []
    monkeypatch.setattr(train_module, "use_compiled_mish", lambda enabled=True: calls.append(enabled))
    model = WorldModel(model_config(None, tasks=["walker-walk"], obs_dim=24, action_dim=6, enc_dim=16, mlp_dim=16,
                                    latent_dim=16, task_dim=0, num_q=2))
    Trainer(model, TrainConfig())
    assert calls == []
    monkeypatch.setattr(ops, "_native_training", False)  # use_native_kernels(False), put back after the test
    Trainer(model, TrainConfig())
    assert calls == [True]
    Trainer(model, TrainConfig(compile_mish=False))
    assert calls == [True]
