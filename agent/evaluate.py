"""Evaluation of a world model on MT30 tasks with the official TD-MPC2 protocol, batched.

Official protocol: every task's environment is built with the evaluation `seed`; episode k of a
task is the k-th reset of that environment; an episode lasts 500 agent steps; the return is the
float32 running sum of the step rewards; score = return / 10; the normalized score is the mean over
tasks of the mean score over episodes.

`evaluate` steps all (task, episode) environments in lockstep with one agent call per step: env
copy k of a task is reset k + 1 times (the first k resets are discarded), so it starts from the
same state as the k-th episode of a sequential run. `evaluate(..., batched=False)` runs that
sequential loop (one environment per task, E = 1 per agent call) as the reference.
`evaluate_members` evaluates several models of one architecture (a population's members, each
with its own seed) in one lockstep batch: every member's environments in the same agent calls,
each member planning with its own weights and random streams, as `evaluate` would alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from agent.envs import DMCEnv, TaskSet, check_task
from agent.envs.workers import EnvSpec, EnvWorkers, LocalEnvs, build_env, env_group
from agent.errors import ConfigError
from agent.planner import Agent
from agent.tasksets import EPISODE_LENGTH, MT30
from agent.world_model import WorldModel

COLUMNS = ["task", "episode", "return", "score"]
SCORE_DIVISOR = 10.0  # DMControl score = return / 10 (returns lie in [0, 1000])


@dataclass(frozen=True)
class _Slot:
    """One (task, episode) environment of a batched evaluation."""

    task: str
    task_id: int
    episode: int
    member: int = 0


def _task_set(model: WorldModel, tasks: Sequence[str], task_set: Sequence[str] | None) -> TaskSet:
    """The ordered task list whose indices are the model's task ids, padded to the model's widths."""
    for task in tasks:
        check_task(task)  # unknown / Meta-World names fail with their own message first
    names = task_set if task_set is not None else getattr(model.cfg, "tasks", None) or MT30
    ts = TaskSet(tuple(names), obs_pad=model.cfg.obs_dim, action_pad=model.cfg.action_dim)
    missing = [t for t in tasks if t not in ts.names]
    if missing:
        raise ConfigError(f"tasks {missing} are not in the model's task set ({', '.join(ts.names)})")
    return ts


def _make_agent(model: WorldModel | list[WorldModel], plan: bool, seed: int, overrides: dict[str, Any] | None,
                compile: str = "auto") -> Agent:
    settings = {"seed": seed, **(overrides or {}), "mpc": plan}
    return Agent(model, compile=compile, **settings)


def _act(agent: Agent, obs: np.ndarray, task_ids: torch.Tensor | None, t0: bool) -> np.ndarray:
    """obs: (E, obs_pad) float32 -> actions (E, action_pad) float32."""
    num_envs = obs.shape[0]
    action = agent.act(torch.from_numpy(obs), task_ids, torch.full((num_envs,), t0, dtype=torch.bool), eval_mode=True)
    return action.detach().cpu().numpy().astype(np.float32, copy=False)


def _env_at_episode(task: str, seed: int, episode: int, max_steps: int | None) -> DMCEnv:
    """An env of `task` built with `seed` and reset `episode` times, so its next reset is episode `episode`."""
    return build_env(EnvSpec(task, seed, episode, max_steps))


def _run_lockstep(agent: Agent, envs: list[DMCEnv] | LocalEnvs | EnvWorkers, slots: list[_Slot], ts: TaskSet,
                  multitask: bool, bar: tqdm, member_seeds: list[int] | None = None) -> np.ndarray:
    """Run one episode in each env, all in lockstep (one agent call per step). Returns (E,) float32 returns.

    `envs`: a list of environments (stepped here) or an env group (`agent.envs.workers`: in this
    process or in worker processes). Each (task, episode) plans with its own random stream, so
    batching does not change its noise. member_seeds: the agent seed of each member (several
    members: slot i plans with member `slots[i].member`'s weights and seed)."""
    group = envs if isinstance(envs, (LocalEnvs, EnvWorkers)) else LocalEnvs(envs, ts.obs_pad)
    num_envs = len(group)
    task_ids = [s.task_id for s in slots]
    keys = [s.task_id * 1_000_003 + s.episode for s in slots]
    if member_seeds is None:
        agent.set_env_keys(keys)
    else:
        agent.set_env_keys(keys, seeds=[member_seeds[s.member] for s in slots], members=[s.member for s in slots])
    obs = group.reset()  # (E, obs_pad)
    ids = torch.tensor(task_ids, dtype=torch.long) if multitask else None
    returns = np.zeros(num_envs, np.float32)
    running = np.ones(num_envs, bool)
    t = 0
    while running.any():
        actions = _act(agent, obs, ids, t0=t == 0)  # finished envs keep their last obs; their actions are unused
        obs, reward, done = group.step(actions, running)
        for i in np.flatnonzero(running):
            returns[i] += np.float32(reward[i])
            running[i] = not done[i]
        t += 1
        bar.update(1)
    return returns


def evaluate(model: WorldModel, tasks: Sequence[str], episodes: int, seed: int, plan: bool = True,
             agent_overrides: dict[str, Any] | None = None, progress: bool = True,
             task_set: Sequence[str] | None = None, batched: bool = True,
             max_steps: int | None = None, env_workers: int = 0, compile: str = "auto") -> pd.DataFrame:
    """Evaluate `model` on `tasks` (names) for `episodes` episodes each.

    plan: MPPI (True) or the policy prior's mean action (False).
    agent_overrides: PlannerConfig fields (iterations, num_samples, horizon, ...) and/or `seed`
        (the agent's torch seed; default `seed`).
    task_set: ordered task names whose indices are the model's task ids (default: the model's
        `cfg.tasks`, MT30 for MT30 models).
    batched: lockstep over all (task, episode) envs (True) or the sequential official loop (False).
    max_steps: shorter episodes for tests (default: the official 500 agent steps).
    env_workers: step the lockstep environments in this many worker processes (each owns a slice
        of the (task, episode) environments, built from the same seeds; `agent.envs.workers`), so
        MuJoCo does not serialize behind the planner; 0 steps them in this process. The returns
        are the same either way. The sequential loop (batched=False) always runs in-process.
    compile: the planner's value estimate under torch.compile: "auto" (on for CUDA models), "on",
        "off" (see `agent.compiled`).

    Returns one row per (task, episode): task, episode, return (float32 running sum), score = return / 10.
    """
    tasks = list(tasks)
    if not batched:
        _check_request(tasks, episodes, max_steps, env_workers)
        ts = _task_set(model, tasks, task_set)
        agent = _make_agent(model, plan, seed, agent_overrides, compile)
        slots = [_Slot(task, ts.task_id(task), k) for task in tasks for k in range(episodes)]
        returns = np.zeros(len(slots), np.float32)
        desc = _progress_label(1, len(tasks), episodes, plan)
        with tqdm(total=(max_steps or EPISODE_LENGTH) * len(slots), desc=desc, disable=not progress, leave=False) as bar:
            i = 0
            for task in tasks:  # the official loop: one env per task, successive resets
                env = _env_at_episode(task, seed, 0, max_steps)
                for _ in range(episodes):
                    returns[i] = _run_lockstep(agent, [env], [slots[i]], ts, bool(getattr(model, "multitask", True)), bar)[0]
                    i += 1
        return _frame(slots, returns)
    return _evaluate_batched([model], tasks, episodes, [seed], plan, agent_overrides, progress, task_set, max_steps,
                             env_workers, compile)[0]


def evaluate_members(models: Sequence[WorldModel], tasks: Sequence[str], episodes: int, seeds: Sequence[int],
                     plan: bool = True, agent_overrides: dict[str, Any] | None = None, progress: bool = True,
                     task_set: Sequence[str] | None = None, max_steps: int | None = None, env_workers: int = 0,
                     compile: str = "auto") -> list[pd.DataFrame]:
    """`evaluate(models[k], tasks, episodes, seeds[k], ...)` for every k, as one lockstep batch of
    all K x tasks x episodes environments (one agent call per step; each member's value estimate
    runs over its own rows with its own weights). models: K models of one architecture (e.g. a
    population's members); seeds: (K,) their evaluation seeds (environment seeds and, unless
    agent_overrides sets one, planner seeds). Returns K DataFrames in evaluate()'s format."""
    models, seeds = list(models), [int(s) for s in seeds]
    if not models or len(models) != len(seeds):
        raise ConfigError(f"evaluate_members: {len(models)} models for {len(seeds)} seeds")
    shapes = {(m.cfg.obs_dim, m.cfg.action_dim, m.cfg.latent_dim, m.cfg.mlp_dim, m.cfg.num_q) for m in models}
    if len(shapes) > 1:
        raise ConfigError(f"evaluate_members: the models differ in architecture {sorted(shapes)}")
    return _evaluate_batched(models, tasks, episodes, seeds, plan, agent_overrides, progress, task_set, max_steps,
                             env_workers, compile)


def _check_request(tasks: Sequence[str], episodes: int, max_steps: int | None, env_workers: int) -> None:
    if episodes < 1:
        raise ConfigError(f"evaluate: episodes must be >= 1, got {episodes}")
    if not tasks:
        raise ConfigError("evaluate: no tasks given")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"evaluate: max_steps must be >= 1, got {max_steps}")
    if env_workers < 0:
        raise ConfigError(f"evaluate: env_workers must be >= 0, got {env_workers}")


