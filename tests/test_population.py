"""Population training (agent.population): K members trained as one batch equal K students trained
separately by agent.train.Trainer on the same batches and noise."""
from __future__ import annotations

import pytest
import torch

from agent.config import DistillConfig, TrainConfig
from agent.distill import TeacherTargets
from agent.errors import ConfigError
from agent.losses import TrainBatch
from agent import ops, population as population_module
from agent.population import Population
from agent.train import Trainer
from tests.helpers import small_model

H, B = 3, 16


def _batches(steps: int, members: int, seed: int, num_tasks: int, teacher: bool, dtype=torch.float32,
             obs_dim: int = 24, batch: int = B):
    """steps x members batches: obs (H+1, B, obs_dim), action (H, B, 6), reward (H, B, 1), task (B,)."""
    g = torch.Generator().manual_seed(seed)
    torch_rand, torch_randn = torch.rand, torch.randn

    def rand(*shape, generator):
        return torch_rand(*shape, generator=generator, dtype=dtype)

    def randn(*shape, generator):
        return torch_randn(*shape, generator=generator, dtype=dtype)

    out = []
    for _ in range(steps):
        row = []
        for _ in range(members):
            cached = TeacherTargets(reward=rand(H, batch, 1, generator=g)) if teacher else None
            row.append(TrainBatch(randn(H + 1, batch, obs_dim, generator=g), rand(H, batch, 6, generator=g) * 2 - 1,
                                  rand(H, batch, 1, generator=g), torch.randint(0, num_tasks, (batch,), generator=g),
                                  cached))
        out.append(row)
    return out


@pytest.mark.parametrize("d_coef,num_q,lr_schedule", [(0.0, 2, "constant"), (0.45, 2, "constant"), (0.45, 5, "constant"),
                                                     (0.45, 2, "cosine")])
