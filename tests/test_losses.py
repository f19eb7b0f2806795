"""Loss terms: the TD-MPC-Opt loss fixture, the fast kernels against the model's own methods,
every distillation target with a teacher of different dims, cached vs live teacher targets."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import small_model

from agent.batches import StoreBatches
from agent.checkpoint import load_world_model, save_world_model
from agent.config import DISTILL_TARGETS, LossConfig
from agent.distill import LatentProjection, PcaProjection, TeacherTargets
from agent.losses import TrainBatch, compute_losses, loss_terms, td_targets, task_discounts
from agent.tasksets import MT30
from agent.train_kernels import BatchKernels, ModelHeads
from agent.world_model import WorldModel


FIXTURE_TERMS = {"consistency": "stat_consistency_loss", "reward": "stat_reward_loss", "value": "stat_value_loss",
                 "distill": "stat_reward_distill_loss"}


def _no_dropout(model: WorldModel) -> WorldModel:
    """The fixture's models: student config with dropout 0 (same parameters)."""
    out = WorldModel(replace(model.cfg, dropout=0.0))
    out.load_state_dict(model.state_dict())
    return out


def _small(seed: int, **dims) -> WorldModel:
    return small_model(seed, **{"num_q": 2, **dims})


def _teacher(seed: int = 7) -> WorldModel:
    """Differs from the student in every dimension but the task set and padding."""
    return _small(seed, enc_dim=40, mlp_dim=56, latent_dim=24, task_dim=12, num_q=3, num_enc_layers=3)


def _batch(seed: int, H: int = 3, B: int = 12, tasks: int = 30) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, tasks, (B,), generator=g)
    return (torch.randn(H + 1, B, 24, generator=g), torch.rand(H, B, 6, generator=g) * 2 - 1,
            torch.rand(H, B, 1, generator=g) * 2, task)


@pytest.fixture(scope="module")
def loss_fixture(fixtures_dir):
    data = np.load(fixtures_dir / "loss.npz")
    teacher = _no_dropout(load_world_model(fixtures_dir / "published/mt30_1M_steps_045dist_fp16.pt"))
    students = {"same": fixtures_dir / "published/mt30_1M_steps_045dist_fp16.pt", "perturbed": fixtures_dir / "loss_student.pt"}
    return data, teacher, students


@pytest.mark.parametrize("student_name", ["same", "perturbed"])
@pytest.mark.parametrize("fast", [True, False], ids=["kernels", "model-methods"])
def test_terms_match_td_mpc_opt_fixture(loss_fixture, student_name, fast):
    data, teacher, students = loss_fixture
    student = _no_dropout(load_world_model(students[student_name])).train()
    batch = tuple(torch.from_numpy(data[k]) for k in ("in_obs", "in_action", "in_reward", "in_task"))
    terms = loss_terms(student, batch, teacher, "reward", eps_td=torch.from_numpy(data["in_eps_td"]), fast=fast)
    assert set(terms) == {"consistency", "reward", "value", "distill"}
    for name, key in FIXTURE_TERMS.items():
        expected = float(data[f"{student_name}__{key}"])
        assert terms[name].requires_grad
        # the distillation MSE of decoded rewards amplifies ~1e-7 logit differences (fixture guidance: rtol 1e-4)
        rel = 1e-4 if name == "distill" else 1e-5
        assert float(terms[name].detach()) == pytest.approx(expected, rel=rel, abs=1e-9), name