def _evaluate_batched(models: list[WorldModel], tasks: Sequence[str], episodes: int, seeds: list[int], plan: bool,
                      agent_overrides: dict[str, Any] | None, progress: bool, task_set: Sequence[str] | None,
                      max_steps: int | None, env_workers: int, compile: str) -> list[pd.DataFrame]:
    """One lockstep run over every (member, task, episode) environment; member k's environments
    are built with seeds[k]. Returns one DataFrame per member."""
    tasks = list(tasks)
    _check_request(tasks, episodes, max_steps, env_workers)
    ts = _task_set(models[0], tasks, task_set)
    multitask = bool(getattr(models[0], "multitask", True))
    agent = _make_agent(models if len(models) > 1 else models[0], plan, seeds[0], agent_overrides, compile)
    slots = [_Slot(task, ts.task_id(task), k, member) for member in range(len(models))
             for task in tasks for k in range(episodes)]
    planner_seeds = None
    if len(models) > 1:
        planner_seeds = [int((agent_overrides or {}).get("seed", s)) for s in seeds]
    desc = _progress_label(len(models), len(tasks), episodes, plan)
    specs = [EnvSpec(s.task, seeds[s.member], s.episode, max_steps) for s in slots]
    # eval mode once for the whole run: otherwise every agent call switches each member back and forth
    training = [m for m in models if getattr(m, "training", False)]
    for m in training:
        m.eval()
    try:
        with tqdm(total=max_steps or EPISODE_LENGTH, desc=desc, disable=not progress, leave=False) as bar:
            with env_group(specs, ts.obs_pad, env_workers) as envs:
                returns = _run_lockstep(agent, envs, slots, ts, multitask, bar, planner_seeds)
    finally:
        for m in training:
            m.train(True)
    per_member = len(tasks) * episodes
    return [_frame(slots[k * per_member:(k + 1) * per_member], returns[k * per_member:(k + 1) * per_member])
            for k in range(len(models))]


