"""Paper scale on one CUDA GPU (issue 14's goals), measured in one run of at most ~8 minutes.

    update_ms          ms per update of the 1M MT30 student at batch 256, horizon 3:
                       fp32 (TF32 matmuls) and bf16 autocast (population executor, K = 1), and the
                       single-student Trainer with no teacher / cached targets / a live 317M-shaped
                       teacher (random weights)
    population         aggregate student-updates/s of K = 1, 4, 16 1M students in one process
    mppi_act_s         one MPPI act of the 1M student at E = 1 and E = 300 environments
    teacher_cache      teacher-target transitions/s of the 317M-shaped teacher (the cache's
                       reward definition, streamed in batches of 16384 rows)

Goals (one H100-class GPU): <= 5 ms per update; K = 16 >= 8x the aggregate throughput of K = 1;
a 300-environment MPPI act <= 0.2 s. Ratios are against figures measured in this run only. The
last output line is one JSON object; without CUDA it says so and measures nothing.

    python benchmarks/gpu.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from agent.config import DistillConfig, TrainConfig, model_config
from agent.distill import TeacherTargets, teacher_observed_rewards
from agent.losses import TrainBatch
from agent.world_model import WorldModel

BATCH, HORIZON = 256, 3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn` (CUDA-synchronised) over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def batch(device: torch.device, teacher: WorldModel | None = None, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, 30, (BATCH,), generator=g)
    obs = torch.randn(HORIZON + 1, BATCH, 24, generator=g)
    action = torch.rand(HORIZON, BATCH, 6, generator=g) * 2 - 1
    reward = torch.rand(HORIZON, BATCH, 1, generator=g)
    cached = None
    if teacher is not None:
        with torch.no_grad():
            cached = TeacherTargets(reward=teacher_observed_rewards(teacher, obs[:-1].to(device), action.to(device),
                                                                    task.to(device)).cpu())
    return TrainBatch(obs, action, reward, task, cached)


def student(seed: int, device: torch.device) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(model_config(1)).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run every step on the CPU with a 1M teacher and 1 repeat (checks the script, measures nothing)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        print("no CUDA device: nothing measured (run this on a GPU machine)")
        print(json.dumps({"benchmark": "gpu", "measured": False, "reason": "no CUDA device"}))
        return 0
    from agent.planner import Agent
    from agent.population import Population
    from agent.train import Trainer

    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    r = 1 if args.dry_run_cpu else args.repeats
    teacher_size, rows = (1, 512) if args.dry_run_cpu else (317, 16384)
    out: dict = {"benchmark": "gpu", "measured": not args.dry_run_cpu, "batch_size": BATCH,
                 "device": "cpu (dry run)" if args.dry_run_cpu else torch.cuda.get_device_name(0),
                 "teacher_size": f"{teacher_size}M (random weights)"}

    torch.manual_seed(1)
    teacher = WorldModel(model_config(teacher_size)).to(device).eval().requires_grad_(False)
    plain, cached = batch(device), batch(device, teacher)
    distill = TrainConfig(batch_size=BATCH, distill=DistillConfig(target="reward", d_coef=0.45))
    none = TrainConfig(batch_size=BATCH, distill=DistillConfig(target=None))
    update_ms = {}
    for name, cfg, b, live in (("trainer_no_teacher", none, plain, None), ("trainer_cached_targets", distill, cached, None),
                               ("trainer_live_teacher", distill, plain, teacher)):
        trainer = Trainer(student(0, device), cfg, teacher=live, cached_teacher=live is None and cfg is distill)
        update_ms[name] = 1000 * timed(lambda: trainer.update(b), r)
    for precision in ("fp32",) if args.dry_run_cpu else ("fp32", "bf16"):
        pop = Population([student(0, device)], none, seeds=[0], precision=precision)
        update_ms[f"population_K1_{precision}"] = 1000 * timed(lambda: pop.update([plain]), r)
    out["update_ms"] = {k: round(v, 2) for k, v in update_ms.items()}

    rates = {}
    for k in (1, 2) if args.dry_run_cpu else (1, 4, 16):
        pop = Population([student(s, device) for s in range(k)], none, seeds=range(k))
        seconds = timed(lambda: pop.update([plain] * k), max(5, r // 2))
        rates[k] = k / seconds
    out["population_updates_per_s"] = {str(k): round(v, 1) for k, v in rates.items()}
    out["population_Kmax_vs_K1"] = round(rates[max(rates)] / rates[1], 2)

    agent_model = student(0, device).eval()
    act = {}
    for envs in (1, 30) if args.dry_run_cpu else (1, 300):
        agent = Agent(agent_model, seed=0)
        obs = torch.randn(envs, 24, device=device)
        task = torch.arange(envs, device=device) % 30
        act[envs] = timed(lambda: agent.act(obs, task, t0=True), max(5, r // 2))
    out["mppi_act_s"] = {str(e): round(v, 4) for e, v in act.items()}

    obs = torch.randn(1, rows, 24, device=device)
    action = torch.rand(1, rows, 6, device=device) * 2 - 1
    task = torch.randint(0, 30, (rows,), device=device)
    with torch.no_grad():
        seconds = timed(lambda: teacher_observed_rewards(teacher, obs, action, task), max(5, r // 2))
    out["teacher_cache_transitions_per_s"] = round(rows / seconds)
    if not args.dry_run_cpu:
        out["goals"] = {"update_ms<=5": update_ms["trainer_cached_targets"] <= 5,
                        "K16>=8xK1": rates[16] / rates[1] >= 8, "mppi_300_envs<=0.2s": act[300] <= 0.2}
    for key, value in out.items():
        print(f"{key}: {value}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
