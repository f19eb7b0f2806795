"""Evaluation throughput: MPPI agent steps per second for E lockstepped environments (act + env
steps, official planner settings, published 1M student), next to the FLOP-bound limit of this CPU
measured in the same run.

    python benchmarks/eval_throughput.py [--envs 1 8 30] [--steps 3] [--budget 30] [--threads N]

FLOPs of one planning call come from `agent.flops.planning_flops` (2 * in * out per Linear per row,
element-wise work not counted, so the limit is optimistic). FLOP-bound limit in agent steps/s =
fp32 matmul GFLOP/s (the higher of the measurements before and after the runs) / GFLOP per
agent step. The last line printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from _common import matmul_peak_gflops, published_student

import numpy as np
import torch

from agent import Agent
from agent.checkpoint import load_world_model
from agent.envs import MT30, make_env, pad_obs
from agent.flops import planning_flops
from agent.world_model import WorldModel


def measure(model: WorldModel, num_envs: int, steps: int, budget_s: float, seed: int) -> dict:
    """Time up to `steps` lockstep agent steps (act + env steps; at least one, fewer once `budget_s`
    has passed) of num_envs envs running the MT30 tasks in order (cycled)."""
    tasks = [MT30[i % len(MT30)] for i in range(num_envs)]
    envs = [make_env(t, seed) for t in tasks]
    ids = torch.tensor([MT30.index(t) for t in tasks])
    obs = np.stack([pad_obs(env.reset()) for env in envs])
    agent = Agent(model, seed=seed, mpc=True)
    act_time = total_time = 0.0
    done = 0
    while done < steps and (done == 0 or total_time < budget_s):
        start = time.perf_counter()
        action = agent.act(torch.from_numpy(obs), ids, torch.full((num_envs,), done == 0)).numpy()
        acted = time.perf_counter()
        for i, env in enumerate(envs):
            o, *_ = env.step(action[i, :env.action_dim])
            obs[i, :env.obs_dim] = o
        act_time += acted - start
        total_time += time.perf_counter() - start
        done += 1
    return {"envs": num_envs, "steps": done, "act_s_per_call": act_time / done,
            "agent_steps_per_s": num_envs * done / total_time, "act_only_steps_per_s": num_envs * done / act_time,
            "planning_gflop_per_call": planning_flops(model.cfg, agent.cfg, num_envs) / 1e9}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=published_student())
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 8, 30])
    parser.add_argument("--steps", type=int, default=3, help="timed agent steps per measurement (at most)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per measurement after which no new step starts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint is None:
        parser.error("published student not found: pass --checkpoint or set $DISTILL_FIXTURES")
    model = load_world_model(args.checkpoint)
    gflops = matmul_peak_gflops()
    measure(model, 1, 1, 0.0, args.seed)  # warm-up: first-call allocations and lazy initialisation
    rows = [measure(model, num_envs, args.steps, args.budget, args.seed) for num_envs in args.envs]
    gflops_after = matmul_peak_gflops()  # a much lower value than before means the machine was busy
    peak = max(gflops, gflops_after)  # the higher of the two: a VM's slow moments must not inflate the fraction
    for row in rows:
        row["flop_bound_steps_per_s"] = row["envs"] * peak / row["planning_gflop_per_call"]
        row["fraction_of_bound"] = row["agent_steps_per_s"] / row["flop_bound_steps_per_s"]
    print(f"checkpoint: {args.checkpoint.name}   torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"fp32 matmul peak (2048^3): {gflops:.1f} GFLOP/s (after the runs: {gflops_after:.1f})")
    print(f"MPPI: {Agent(model).cfg}")
    print("steps/s = E * timed steps / wall time of act + env steps; bound = E * peak / GFLOP per act call, "
          "peak = the higher of the two measurements")
    header = f"{'E':>4} {'timed':>5} {'GFLOP/call':>11} {'s/act':>8} {'steps/s':>9} {'act-only':>9} {'bound':>9} {'of bound':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['envs']:>4} {r['steps']:>5} {r['planning_gflop_per_call']:>11.2f} {r['act_s_per_call']:>8.3f} "
              f"{r['agent_steps_per_s']:>9.2f} {r['act_only_steps_per_s']:>9.2f} {r['flop_bound_steps_per_s']:>9.2f} "
              f"{r['fraction_of_bound']:>9.1%}")
    result = {"benchmark": "eval_throughput", "checkpoint": args.checkpoint.name, "threads": torch.get_num_threads(),
              "matmul_gflops": gflops, "matmul_gflops_after": gflops_after, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