def _progress_label(models: int, tasks: int, episodes: int, plan: bool) -> str:
    members = f"{models} models x " if models > 1 else ""
    return f"eval {members}{tasks} tasks x {episodes} ep ({'MPPI' if plan else 'policy'})"


def _frame(slots: list[_Slot], returns: np.ndarray) -> pd.DataFrame:
    """evaluate()'s rows: task, episode, return (float64 of the float32 sum), score."""
    return pd.DataFrame({
        "task": [s.task for s in slots],
        "episode": [s.episode for s in slots],
        "return": returns.astype(np.float64),
        "score": returns.astype(np.float64) / SCORE_DIVISOR,
    }, columns=COLUMNS)


def evaluate_sequential(model: WorldModel, tasks: Sequence[str], episodes: int, seed: int, **kwargs: Any) -> pd.DataFrame:
    """`evaluate` with one environment at a time (the official loop); the batched run's reference."""
    return evaluate(model, tasks, episodes, seed, batched=False, **kwargs)


def task_scores(df: pd.DataFrame) -> dict[str, float]:
    """task -> mean score over its episodes, in first-appearance order."""
    means = df.groupby("task", sort=False)["score"].mean()
    return {task: float(score) for task, score in means.items()}


def normalized_score(df: pd.DataFrame) -> float:
    """Mean over tasks of the mean episode score (each task weighs the same)."""
    if df.empty:
        raise ConfigError("normalized_score: no evaluation rows")
    return float(np.mean(list(task_scores(df).values())))