def test_population_members_equal_separately_trained_students(d_coef, num_q, lr_schedule, monkeypatch):
    # float64: Adam's first steps turn rounding-level gradient differences of ~1e-9 entries (below
    # its eps) into lr-sized parameter differences; in float64 both sides agree to ~1e-12
    members, steps, dtype = 3, 4, torch.float64
    # the random Q-head pair (num_q > 2) comes from the global generator, drawn in another order
    # by the population: pin it to heads (0, 1) on both sides (at the project's one draw site; a
    # replaced torch.randperm would stay in dynamo's trace rules and break later compiled steps)
    monkeypatch.setattr(ops, "q_pair", lambda num_q, device=None, generator=None: torch.arange(2, device=device))
    models = [small_model(seed=s, num_q=num_q, dropout=0.0).to(dtype) for s in range(members)]
    # cosine over 3 updates: the 4th runs at lr 0 (the schedule's end)
    cfg = TrainConfig(batch_size=B, fast_kernels=False, distill=DistillConfig(target="reward" if d_coef else None,
                                                                             d_coef=d_coef),
                      lr_schedule=lr_schedule, lr_schedule_steps=3 if lr_schedule == "cosine" else None)
    num_tasks = len(models[0].cfg.tasks)
    batches = _batches(steps, members, seed=7, num_tasks=num_tasks, teacher=d_coef > 0, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    eps_td = [torch.randn(members, H, B, 6, generator=g, dtype=dtype) for _ in range(steps)]
    eps_pi = [torch.randn(members, H + 1, B, 6, generator=g, dtype=dtype) for _ in range(steps)]

    population = Population(models, cfg, seeds=range(members), cached_teacher=d_coef > 0)
    pop_metrics = [population.update(batches[t], eps_td[t], eps_pi[t]) for t in range(steps)]

    for k, model in enumerate(models):
        separate = Trainer(model, cfg, cached_teacher=d_coef > 0)
        for t in range(steps):
            metrics = separate.update(batches[t][k], eps_td[t][k], eps_pi[t][k])
        reference = model.state_dict()
        member = population.member_state_dict(k)
        assert set(member) == set(reference)
        for name, value in reference.items():
            torch.testing.assert_close(member[name], value, rtol=1e-9, atol=1e-10, msg=f"member {k}: {name}")
        for key in ("total", "consistency", "reward", "value", "distill", "pi_loss", "grad_norm", "pi_scale"):
            if key in pop_metrics[-1][k]:
                assert pop_metrics[-1][k][key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-10), key
        assert pop_metrics[-1][k]["step"] == steps


def test_the_paper_presets_1m_student_trains_as_a_population():
    """The population executor serves the paper's student (the official 1M size on MT30: 39-dim
    observations, 30 task embeddings of 96): two members distilled from cached teacher rewards land
    where two separate Trainers take them (float64, the reference ops)."""
    from agent.config import MT30_OBS_DIM, model_config
    from agent.world_model import WorldModel

    dtype, steps, batch = torch.float64, 2, 8
    cfg = TrainConfig(batch_size=batch, fast_kernels=False, distill=DistillConfig(target="reward", d_coef=0.45))
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        # no Q dropout: its masks come from the global generator, drawn in another order by the population
        models.append(WorldModel(model_config(1, dropout=0.0)).to(dtype))
    # the official '1M' preset counts 1.43M parameters on MT30 (its 30 x 96 task embedding included)
    assert 1.4e6 < models[0].num_parameters() < 1.45e6 and models[0].cfg.obs_dim == MT30_OBS_DIM
    batches = _batches(steps, 2, seed=11, num_tasks=30, teacher=True, dtype=dtype, obs_dim=MT30_OBS_DIM, batch=batch)
    g = torch.Generator().manual_seed(12)
    eps = [(torch.randn(2, H, batch, 6, generator=g, dtype=dtype), torch.randn(2, H + 1, batch, 6, generator=g, dtype=dtype))
           for _ in range(steps)]
    population = Population(models, cfg, seeds=[1, 2], cached_teacher=True)
    for t in range(steps):
        population.update(batches[t], *eps[t])
    for k, model in enumerate(models):
        initial = {name: value.clone() for name, value in model.state_dict().items()}
        separate = Trainer(model, cfg, cached_teacher=True)
        for t in range(steps):
            separate.update(batches[t][k], eps[t][0][k], eps[t][1][k])
        member = population.member_state_dict(k)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(member[name], value, rtol=1e-9, atol=1e-10, msg=f"member {k}: {name}")
        assert max(float((member[n] - initial[n]).abs().max()) for n in initial) > 1e-4  # the updates moved it


def test_members_differ_and_a_saved_population_resumes_exactly(tmp_path):
    models = [small_model(seed=s, num_q=2, dropout=0.0) for s in range(2)]
    cfg = TrainConfig(batch_size=B, distill=DistillConfig(target=None))
    batches = _batches(4, 2, seed=1, num_tasks=len(models[0].cfg.tasks), teacher=False)
    a = Population(models, cfg, seeds=[1, 2])
    for t in range(2):
        a.update(batches[t])
    a.save(tmp_path / "pop.pt")
    b = Population(models, cfg, seeds=[1, 2]).load(tmp_path / "pop.pt")
    for t in range(2, 4):
        ma, mb = a.update(batches[t]), b.update(batches[t])
        assert [m["total"] for m in ma] == [m["total"] for m in mb]
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    assert not torch.equal(a.params["_pi.0.weight"][0], a.params["_pi.0.weight"][1])
    assert b.step == 4
    # a member is a working WorldModel with that member's weights
    member = b.member(1)
    torch.testing.assert_close(member._pi[0].weight, b.params["_pi.0.weight"][1])


def test_targets_the_population_cannot_serve_are_refused():
    models = [small_model(seed=0, num_q=2)]
    cfg = TrainConfig(distill=DistillConfig(target="policy"))
    with pytest.raises(ConfigError, match="cannot serve distillation target 'policy'"):
        Population(models, cfg, cached_teacher=True, teacher=small_model(seed=1, num_q=2))


def test_dropping_a_member_leaves_the_others_training_as_before():
    """keep([0, 2]) after two updates: members 0 and 2 go on exactly as in the full population."""
    models = [small_model(seed=s, num_q=2, dropout=0.0) for s in range(3)]
    cfg = TrainConfig(batch_size=B, distill=DistillConfig(target=None))
    batches = _batches(4, 3, seed=2, num_tasks=len(models[0].cfg.tasks), teacher=False)
    g = torch.Generator().manual_seed(5)
    eps = [(torch.randn(3, H, B, 6, generator=g), torch.randn(3, H + 1, B, 6, generator=g)) for _ in range(4)]
    full, cut = Population(models, cfg, seeds=[1, 2, 3]), Population(models, cfg, seeds=[1, 2, 3])
    for t in range(4):
        if t == 2:
            with torch.no_grad():
                cut.params["_dynamics.0.weight"][1].fill_(float("nan"))
            assert cut.finite_members() == [True, False, True]
            cut.keep([0, 2])
        keep = [0, 2] if t >= 2 else [0, 1, 2]
        full.update(batches[t], *eps[t])
        cut.update([batches[t][k] for k in keep], eps[t][0][keep], eps[t][1][keep])
    assert cut.K == 2 and cut.seeds == [1, 3] and cut.finite_members() == [True, True]
    for name in full.params:
        torch.testing.assert_close(cut.params[name], full.params[name][[0, 2]], rtol=0, atol=0, msg=name)


needs_native = pytest.mark.skipif(not __import__("agent.native", fromlist=["available"]).available(),
                                  reason="the native CPU kernels cannot be built here (no C compiler)")


@needs_native
@pytest.mark.parametrize("per_head,batched_affine", [(False, True), (True, True), (False, False)])
def test_member_kernel_under_vmap_equals_the_reference_ops(per_head, batched_affine):
    """vmap(grad) over K members through the native LayerNorm + Mish (the members become the
    kernel's heads) gives each member's reference value and gradients."""
    import torch.nn.functional as F
    from torch.func import grad_and_value, vmap

    from agent import native

    K, N, D, Hq = 3, 10, 16, 2
    g = torch.Generator().manual_seed(0)
    lead = (K, Hq) if per_head else (K,)
    x, w = torch.randn(*lead, N, D, generator=g), torch.randn(*lead, N, D, generator=g)
    gamma, beta = torch.randn(*lead, D, generator=g), torch.randn(*lead, D, generator=g)
    if not batched_affine:
        gamma, beta = gamma[0], beta[0]

    def reference(x, gamma, beta, w):
        if per_head:
            y = F.layer_norm(x, (D,)) * gamma.unsqueeze(1) + beta.unsqueeze(1)
        else:
            y = F.layer_norm(x, (D,), gamma, beta)
        return (F.mish(y) * w).sum()

    def fused(x, gamma, beta, w):
        return (native.member_layer_norm_act(x, gamma, beta) * w).sum()

    dims = (0, 0 if batched_affine else None, 0 if batched_affine else None, 0)
    want = vmap(grad_and_value(reference, argnums=(0, 1, 2)), in_dims=dims)(x, gamma, beta, w)
    got = vmap(grad_and_value(fused, argnums=(0, 1, 2)), in_dims=dims)(x, gamma, beta, w)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "gamma", "beta"), got[0], want[0]):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@needs_native
