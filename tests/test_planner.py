"""Batched MPPI planner: the fused planning kernels equal the model's heads, plans beat random
action sequences under the model, masks/warm starts/seeding behave as specified."""
import pytest
import torch
from helpers import small_model

from agent import Agent, model_config
from agent import math as tdmath
from agent.checkpoint import load_world_model
from agent.flops import planning_flops
from agent.rollout import PlanningKernels


def _random_model(seed=0, **dims):
    return small_model(seed, noise=0.3, **{"num_q": 4, **dims}).eval()


@pytest.fixture(scope="module")
def student(fixtures_dir):
    return load_world_model(fixtures_dir / "published/mt30_1M_steps_045dist_fp16.pt")


@pytest.mark.parametrize("num_q", [2, 5])
def test_planning_kernels_equal_model_heads(num_q):
    model = _random_model(num_q=num_q)
    num_envs, rows = 3, 7
    task = torch.tensor([0, 7, 16])
    nets = PlanningKernels(model, task, num_envs)
    task_rows = task.repeat_interleave(rows)
    z = model.encode(torch.randn(num_envs * rows, 24), task_rows)
    a = torch.rand(num_envs * rows, 6) * 2 - 1
    with torch.no_grad():
        reward, z_next = nets.step(z.clone(), a)
        torch.testing.assert_close(reward, tdmath.two_hot_inv(model.reward(z, a, task_rows)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z_next, model.next(z, a, task_rows), rtol=1e-4, atol=1e-6)
        torch.manual_seed(3)
        q_fast = nets.q_avg(z.clone(), a)
        torch.manual_seed(3)
        q_ref = model.Q(z, a, task_rows, return_type="avg")
        torch.testing.assert_close(q_fast, q_ref, rtol=1e-4, atol=1e-5)
        mask = model.action_mask(task_rows)
        torch.manual_seed(4)
        pi_fast = nets.pi(z.clone(), mask)
        torch.manual_seed(4)
        pi_ref, _ = model.pi(z, task_rows)
        torch.testing.assert_close(pi_fast, pi_ref, rtol=1e-4, atol=1e-5)


def _plan_value(agent, model, obs, task, actions):
    """Value estimate (N, 1) of action sequences actions: (H, N, A) from obs of one task."""
    n = actions.shape[1]
    nets = PlanningKernels(model, task.expand(n), n)
    z = model.encode(obs.expand(n, -1), task.expand(n))
    torch.manual_seed(0)
    with torch.no_grad():
        return agent._estimate_value(nets, z, actions, model.action_mask(task.expand(n)))


def test_plan_beats_random_action_sequences(student):
    agent = Agent(student, seed=1)
    torch.manual_seed(0)
    obs, task = torch.randn(1, 24), torch.tensor([0])
    agent.act(obs, task, t0=True)
    plan = agent._prev_mean[0].unsqueeze(1)  # (H, 1, A): the final MPPI mean
    random_plans = torch.rand(agent.cfg.horizon, 256, 6) * 2 - 1
    agent.cfg.num_samples = 1  # value of whole rows, one env each
    plan_value = _plan_value(agent, student, obs, task, plan).item()
    random_values = _plan_value(agent, student, obs, task, random_plans).squeeze(1)
    assert plan_value > torch.quantile(random_values, 0.95).item()


def test_actions_masked_bounded_and_batched_over_tasks(student):
    agent = Agent(student, seed=0, iterations=2, num_samples=64, num_elites=8, num_pi_trajs=4)
    task = torch.tensor([7, 4, 0, 16])  # 1, 2, 6 and 5 action dims
    actions = agent.act(torch.randn(4, 24), task, t0=True, eval_mode=False)
    assert actions.shape == (4, 6) and actions.abs().max() <= 1
    for row, dims in zip(actions, [1, 2, 6, 5]):
        assert (row[dims:] == 0).all() and (row[:dims] != 0).any()
    assert agent._prev_mean.shape == (4, 3, 6)


def test_seeded_agents_reproduce_and_noise_only_outside_eval(student):
    obs, task = torch.randn(2, 24), torch.tensor([0, 3])
    settings = dict(iterations=2, num_samples=64, num_elites=8, num_pi_trajs=4)
    first = Agent(student, seed=5, **settings).act(obs, task, t0=True)
    again = Agent(student, seed=5, **settings).act(obs, task, t0=True)
    noisy = Agent(student, seed=5, **settings).act(obs, task, t0=True, eval_mode=False)
    assert torch.equal(first, again)
    assert not torch.equal(first, noisy)


def test_warm_start_shifts_previous_mean_only_for_continuing_envs(student):
    agent = Agent(student, seed=0, iterations=1, num_samples=64, num_elites=64, num_pi_trajs=0, min_std=0.05, max_std=0.05)
    obs, task = torch.randn(2, 24), torch.tensor([0, 0])
    agent.act(obs, task, t0=True)
    previous = agent._prev_mean.clone()
    agent.act(obs, task, t0=torch.tensor([False, True]))
    # with tiny std and all samples elite, the new mean stays near its starting point
    assert torch.allclose(agent._prev_mean[0, :-1], previous[0, 1:], atol=0.03)
    assert agent._prev_mean[1, :-1].abs().max() < 0.03  # restarted from zero


def test_policy_prior_act_is_the_squashed_mean(student):
    obs, task = torch.randn(3, 24), torch.tensor([0, 7, 12])
    actions = Agent(student, mpc=False).act(obs, task, t0=True)
    _, info = student.pi(student.encode(obs, task), task)
    assert torch.equal(actions, info["mean"])


def test_flop_count_of_the_1m_student():
    from agent.config import PlannerConfig

    gflop = planning_flops(model_config(1), PlannerConfig()) / 1e9
    assert 14 < gflop < 16  # 6 iterations x 512 samples x (3 x (reward + next) + pi + 2 Q heads)


def test_seeded_planning_ignores_the_global_torch_stream():
    model = _random_model(num_q=5)  # > 2 heads: the terminal-value head pair is a random draw too
    obs, task = torch.randn(2, 24), torch.tensor([0, 1])
    settings = dict(iterations=2, num_samples=32, num_elites=4, num_pi_trajs=2)
    torch.manual_seed(0)
    first = Agent(model, seed=3, **settings).act(obs, task, t0=True)
    torch.manual_seed(123)
    torch.randn(1000)
    assert torch.equal(first, Agent(model, seed=3, **settings).act(obs, task, t0=True))


def test_batched_planning_equals_planning_each_env_alone(student):
    obs, task = torch.randn(3, 24), torch.tensor([0, 7, 4])
    settings = dict(iterations=2, num_samples=64, num_elites=8, num_pi_trajs=4)
    batched_agent = Agent(student, seed=3, **settings)
    batched_agent.set_env_keys([10, 11, 12])
    batched = [batched_agent.act(obs, task, t0=True), batched_agent.act(obs, task, t0=False, eval_mode=False)]
    for i in range(3):
        alone = Agent(student, seed=3, **settings)
        alone.set_env_keys([10 + i])
        single = [alone.act(obs[i:i + 1], task[i:i + 1], t0=True),
                  alone.act(obs[i:i + 1], task[i:i + 1], t0=False, eval_mode=False)]
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i:i + 1], s, rtol=0, atol=1e-4)  # matmul blocking only


def test_member_environments_must_be_contiguous_and_in_range():
    from helpers import small_model

    agent = Agent([small_model(0), small_model(1)], seed=0)
    with pytest.raises(ValueError, match="contiguous"):
        agent.set_env_keys([0, 1, 2], seeds=[1, 2, 1], members=[1, 0, 0])
    with pytest.raises(ValueError, match="member 2 out of range"):
        agent.set_env_keys([0, 1], members=[0, 2])
    with pytest.raises(ValueError, match="3 seeds for 2 environments"):
        agent.set_env_keys([0, 1], seeds=[1, 2, 3])
    agent.set_env_keys([0, 1, 2], seeds=[1, 2, 2], members=[0, 1, 1])
    with pytest.raises(ValueError, match="4 environments, but set_env_keys gave members for 3"):
        agent.act(torch.zeros(4, agent.model.cfg.obs_dim), torch.zeros(4, dtype=torch.long))
