"""Every executor of the network pinned to the reference `WorldModel`, over one matrix of model
shapes: Q ensembles of 2, 5 and 10 heads, single- and multi-task, the official 1M and 5M presets,
odd widths (enc/mlp 37, latent 21 in SimNorm groups of 7) and a deeper Q ensemble.

Executors: the training kernels (`BatchKernels`, with the native fused kernels and with torch
ops; forward and gradients), the planning kernels (`PlanningKernels` step / pi / q_avg, the chunked
torch value estimate and the one-call native `ValueNet`), and the population executor (one update
of a one-member population equals `Trainer(fast_kernels=False)`). A fast path that cannot serve a
model says why, once.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import small_model

from agent import Agent, native, ops
from agent.config import DistillConfig, TrainConfig, model_config
from agent.layers import EnsembleMLP
from agent.math import two_hot_inv
from agent.rollout import PlanningKernels
from agent.train_kernels import BatchKernels, ModelHeads, use_native_kernels
from agent.world_model import WorldModel

SMALL = dict(enc_dim=32, mlp_dim=48, latent_dim=16, task_dim=8)
SINGLE = dict(tasks=["walker-walk"], task_dim=0)
ODD = dict(enc_dim=37, mlp_dim=37, latent_dim=21, simnorm_dim=7, task_dim=5, num_q=3)


def _perturbed(model: WorldModel, seed: int, noise: float = 0.05) -> WorldModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return model


def _deeper_q(model: WorldModel, hidden: int = 3) -> WorldModel:
    """The model with a Q ensemble of `hidden` hidden layers instead of two (same heads, new weights)."""
    cfg = model.cfg
    model._Qs = EnsembleMLP(cfg.num_q, cfg.latent_dim + cfg.action_dim + cfg.task_dim, hidden * [cfg.mlp_dim],
                            cfg.num_bins, dropout=cfg.dropout)
    model._target_Qs = copy.deepcopy(model._Qs).requires_grad_(False)
    return _perturbed(model, 11)


def _make(shape: str, dropout: float = 0.01) -> WorldModel:
    if shape.startswith("preset"):
        torch.manual_seed(0)
        return _perturbed(WorldModel(model_config(int(shape[len("preset"):]), dropout=dropout)), 0, noise=0.02)
    if shape == "deep-q":
        return _deeper_q(small_model(0, num_q=4, dropout=dropout, **SMALL))
    dims = {**SMALL, "dropout": dropout}
    if shape.startswith("odd"):
        dims.update(ODD)
    else:
        dims["num_q"] = int(shape.split("-")[0][1:])
    if shape.endswith("-st"):
        dims.update(SINGLE)
    return small_model(0, **dims)


SHAPES = ["q2-mt", "q5-mt", "q10-mt", "q2-st", "q5-st", "q10-st", "preset1", "preset5", "odd-mt", "odd-st", "deep-q"]


@pytest.fixture(params=SHAPES)
def model(request) -> WorldModel:
    return _make(request.param).eval()  # Q dropout off: every executor deterministic


def _inputs(model: WorldModel, B: int = 8, H: int = 2, seed: int = 1):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, len(cfg.tasks), (B,), generator=g) if model.multitask else None
    obs = torch.randn(H, B, cfg.obs_dim, generator=g)
    action = torch.rand(H, B, cfg.action_dim, generator=g) * 2 - 1
    eps = torch.randn(H, B, cfg.action_dim, generator=g)
    if task is not None:
        model.task_emb(task)  # max_norm renormalises the looked-up rows once, in place
    return obs, action, task, eps


def _outputs(heads, obs, action, eps) -> dict[str, torch.Tensor]:
    z = heads.encode(obs)
    out = {"z": z, "z_next": heads.next(z[0], action[0]), "reward": heads.reward(z, action),
           "q": heads.q_all(z, action), "q_target": heads.q_all(z, action, target=True)}
    torch.manual_seed(7)
    out["q_min"] = heads.q_value(z, action, "min")
    torch.manual_seed(7)
    out["q_avg"] = heads.q_value(z, action, "avg", detach=True)
    out["action"], info = heads.pi(z, eps=eps)
    out.update({k: info[k] for k in ("mean", "log_std", "log_prob", "scaled_entropy")})
    return out


def _forward_and_grads(model, heads, obs, action, eps):
    model.zero_grad(set_to_none=True)
    out = _outputs(heads, obs, action, eps)
    g = torch.Generator().manual_seed(3)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, msg: str) -> None:
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol * scale, msg=msg)


@pytest.mark.parametrize("fused", [True, False], ids=["native", "torch"])
def test_training_kernels_equal_the_reference_forward_and_gradients(model, fused):
    if fused and not native.available():
        pytest.skip("native kernels cannot be built here")
    obs, action, task, eps = _inputs(model)
    ref_out, ref_grads = _forward_and_grads(model, ModelHeads(model, task), obs, action, eps)
    try:
        use_native_kernels(fused)
        out, grads = _forward_and_grads(model, BatchKernels(model, task), obs, action, eps)
    finally:
        use_native_kernels(True)
    for key in ref_out:
        _close(out[key], ref_out[key], 1e-4, 1e-5, key)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        _close(grads[name], ref_grads[name], 1e-3, 2e-5, name)


def _reference_value(model, z, actions, task, eps, heads, discount):
    """MPPI's value estimate from the reference heads: discounted decoded rewards over the horizon,
    plus the discounted mean of two Q heads at the policy's (masked) terminal action."""
    cfg, ret, scale = model.cfg, 0.0, 1.0
    for t in range(actions.shape[0]):
        ret = ret + scale * two_hot_inv(model.reward(z, actions[t], task), cfg.vmin, cfg.vmax)
        z = model.next(z, actions[t], task)
        scale *= discount
    action, _ = model.pi(z, task, eps=eps)
    logits = model.Q(z, action, task, return_type="all")
    return ret + scale * two_hot_inv(logits[heads], cfg.vmin, cfg.vmax).mean(0)


