"""Paper scale on one CUDA GPU (issue 14's goals), measured in one run of at most ~10 minutes.

    update_ms          ms per update of the 1M MT30 student at batch 256, horizon 3:
                       fp32 (TF32 matmuls) and bf16 autocast (population executor, K = 1; under
                       torch.compile per --compile, and eager beside it when compiled), and the
                       single-student Trainer with no teacher / cached targets / a live 317M-shaped
                       teacher (random weights)
    compile_s          seconds of the first (compiling) update / act
    population         aggregate student-updates/s of K = 1, 4, 16 1M students in one process
    mppi_act_s         one MPPI act of the 1M student at E = 1 and E = 300 environments (value
                       estimate compiled per --compile; eager at E = 300 beside it when compiled)
    teacher_cache      teacher-target transitions/s of the 317M-shaped teacher through the cache
                       builder (agent.data.teacher_cache: a synthetic store streamed from its
                       memmap in blocks of 65536 rows, read ahead into pinned memory and written
                       behind), without read-ahead, and the teacher alone on device-resident
                       inputs (the GPU bound the builder should reach)

Goals (one H100-class GPU): <= 5 ms per update (Trainer, and the K = 1 population); K = 16 >=
8x the aggregate throughput of K = 1; a 300-environment MPPI act <= 0.2 s; the cache builder >=
80% of the teacher's own rate. Ratios are against figures measured in this run only. The last output line is one JSON object; without
CUDA it says so and measures nothing.

    python benchmarks/gpu.py [--repeats 20] [--compile auto|on|off] [--dry-run-cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


def first_call(fn) -> float:
    """Seconds of one (CUDA-synchronised) call: the compile, where there is one."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def teacher_cache_rates(teacher: WorldModel, device: torch.device, rows: int, blocks: int) -> dict:
    """Transitions/s of the cache builder over a synthetic store of about `blocks` x `rows`
    entries (read-ahead 2 and 0), and of the teacher alone on device-resident blocks."""
    from agent.data import write_store
    from agent.data.teacher_cache import _Builder, world_model_teacher
    from agent.tasksets import MT30

    length = 501
    episodes = max(1, blocks * rows // (length - 1))
    rng = np.random.default_rng(0)
    functions = world_model_teacher(teacher)
    out: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        obs = rng.standard_normal((episodes, length, 24), dtype=np.float32)
        action = rng.uniform(-1, 1, (episodes, length, 6)).astype(np.float32)
        reward = rng.uniform(0, 1, (episodes, length)).astype(np.float32)
        action[:, 0], reward[:, 0] = np.nan, np.nan
        store = write_store(Path(scratch) / "store", obs, action, reward, np.arange(episodes) % 30, tasks=MT30,
                            task_set="mt30")
        transitions = episodes * (length - 1)
        for prefetch in (2, 0):
            build = _Builder(store, str(device), rows, progress=False, prefetch=prefetch)
            part = Path(scratch) / f"part-{prefetch}"
            part.mkdir()
            build.teacher_reward(part, functions)  # warm-up: allocator, kernels, page cache
            seconds = timed(lambda: build.teacher_reward(part, functions), 2, warmup=0)
            out[f"prefetch_{prefetch}"] = transitions / seconds
    obs_d = torch.randn(rows, 24, device=device)
    action_d = torch.rand(rows, 6, device=device) * 2 - 1
    task_d = torch.randint(0, 30, (rows,), device=device)
    with torch.no_grad():
        seconds = timed(lambda: functions.reward(obs_d, action_d, task_d), 5)
    out["teacher_alone"] = rows / seconds
    return out


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
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the population update and the MPPI value estimate (auto: on for CUDA)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run every step on the CPU with a 1M teacher and 1 repeat (checks the script, measures nothing)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        print("no CUDA device: nothing measured (run this on a GPU machine)")
        print(json.dumps({"benchmark": "gpu", "measured": False, "reason": "no CUDA device"}))
        return 0
    from agent import compiled
    from agent.planner import Agent
    from agent.population import Population
    from agent.train import Trainer

    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    r = 1 if args.dry_run_cpu else args.repeats
    teacher_size, rows, blocks = (1, 512, 3) if args.dry_run_cpu else (317, 65536, 8)
    compiling = compiled.wanted(args.compile, device)
    out: dict = {"benchmark": "gpu", "measured": not args.dry_run_cpu, "batch_size": BATCH,
                 "device": "cpu (dry run)" if args.dry_run_cpu else torch.cuda.get_device_name(0),
                 "teacher_size": f"{teacher_size}M (random weights)", "compile": args.compile, "compiled": compiling}

    torch.manual_seed(1)
    teacher = WorldModel(model_config(teacher_size)).to(device).eval().requires_grad_(False)
    plain, cached = batch(device), batch(device, teacher)
    distill = TrainConfig(batch_size=BATCH, distill=DistillConfig(target="reward", d_coef=0.45))
    none = TrainConfig(batch_size=BATCH, compile=args.compile, distill=DistillConfig(target=None))
    eager = TrainConfig(batch_size=BATCH, compile="off", distill=DistillConfig(target=None))
    update_ms, compile_s = {}, {}
    for name, cfg, b, live in (("trainer_no_teacher", none, plain, None), ("trainer_cached_targets", distill, cached, None),
                               ("trainer_live_teacher", distill, plain, teacher)):
        trainer = Trainer(student(0, device), cfg, teacher=live, cached_teacher=live is None and cfg is distill)
        update_ms[name] = 1000 * timed(lambda: trainer.update(b), r)
    variants = [("fp32", none, "")] + ([("fp32", eager, "_eager")] if compiling else [])
    if not args.dry_run_cpu:
        variants += [("bf16", none, "")]
    for precision, cfg, suffix in variants:
        pop = Population([student(0, device)], cfg, seeds=[0], precision=precision)
        compile_s[f"population_K1_{precision}{suffix}"] = first_call(lambda: pop.update([plain]))
        update_ms[f"population_K1_{precision}{suffix}"] = 1000 * timed(lambda: pop.update([plain]), r)
    out["update_ms"] = {k: round(v, 2) for k, v in update_ms.items()}
    if compiling:
        out["compile_speedup_K1_fp32"] = round(update_ms["population_K1_fp32_eager"] / update_ms["population_K1_fp32"], 2)

    rates = {}
    for k in (1, 2) if args.dry_run_cpu else (1, 4, 16):
        pop = Population([student(s, device) for s in range(k)], none, seeds=range(k))
        compile_s[f"population_K{k}"] = first_call(lambda: pop.update([plain] * k))
        seconds = timed(lambda: pop.update([plain] * k), max(5, r // 2))
        rates[k] = k / seconds
    out["population_updates_per_s"] = {str(k): round(v, 1) for k, v in rates.items()}
    out["population_Kmax_vs_K1"] = round(rates[max(rates)] / rates[1], 2)

    agent_model = student(0, device).eval()
    act = {}
    many = 30 if args.dry_run_cpu else 300
    runs = [(1, args.compile), (many, args.compile)] + ([(many, "off")] if compiling else [])
    for envs, setting in runs:
        agent = Agent(agent_model, seed=0, compile=setting)
        obs = torch.randn(envs, 24, device=device)
        task = torch.arange(envs, device=device) % 30
        key = f"{envs}" + ("_eager" if setting == "off" and compiling else "")
        compile_s[f"mppi_act_{key}"] = first_call(lambda: agent.act(obs, task, t0=True))
        act[key] = timed(lambda: agent.act(obs, task, t0=True), max(5, r // 2))
    out["mppi_act_s"] = {e: round(v, 4) for e, v in act.items()}
    out["compile_s"] = {k: round(v, 2) for k, v in compile_s.items()}

    cache = teacher_cache_rates(teacher, device, rows, blocks)
    out["teacher_cache_transitions_per_s"] = round(cache["prefetch_2"])
    out["teacher_cache_no_prefetch_transitions_per_s"] = round(cache["prefetch_0"])
    out["teacher_alone_transitions_per_s"] = round(cache["teacher_alone"])
    out["teacher_cache_vs_teacher_alone"] = round(cache["prefetch_2"] / cache["teacher_alone"], 3)
    if not args.dry_run_cpu:
        out["goals"] = {"update_ms<=5": update_ms["trainer_cached_targets"] <= 5,
                        "population_K1_update_ms<=5": update_ms["population_K1_fp32"] <= 5,
                        "K16>=8xK1": rates[16] / rates[1] >= 8, "mppi_300_envs<=0.2s": act[str(many)] <= 0.2,
                        "teacher_cache>=0.8x_teacher_alone": cache["prefetch_2"] >= 0.8 * cache["teacher_alone"]}
    for key, value in out.items():
        print(f"{key}: {value}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
