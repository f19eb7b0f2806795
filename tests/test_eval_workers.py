"""Evaluation with the environments stepped in worker processes (agent.envs.workers): the same
returns as in-process, bit for bit, and every worker joined afterwards, also on error."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pandas as pd
import pytest
import torch

import agent.envs.workers as workers_module
import agent.evaluate as evaluation
from agent.envs.workers import EnvSpec, EnvWorkerError, EnvWorkers
from agent.errors import ConfigError
from agent.evaluate import evaluate
from tests.helpers import small_model
from tests.test_evaluate import StandInAgent

TASKS, EPISODES, SEED, STEPS = ["cartpole-swingup", "reacher-easy"], 2, 3, 20


@pytest.fixture
def spawned(monkeypatch):
    """Every EnvWorkers built during the test (their processes are checked afterwards)."""
    made: list[EnvWorkers] = []
    pids: list[int] = []
    init = EnvWorkers.__init__

    def recording_init(self, *args, **kwargs):
        made.append(self)
        try:
            init(self, *args, **kwargs)
        finally:
            pids.extend(p.pid for p in self.processes)

    monkeypatch.setattr(EnvWorkers, "__init__", recording_init)
    yield pids
    assert not mp.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # joined: not even a zombie is left
            os.kill(pid, 0)


def test_workers_return_the_same_returns_as_in_process(spawned):
    model = small_model(0, num_q=2, dropout=0.0).eval()
    frames = {w: evaluate(model, TASKS, EPISODES, SEED, plan=False, progress=False, max_steps=STEPS, env_workers=w)
              for w in (0, 2)}
    assert len(spawned) == 2  # two processes, one slice of 2 environments each
    pd.testing.assert_frame_equal(frames[0], frames[2])
    np.testing.assert_array_equal(frames[0]["return"].to_numpy(), frames[2]["return"].to_numpy())
    assert frames[0]["return"].nunique() > 1


def test_workers_are_joined_when_the_agent_fails(spawned, monkeypatch):
    class FailingAgent(StandInAgent):
        def act(self, obs, task, t0, eval_mode=True):
            if len(StandInAgent.calls) == 3:
                raise RuntimeError("planner failed mid-episode")
            return super().act(obs, task, t0, eval_mode)

    monkeypatch.setattr(evaluation, "Agent", FailingAgent)
    StandInAgent.calls = []
    model = small_model(0)
    with pytest.raises(RuntimeError, match="planner failed mid-episode"):
        evaluate(model, TASKS, EPISODES, SEED, progress=False, max_steps=STEPS, env_workers=3)
    assert len(spawned) == 3


def test_a_failing_worker_reports_its_traceback_and_all_are_joined(spawned):
    specs = [EnvSpec("cartpole-swingup", 0, 0), EnvSpec("no-such-task", 0, 0)]
    with pytest.raises(EnvWorkerError, match=r"environment worker 1 failed:(.|\n)*no-such-task"):
        EnvWorkers(specs, 2, obs_pad=24)


def test_worker_count_is_checked_and_capped():
    model = small_model(0)
    with pytest.raises(ConfigError, match="env_workers must be >= 0"):
        evaluate(model, TASKS, 1, SEED, plan=False, progress=False, max_steps=2, env_workers=-1)
    group = workers_module.env_group([EnvSpec("cartpole-swingup", 0, 0)], 24, workers=0)
    assert isinstance(group, workers_module.LocalEnvs) and len(group) == 1
    obs = group.reset()
    o, r, d = group.step(np.zeros((1, 6), np.float32), np.array([False]))  # a finished env is not stepped
    np.testing.assert_array_equal(o, obs)
    assert r.tolist() == [0.0] and d.tolist() == [True]
    assert torch.is_tensor(torch.from_numpy(obs))


def test_trial_picks_env_workers_by_device(monkeypatch):
    from sweeps.trial import eval_env_workers

    monkeypatch.delenv("DISTILL_EVAL_ENV_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert eval_env_workers(torch.device("cpu")) == 0
    assert eval_env_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert eval_env_workers(torch.device("cuda")) == 2
    monkeypatch.setenv("DISTILL_EVAL_ENV_WORKERS", "3")
    assert eval_env_workers(torch.device("cpu")) == 3