@pytest.mark.parametrize("fused", [True, False], ids=["native", "torch"])
@torch.inference_mode()
def test_planning_kernels_and_value_estimates_equal_the_reference(model, fused, monkeypatch):
    if fused and not native.available():
        pytest.skip("native kernels cannot be built here")
    if not fused:
        monkeypatch.setattr(native, "available", lambda: False)  # every op takes its torch path
    cfg = model.cfg
    E, R, H = 3, 8, 3
    g = torch.Generator().manual_seed(5)
    task = torch.randint(0, len(cfg.tasks), (E,), generator=g) if model.multitask else None
    rows_task = task.repeat_interleave(R) if task is not None else None
    nets = PlanningKernels(model, task, E)
    z = model.encode(torch.randn(E * R, cfg.obs_dim, generator=g), rows_task)
    a = (torch.rand(E * R, cfg.action_dim, generator=g) * 2 - 1)
    eps = torch.randn(E * R, cfg.action_dim, generator=g)
    mask = model.action_mask(rows_task) if task is not None else torch.ones(E * R, cfg.action_dim)
    heads = torch.tensor([cfg.num_q - 1, 0])

    reward, z_next = nets.step(z.clone(), a)
    _close(reward, two_hot_inv(model.reward(z, a, rows_task), cfg.vmin, cfg.vmax), 1e-4, 1e-5, "reward")
    _close(z_next, model.next(z, a, rows_task), 1e-4, 1e-6, "next")
    _close(nets.pi(z.clone(), None if task is None else mask, eps=eps), model.pi(z, rows_task, eps=eps)[0],
           1e-4, 1e-5, "pi")
    q_ref = two_hot_inv(model.Q(z, a, rows_task, return_type="all")[heads], cfg.vmin, cfg.vmax).mean(0)
    _close(nets.q_avg(z.clone(), a, heads=heads), q_ref, 1e-4, 1e-5, "q_avg")

    agent = Agent(model, seed=0, num_samples=R, num_elites=2, num_pi_trajs=1, horizon=H)
    actions = (torch.rand(H, E * R, cfg.action_dim, generator=g) * 2 - 1) * mask
    expected = _reference_value(model, z, actions, rows_task, eps, heads, agent.discount)
    assert expected.std() > 1e-3  # values that differ between rows
    monkeypatch.setattr(Agent, "_q_heads", lambda self, device: heads)
    if fused:
        value_net = nets.value_net(heads, R, H, agent.discount)
        if native.value_kernel_available():
            assert value_net is not None, "the one-call value estimate must serve every float32 CPU model"
            _close(value_net(z, actions, mask, eps), expected, 1e-4, 1e-5, "native ValueNet")
    monkeypatch.setattr(PlanningKernels, "value_net", lambda *args: None)
    _close(agent._estimate_value(nets, z, actions, mask, eps), expected, 1e-4, 1e-5, "chunked torch value estimate")


