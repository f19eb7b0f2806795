"""Evaluating a population's members together vs one after another: seconds for K students of the
quick preset's shape on the MT-mini tasks with the MT-mini protocol (MPPI 128 x 3), measured in
this run, and whether both ways gave the same returns.

    together    agent.evaluate.evaluate_members: every member x task x episode environment in one
                lockstep batch, one agent call per step (what a trial does)
    separate    agent.evaluate.evaluate once per member, each with its own seed

Students are random (perturbed initial weights, seeds 1..K), so episodes vary like a trained
student's. The last output line is one JSON object.

    python benchmarks/member_eval.py [--members 5] [--episodes 2] [--steps 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from agent.evaluate import evaluate, evaluate_members
from agent.mt_mini.benchmark import QUICK_DEFAULTS, mt_mini_tasks, student_config
from agent.world_model import WorldModel


def _student(seed: int) -> WorldModel:
    torch.manual_seed(seed)
    model = WorldModel(student_config())
    with torch.no_grad():  # away from the zero-initialised heads, so the planner has values to rank
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=QUICK_DEFAULTS["num_seeds"], help="students K")
    parser.add_argument("--episodes", type=int, default=QUICK_DEFAULTS["eval_episodes"], help="episodes per task")
    parser.add_argument("--steps", type=int, default=QUICK_DEFAULTS["eval_max_steps"], help="agent steps per episode")
    parser.add_argument("--threads", type=int, default=QUICK_DEFAULTS["torch_threads"], help="torch threads")
    args = parser.parse_args(argv)
    for name in ("members", "episodes", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    seeds = list(range(1, args.members + 1))
    models = [_student(s) for s in seeds]
    tasks = mt_mini_tasks()
    kwargs = dict(agent_overrides=dict(QUICK_DEFAULTS["eval_planner"]), progress=False, max_steps=args.steps)
    evaluate(models[0], tasks, 1, seeds[0], **{**kwargs, "max_steps": 2})  # warm-up: native build, first calls
    started = time.perf_counter()
    together = evaluate_members(models, tasks, args.episodes, seeds, **kwargs)
    together_s = time.perf_counter() - started
    started = time.perf_counter()
    separate = [evaluate(m, tasks, args.episodes, s, **kwargs) for m, s in zip(models, seeds)]
    separate_s = time.perf_counter() - started
    same = all(a["return"].tolist() == b["return"].tolist() for a, b in zip(together, separate))
    print(f"{args.members} students x {len(tasks)} tasks x {args.episodes} episodes x {args.steps} steps, "
          f"{args.threads} thread(s): together {together_s:.1f} s, separate {separate_s:.1f} s, "
          f"speed-up {separate_s / together_s:.2f}x, same returns: {same}")
    print(json.dumps({"benchmark": "member_eval", "members": args.members, "tasks": len(tasks),
                      "episodes": args.episodes, "steps": args.steps, "threads": args.threads,
                      "together_s": round(together_s, 3), "separate_s": round(separate_s, 3),
                      "speedup": round(separate_s / together_s, 3), "same_returns": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