def test_td_targets_and_rollout_match_fixture(loss_fixture):
    data, _, students = loss_fixture
    student = _no_dropout(load_world_model(students["perturbed"])).train()
    obs, action, reward, task = (torch.from_numpy(data[k]) for k in ("in_obs", "in_action", "in_reward", "in_task"))
    heads = BatchKernels(student, task)
    with torch.no_grad():
        next_z = heads.encode(obs[1:])
        td = td_targets(heads, next_z, reward, task, task_discounts(student.cfg, LossConfig()),
                        torch.from_numpy(data["in_eps_td"]))
    torch.testing.assert_close(next_z, torch.from_numpy(data["perturbed__next_z"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td, torch.from_numpy(data["perturbed__td_targets"]), rtol=1e-5, atol=1e-5)
    out = compute_losses(student, (obs, action, reward, task), eps_td=torch.from_numpy(data["in_eps_td"]))
    torch.testing.assert_close(out.zs.detach(), torch.from_numpy(data["perturbed__zs"]), rtol=1e-5, atol=1e-6)


def test_kernels_equal_model_methods():
    model = _small(0, num_q=3).eval()  # Q dropout off: both paths deterministic
    obs, action, _, task = _batch(1)
    kernels, methods = BatchKernels(model, task), ModelHeads(model, task)
    z = kernels.encode(obs)
    torch.testing.assert_close(z, methods.encode(obs), rtol=0, atol=1e-6)
    torch.testing.assert_close(kernels.next(z[0], action[0]), methods.next(z[0], action[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(kernels.reward(z[:-1], action), methods.reward(z[:-1], action), rtol=1e-5, atol=1e-5)
    for target in (False, True):
        torch.testing.assert_close(kernels.q_all(z[:-1], action, target=target), methods.q_all(z[:-1], action, target=target),
                                   rtol=1e-5, atol=1e-5)
    eps = torch.randn(z.shape[:-1] + (6,))
    (a1, i1), (a2, i2) = kernels.pi(z, eps), methods.pi(z, eps)
    torch.testing.assert_close(a1, a2, rtol=0, atol=1e-6)
    for key in ("mean", "log_std", "scaled_entropy"):
        torch.testing.assert_close(i1[key], i2[key], rtol=1e-5, atol=1e-5)
    # same loss terms and the same gradients through either path
    eps_td = torch.randn(3, 12, 6)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        terms = loss_terms(model, _batch(1), eps_td=eps_td, fast=fast)
        sum(terms.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_single_task_model():
    model = _small(0, tasks=["cartpole-balance"], task_dim=0)
    obs, action, reward, _ = _batch(2)
    terms = loss_terms(model, (obs, action, reward, None))
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["distill"].detach()) == 0.0


@pytest.mark.parametrize("target", DISTILL_TARGETS)
def test_every_target_with_a_teacher_of_other_dims(target):
    student, teacher = _small(0), _teacher()
    assert student.cfg.latent_dim != teacher.cfg.latent_dim and student.cfg.task_dim != teacher.cfg.task_dim
    batch = _batch(3)
    projection = LatentProjection(teacher.cfg.latent_dim, student.cfg.latent_dim) if target == "latent_linear" else None
    pca = None
    if target == "latent_pca":
        from agent.distill import fit_pca

        pca = fit_pca(teacher.encode(batch[0].reshape(-1, 24), batch[3].repeat(4)).detach(), student.cfg.latent_dim)
    student.train()
    terms = loss_terms(student, batch, teacher, target, projection=projection, pca=pca)
    distill = terms["distill"]
    assert torch.isfinite(distill) and float(distill.detach()) > 0
    distill.backward()
    trained = {"reward": "_reward", "reward_multistep": "_reward", "reward_observed": "_reward",
               "latent_linear": "_encoder", "latent_pca": "_encoder", "value": "_Qs", "policy": "_pi"}[target]
    grads = [p.grad for n, p in student.named_parameters() if n.startswith(trained)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{target}: no gradient reaches {trained}"
    assert all(p.grad is None for p in teacher.parameters())
    if projection is not None:
        assert projection.linear.weight.grad is not None and projection.linear.weight.grad.abs().sum() > 0


def test_identical_teacher_gives_zero_reward_distillation():
    model = _small(0)
    twin = _small(0)
    # (reward_observed is not 0: the student's rollout latents meet the teacher's encodings of obs[h])
    for target in ("reward", "reward_multistep"):
        assert float(loss_terms(model, _batch(4), twin, target)["distill"].detach()) == pytest.approx(0.0, abs=1e-10)


def _write_store(path, episodes=6, length=9, seed=0):
    from agent.data import write_store

    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((episodes, length, 24)).astype(np.float32)
    action = rng.uniform(-1, 1, (episodes, length, 6)).astype(np.float32)
    reward = rng.uniform(0, 1, (episodes, length)).astype(np.float32)
    action[:, 0], reward[:, 0] = np.nan, np.nan
    task = rng.integers(0, 30, episodes)
    return write_store(path, obs, action, reward, task, tasks=MT30, task_set="mt30")


def test_cached_teacher_targets_equal_live_passes(tmp_path):
    from agent.data import TeacherCache

    store = _write_store(tmp_path / "store")
    teacher = _teacher()
    teacher_path = save_world_model(teacher, tmp_path / "teacher.pt")
    student = _small(0, latent_dim=16)
    cache = TeacherCache.get_or_build(store, teacher_path, pca_dim=student.cfg.latent_dim)
    batch = StoreBatches(store, batch_size=10, horizon=3, seed=5, teacher_cache=cache)()
    assert isinstance(batch.teacher, TeacherTargets)
    live_batch = TrainBatch(batch.obs, batch.action, batch.reward, batch.task)
    live_teacher = load_world_model(teacher_path)
    pca = PcaProjection(torch.from_numpy(np.array(cache.pca.mean)), torch.from_numpy(np.array(cache.pca.components)))
    eps_td = torch.randn(3, 10, 6)
    for target in ("reward", "reward_observed", "latent_pca"):
        cached = loss_terms(student, batch, None, target, eps_td=eps_td)["distill"].detach()
        live = loss_terms(student, live_batch, live_teacher, target, eps_td=eps_td, pca=pca)["distill"].detach()
        assert float(cached) > 0
        assert float(cached) == pytest.approx(float(live), rel=1e-5, abs=1e-9), target


def test_drop_positions_are_bernoulli_dropout():
    from agent.train_kernels import drop_positions

    torch.manual_seed(0)
    n = 2_000_000
    dropped = drop_positions(n, 0.01)
    assert dropped.dtype == torch.long and bool((dropped[1:] > dropped[:-1]).all())  # ascending, distinct
    assert 0 <= int(dropped.min()) and int(dropped.max()) < n
    assert dropped.numel() / n == pytest.approx(0.01, abs=5 * (0.01 * 0.99 / n) ** 0.5)  # within 5 sigma
    # gaps between drops are geometric: no clustering at the start of the tensor
    first_half = int((dropped < n // 2).sum()) / (n // 2)
    assert first_half == pytest.approx(dropped.numel() / n, abs=5 * (0.01 * 0.99 / 1e6) ** 0.5)
    assert drop_positions(n, 0.0).numel() == 0
