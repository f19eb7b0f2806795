"""torch.compile of the population update and of the planner's value estimate (agent.compiled):
the compiled functions are the reference ones, so they give the eager results; a compile that fails
falls back to eager with one warning naming the reason.

The fast tests compile with dynamo's "aot_eager" backend (dynamo + AOTAutograd: the same traced
graph of vmap(grad_and_value(functional_call(...))), without inductor's C++ code generation, which
takes minutes on a busy 2-core machine); `pytest -m slow` runs the update through inductor too."""
from __future__ import annotations

import warnings

import pytest
import torch

from agent import compiled, ops
from agent.config import DistillConfig, TrainConfig
from agent.distill import TeacherTargets
from agent.errors import ConfigError
from agent.losses import TrainBatch
from agent.planner import Agent
from agent.population import Population
from agent.rollout import PlanningKernels
from tests.helpers import small_model

H, B, K, STEPS = 1, 8, 2, 2


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(ops, "_said", set())


@pytest.fixture
def aot_eager(monkeypatch, fresh_warnings):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batches(steps: int, num_tasks: int) -> list[list[TrainBatch]]:
    g = torch.Generator().manual_seed(7)
    return [[TrainBatch(torch.randn(H + 1, B, 24, generator=g), torch.rand(H, B, 6, generator=g) * 2 - 1,
                        torch.rand(H, B, 1, generator=g), torch.randint(0, num_tasks, (B,), generator=g),
                        TeacherTargets(reward=torch.rand(H, B, 1, generator=g))) for _ in range(K)]
            for _ in range(steps)]


def _train(compile: str, steps: int = STEPS):
    """K tiny students (num_q 2, no dropout: nothing random inside the graph) trained `steps`
    updates on cached teacher rewards with given noise."""
    models = [small_model(seed=s, num_q=2, dropout=0.0) for s in range(K)]
    cfg = TrainConfig(batch_size=B, horizon=H, fast_kernels=False, compile=compile,
                      distill=DistillConfig(target="reward", d_coef=0.45))
    g = torch.Generator().manual_seed(3)
    batches = _batches(steps, len(models[0].cfg.tasks))
    pop = Population(models, cfg, seeds=range(K), cached_teacher=True)
    metrics = [pop.update(batches[t], torch.randn(K, H, B, 6, generator=g), torch.randn(K, H + 1, B, 6, generator=g))
               for t in range(steps)]
    return pop, metrics


def _fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if "-> eager" in str(w.message)]


def _assert_same_training(a: Population, b: Population, ma, mb, rtol: float, atol: float) -> None:
    for store in ("params", "targets"):
        for name, value in getattr(a, store).items():
            torch.testing.assert_close(getattr(b, store)[name], value, rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(b.scale_values, a.scale_values, rtol=rtol, atol=atol)
    for key in ("total", "consistency", "reward", "value", "distill", "pi_loss", "grad_norm"):
        assert [m[key] for m in mb[-1]] == pytest.approx([m[key] for m in ma[-1]], rel=1e-4, abs=1e-5), key


def test_compiled_population_update_equals_eager(aot_eager):
    eager, eager_metrics = _train("off")
    assert eager._model_update == eager._model_step  # off: the plain bound method, nothing wrapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pop, metrics = _train("on")
    assert not _fallbacks(caught)  # the compiled path served
    assert isinstance(pop._model_update, compiled.Compiled) and isinstance(pop._policy_update, compiled.Compiled)
    assert pop._model_update.failed is None and pop._policy_update.failed is None
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 2, "dynamo compiled no graph"
    _assert_same_training(eager, pop, eager_metrics, metrics, rtol=1e-5, atol=1e-6)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, fresh_warnings):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no code generator here")

    monkeypatch.setattr(compiled, "BACKEND", broken_backend)
    torch._dynamo.reset()
    eager, eager_metrics = _train("off", steps=2)
    with pytest.warns(UserWarning, match=r"population's (model|policy) update -> eager: .*no code generator here") as caught:
        pop, metrics = _train("on", steps=2)
    torch._dynamo.reset()
    said = _fallbacks(caught)
    assert len(said) == 2, said  # once per compiled step (model, policy), not once per update
    assert "model update" in said[0] and "policy update" in said[1]
    assert pop._model_update.failed and "no code generator here" in pop._model_update.failed
    _assert_same_training(eager, pop, eager_metrics, metrics, rtol=0, atol=0)  # the eager function ran


def test_an_error_of_the_computation_itself_propagates_and_keeps_the_compiled_path(fresh_warnings):
    calls = []

    def fn(x):
        calls.append(x)
        raise ValueError("bad input")

    wrapped = compiled.Compiled(fn, "test path")
    wrapped.compiled = fn  # stand-in for a compiled function that raises the same error
    with pytest.raises(ValueError, match="bad input"):
        wrapped(torch.ones(1))
    assert wrapped.failed is None and len(calls) == 2  # compiled, then eager: the eager error propagates


def test_settings():
    assert not compiled.wanted("auto", "cpu") and compiled.wanted("auto", "cuda") and compiled.wanted("on", "cpu")
    assert not compiled.wanted("off", "cuda")
    fn = lambda x: x  # noqa: E731
    assert compiled.maybe_compile(fn, "test", "auto", "cpu") is fn
    assert compiled.resolve_mode(None, "cpu", cuda_default="reduce-overhead") == "default"
    assert compiled.resolve_mode(None, "cuda", cuda_default="reduce-overhead") == "reduce-overhead"
    with pytest.raises(ConfigError, match="captures CUDA graphs"):
        compiled.resolve_mode("reduce-overhead", "cpu")
    with pytest.raises(ConfigError, match="compile must be one of"):
        TrainConfig(compile="yes").validate()
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fast").validate()
    with pytest.raises(ConfigError, match="compile must be one of"):
        Agent(small_model(0), compile="always")
    with pytest.raises(ConfigError, match="captures CUDA graphs"):
        Population([small_model(0)], TrainConfig(compile="on", compile_mode="reduce-overhead",
                                                 distill=DistillConfig(target=None)))


def test_compiled_planner_value_estimate_equals_the_torch_path(aot_eager, monkeypatch):
    """On the torch path (the native one-call estimate switched off) a compiled planner plans the
    same actions as the eager one, from the same random streams."""
    monkeypatch.setattr(PlanningKernels, "value_net", lambda *args: None)
    model = small_model(0, num_q=2, dropout=0.0).eval()
    obs, task = torch.randn(3, 24, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 4, 7])
    plans = {}
    for setting in ("off", "on"):
        agent = Agent(model, seed=0, compile=setting, iterations=2, num_samples=32, num_elites=4, num_pi_trajs=4)
        plans[setting] = torch.stack([agent.act(obs, task, t0=t == 0, eval_mode=t != 1) for t in range(3)])
        if setting == "on":
            assert agent._compiled_value is not None and agent._compiled_value.failed is None
    torch.testing.assert_close(plans["on"], plans["off"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_population_update_equals_eager(fresh_warnings, monkeypatch):
    """The default backend (inductor, C++ kernels on CPU): minutes on a busy 2-core machine."""
    monkeypatch.setattr(compiled, "BACKEND", "inductor")
    torch._dynamo.reset()
    eager, eager_metrics = _train("off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pop, metrics = _train("on")
    assert not _fallbacks(caught)
    assert pop._model_update.failed is None and pop._policy_update.failed is None
    # inductor fuses and reorders float32 reductions: rounding-level differences, grown by Adam
    _assert_same_training(eager, pop, eager_metrics, metrics, rtol=1e-4, atol=1e-5)
