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

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from agent.checkpoint import load_world_model
from agent.cli import OneLineParser
from agent.config import PlannerConfig
from agent.envs import DMCEnv, TaskSet, check_task
from agent.envs.workers import EnvSpec, EnvWorkers, LocalEnvs, build_env, env_group
from agent.errors import ConfigError, DistillError
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


def score_standard_error(df: pd.DataFrame) -> float | None:
    """Standard error of `normalized_score(df)` from the spread of the episode scores:
    sqrt(sum over tasks of var(task's episode scores, ddof=1) / its episodes) / number of tasks.
    None with one episode of some task (no spread to estimate it from)."""
    normalized_score(df)  # raises on an empty evaluation
    per_task = df.groupby("task", sort=False)["score"]
    if per_task.count().min() < 2:
        return None
    variance_of_means = per_task.var(ddof=1) / per_task.count()
    return float(np.sqrt(variance_of_means.sum()) / len(variance_of_means))


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.evaluate CHECKPOINT [...]`: evaluate saved students or teachers (any layout
    `load_world_model` reads) and print each one's per-task and normalized scores with the score's
    standard error; `--csv` also writes every episode."""
    parser = OneLineParser("agent.evaluate", description="Evaluate world-model checkpoints with the official protocol "
                           "(batched MPPI, score = return / 10, normalized score = mean over tasks).")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (default: every task of the checkpoint's task set)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed: environments and planner (default 1)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="agent steps per episode (default: the official 500; MT-mini sweeps use 200)")
    parser.add_argument("--planner", action="append", default=[], metavar="KEY=VALUE",
                        help="an MPPI setting (JSON value), e.g. --planner iterations=3 --planner num_samples=128")
    parser.add_argument("--policy", action="store_true", help="act with the policy prior's mean instead of MPPI")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model plans (default auto: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--env-workers", type=int, default=0, help="processes stepping the environments (default 0)")
    parser.add_argument("--csv", type=Path, default=None, help="also write every episode here (checkpoint, task, "
                        "episode, return, score)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.planner:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--planner {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--planner {item!r}: {value!r} is not a JSON value")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
    for flag, value, least in (("--episodes", args.episodes, 1), ("--max-steps", args.max_steps, 1),
                               ("--env-workers", args.env_workers, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    if tasks == []:
        parser.error("--tasks names no task")
    if args.csv is not None and not args.csv.parent.is_dir():
        parser.error(f"--csv {args.csv}: no directory {args.csv.parent}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if overrides:
            PlannerConfig().override(**overrides)  # a bad setting is refused before any checkpoint loads
        models = [load_world_model(path, device=device) for path in args.checkpoints]  # all checked before any runs
        frames = []
        for path, model in zip(args.checkpoints, models):
            model_tasks = tasks if tasks is not None else list(getattr(model.cfg, "tasks", None) or MT30)
            df = evaluate(model, model_tasks, args.episodes, args.seed, plan=not args.policy,
                          agent_overrides=overrides, max_steps=args.max_steps, env_workers=args.env_workers)
            frames.append(df.assign(checkpoint=str(path)))
            print(_evaluation_text(str(path), df, args))
    except DistillError as exc:
        return parser.refuse(exc)
    if args.csv is not None:
        pd.concat(frames, ignore_index=True)[["checkpoint", *COLUMNS]].to_csv(args.csv, index=False)
        print(f"episodes: {args.csv}")
    return 0


def _evaluation_text(path: str, df: pd.DataFrame, args: Any) -> str:
    """One checkpoint's result: its normalized score (± standard error), then one line per task."""
    se = score_standard_error(df)
    spread = f" ± {se:.2f} (standard error over episodes)" if se is not None else " (1 episode per task: no standard error)"
    lines = [f"{path}: normalized score {normalized_score(df):.2f}{spread}; {args.episodes} episodes per task, "
             f"seed {args.seed}, {'policy prior' if args.policy else 'MPPI'}"]
    width = max(len(task) for task in task_scores(df))
    lines += [f"  {task:<{width}}  {score:7.2f}" for task, score in task_scores(df).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