@pytest.mark.parametrize("shape", ["q2-mt", "q10-mt", "q5-st", "odd-mt", "deep-q"])
def test_population_executor_equals_the_reference_trainer(shape):
    """One update of a one-member population (the reference heads under torch.func) equals
    Trainer(fast_kernels=False) on the same batch and noise (float64: Adam's first step turns
    rounding-level gradient differences into lr-sized steps)."""
    from agent.losses import TrainBatch
    from agent.population import Population
    from agent.train import Trainer

    base = _make(shape, dropout=0.0).double()
    H, B = 3, 8
    cfg = TrainConfig(batch_size=B, horizon=H, fast_kernels=False, distill=DistillConfig(target=None))
    g = torch.Generator().manual_seed(2)
    c = base.cfg
    task = torch.randint(0, len(c.tasks), (B,), generator=g) if base.multitask else None
    batch = TrainBatch(torch.randn(H + 1, B, c.obs_dim, generator=g, dtype=torch.float64),
                       torch.rand(H, B, c.action_dim, generator=g, dtype=torch.float64) * 2 - 1,
                       torch.rand(H, B, 1, generator=g, dtype=torch.float64), task, None)
    eps_td = torch.randn(1, H, B, c.action_dim, generator=g, dtype=torch.float64)
    eps_pi = torch.randn(1, H + 1, B, c.action_dim, generator=g, dtype=torch.float64)
    arange = torch.arange
    population = Population([copy.deepcopy(base)], cfg, seeds=[0])
    reference = copy.deepcopy(base)
    with pytest.MonkeyPatch.context() as mp:  # the random Q-head pair: heads (0, 1) on both sides
        mp.setattr(torch, "randperm", lambda n, **kw: arange(n, device=kw.get("device")))
        population.update([batch], eps_td, eps_pi)
        Trainer(reference, cfg).update(batch, eps_td[0], eps_pi[0])
    member = population.member_state_dict(0)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(member[name], value, rtol=1e-9, atol=1e-10, msg=name)


# -- fast paths that cannot serve a model say so, once ---------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(ops, "_said", set())


def test_a_float64_model_runs_on_torch_ops_with_one_warning_per_path(fresh_warnings):
    if not native.available():
        pytest.skip("native kernels cannot be built here (their absence is announced at load)")
    model = small_model(0, num_q=3, **SMALL).double().eval()
    obs, action, task, eps = _inputs(model)
    obs, action, eps = obs.double(), action.double(), eps.double()
    with pytest.warns(UserWarning, match=r"LayerNorm \+ Mish \(training\) -> torch ops: .*float64") as caught:
        for _ in range(2):
            out, _ = _forward_and_grads(model, BatchKernels(model, task), obs, action, eps)
    assert sum("LayerNorm + Mish (training)" in str(w.message) for w in caught) == 1
    ref, _ = _forward_and_grads(model, ModelHeads(model, task), obs, action, eps)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-9, atol=1e-9, msg=key)

    nets = PlanningKernels(model, task[:2], 2)
    with pytest.warns(UserWarning, match=r"one-call native MPPI value estimate -> chunked torch path: .*float64"):
        assert nets.value_net(torch.tensor([0, 1]), 4, 3, 0.99) is None
    z, a = torch.rand(8, 16, dtype=torch.float64), torch.rand(8, 6, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        nets.step(z, a)
    said = sorted(str(w.message).split(" -> ")[0] for w in caught)
    assert said == ["fused LayerNorm + Mish (planning)", "fused LayerNorm + SimNorm (planning)",
                    "fused two-hot decode (planning)"]
    assert all("float64" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nets.value_net(torch.tensor([1, 2]), 4, 3, 0.99) is None  # the same reasons: said already
        with torch.inference_mode():
            nets.step(z, a)


def test_q_ensembles_of_any_depth_keep_the_one_call_value_estimate():
    if not native.value_kernel_available():
        pytest.skip("the native value estimate cannot run here")
    for hidden in (1, 2, 4):
        model = _deeper_q(small_model(0, num_q=3, **SMALL), hidden).eval()
        nets = PlanningKernels(model, torch.tensor([0, 3]), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert nets.value_net(torch.tensor([0, 2]), 4, 3, 0.99) is not None, hidden