def test_population_with_member_kernels_trains_as_with_the_reference_ops():
    """float32 on CPU: the population runs its modules' LayerNorm + Mish in the native member
    kernel; three updates land where the reference torch ops (fast_kernels=False) take them."""
    models = [small_model(seed=s, num_q=2, dropout=0.0) for s in range(3)]
    batches = _batches(3, 3, seed=4, num_tasks=len(models[0].cfg.tasks), teacher=True)
    g = torch.Generator().manual_seed(6)
    eps = [(torch.randn(3, H, B, 6, generator=g), torch.randn(3, H + 1, B, 6, generator=g)) for _ in range(3)]
    runs = {}
    for fast in (True, False):
        cfg = TrainConfig(batch_size=B, fast_kernels=fast, distill=DistillConfig(target="reward", d_coef=0.45))
        pop = Population(models, cfg, seeds=[1, 2, 3], cached_teacher=True)
        assert pop.fused is fast
        metrics = [pop.update(batches[t], *eps[t]) for t in range(3)]
        runs[fast] = pop, metrics
    (fused, fused_metrics), (reference, reference_metrics) = runs[True], runs[False]
    for name in reference.params:
        torch.testing.assert_close(fused.params[name], reference.params[name], rtol=1e-3, atol=1e-4, msg=name)
    for a, b in zip(fused_metrics[-1], reference_metrics[-1]):
        assert a["total"] == pytest.approx(b["total"], rel=1e-4)
    with torch.no_grad():
        moved = sum(float((fused.params[n] - torch.stack([dict(m.named_parameters())[n] for m in models])).abs().max())
                    for n in fused.params)
    assert moved > 1e-3  # the updates did change the weights


@needs_native
def test_population_says_when_the_member_kernels_cannot_serve_it(monkeypatch):
    monkeypatch.setattr(ops, "_said", set())  # the warning is once per process and reason
    models = [small_model(seed=s, num_q=2, dropout=0.0).to(torch.float64) for s in range(2)]
    with pytest.warns(UserWarning, match="population: fused LayerNorm \\+ Mish -> torch ops: .*float64"):
        pop = Population(models, TrainConfig(batch_size=B, distill=DistillConfig(target=None)), seeds=[1, 2])
    assert not pop.fused


@pytest.mark.parametrize("fast", [True, False], ids=["member-kernel", "reference-ops"])
def test_eager_gradients_equal_the_torch_func_gradients_a_compiled_step_traces(fast, monkeypatch):
    """Eager updates take each member's gradient by one backward pass of the members' summed loss;
    a compiled step traces vmap(grad_and_value(...)) instead. Both give the same updates."""
    models = [small_model(seed=s, num_q=2, dropout=0.0) for s in range(3)]
    batches = _batches(3, 3, seed=5, num_tasks=len(models[0].cfg.tasks), teacher=True)
    g = torch.Generator().manual_seed(8)
    eps = [(torch.randn(3, H, B, 6, generator=g), torch.randn(3, H + 1, B, 6, generator=g)) for _ in range(3)]
    cfg = TrainConfig(batch_size=B, fast_kernels=fast, distill=DistillConfig(target="reward", d_coef=0.45))
    runs = {}
    for functorch in (False, True):
        monkeypatch.setattr(population_module, "_tracing", lambda: functorch)
        pop = Population(models, cfg, seeds=[1, 2, 3], cached_teacher=True)
        runs[functorch] = pop, [pop.update(batches[t], *eps[t]) for t in range(3)]
    (autograd_pop, autograd_metrics), (func_pop, func_metrics) = runs[False], runs[True]
    for name in func_pop.params:
        torch.testing.assert_close(autograd_pop.params[name], func_pop.params[name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(autograd_metrics[-1], func_metrics[-1]):
        assert a["total"] == pytest.approx(b["total"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert float((autograd_pop.params["_pi.0.weight"] - torch.stack([m._pi[0].weight for m in models])).abs().max()) > 1e-4
