"""Population training vs separate trials: aggregate student-updates/s of K students.

    population   K students in one process (agent.population.Population: torch.func over the
                 reference WorldModel), one Adam over stacked weights; eager (LayerNorm + Mish in
                 the native member kernel; what the quick preset runs on CPU) and compiled
                 (torch.compile / inductor of the vmapped step, `train.compile=on`; its compile
                 time is reported apart)
    separate     K processes, each one student with the fast single-student Trainer (what K
                 separate trials do), all started at once on this machine's cores

Both sample batches from the same episode store and distil from cached teacher rewards (d_coef
0.45), like a quick-preset trial. Student: the quick preset's shape, batch size and learning rate
(agent.mt_mini.benchmark.QUICK_DEFAULTS) on five tasks, horizon 3. Each separate process runs one
torch thread; the population process runs `--threads` (default: every core, so both sides have the
same machine). Ratios are population / separate measured in this run. The last output line is one
JSON object.

    python benchmarks/population.py [--members 1,5,10] [--updates 60] [--compile both|off|on] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agent.checkpoint import save_world_model
from agent.config import DistillConfig, TrainConfig, model_config
from agent.data import write_store
from agent.mt_mini.benchmark import QUICK_DEFAULTS
from agent.world_model import WorldModel

TASKS = ["cartpole-balance", "cup-catch", "reacher-easy", "walker-stand", "finger-spin"]
STUDENT = QUICK_DEFAULTS["student_dims"]  # the quick preset's student, batch and learning rate
BATCH = QUICK_DEFAULTS["batch_size"]


def _train_config(compile: str = "off") -> TrainConfig:
    return TrainConfig(batch_size=BATCH, lr=QUICK_DEFAULTS["lr"], distill=DistillConfig(target="reward", d_coef=0.45),
                       compile=compile)


def make_inputs(root: Path, episodes: int = 40, length: int = 51) -> tuple[Path, Path]:
    """A random episode store over TASKS (obs 24, actions 6) and a random teacher file; the
    teacher-target cache is built here, once, so no timed run pays for it."""
    from agent.train import offline_inputs

    rng = np.random.default_rng(0)
    obs = rng.standard_normal((episodes, length, 24), dtype=np.float32)
    action = rng.uniform(-1, 1, (episodes, length, 6)).astype(np.float32)
    action[:, 0] = np.nan
    reward = rng.uniform(0, 1, (episodes, length)).astype(np.float32)
    reward[:, 0] = np.nan
    store = root / "store"
    write_store(store, obs, action, reward, np.arange(episodes) % len(TASKS), tasks=TASKS, task_set="mt-mini")
    torch.manual_seed(0)
    teacher = save_world_model(WorldModel(model_config(None, tasks=TASKS, obs_dim=24, action_dim=6, enc_dim=64,
                                                       mlp_dim=64, latent_dim=32, task_dim=8, num_q=2)),
                               root / "teacher.pt")
    offline_inputs(_student(0), store, _train_config(), teacher)
    return store, teacher


def _student(seed: int) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(model_config(None, tasks=TASKS, obs_dim=24, action_dim=6, **STUDENT))


def run_population(store: Path, teacher: Path, members: int, updates: int, compile: str = "off",
                   threads: int = 1) -> tuple[float, float]:
    """(seconds of the 3 warm-up updates, which include compiling; seconds for `updates` more
    population updates of `members` students on `threads` torch threads)."""
    from agent.population import offline_members

    torch.set_num_threads(threads)
    seeds = list(range(1, members + 1))
    pop = offline_members([_student(s) for s in seeds], store, _train_config(compile), seeds, teacher, log=lambda _: None)
    started = time.perf_counter()
    pop.train(3)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    pop.train(updates)
    return warm, time.perf_counter() - started


def _separate_worker(store: str, teacher: str, seed: int, updates: int, start, done) -> None:
    from agent.train import offline_trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(**{**_train_config().__dict__, "seed": seed})
    trainer = offline_trainer(_student(seed), store, cfg, teacher)
    trainer.train(3)
    start.wait()
    trainer.train(updates)
    done.put(time.perf_counter())


def run_separate(store: Path, teacher: Path, members: int, updates: int) -> float:
    """Seconds from a common start until the last of `members` single-student processes has done
    `updates` updates (each warmed up first, like a running trial)."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(members + 1), ctx.Queue()
    procs = [ctx.Process(target=_separate_worker, args=(str(store), str(teacher), s, updates, start, done))
             for s in range(1, members + 1)]
    for p in procs:
        p.start()
    start.wait()
    began = time.perf_counter()
    ends = [done.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return max(ends) - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="1,5,10", help="population sizes K (comma-separated)")
    parser.add_argument("--updates", type=int, default=60, help="timed updates per student")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both",
                        help="population executors to time: eager (off), compiled (on) or both")
    parser.add_argument("--threads", type=int, default=mp.cpu_count(),
                        help="torch threads of the population process (default: every core)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    sizes = [int(k) for k in args.members.split(",")]
    modes = ["off", "on"] if args.compile == "both" else [args.compile]
    label = {"off": "eager", "on": "compiled"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-population-") as tmp:
        store, teacher = make_inputs(Path(tmp))
        print(f"{'K':>3} {'population':>10} {'upd/s':>8} {'separate upd/s':>15} {'ratio':>6} {'warm-up s':>10}"
              "   (aggregate student-updates/s; warm-up = 3 updates, incl. compiling)")
        for k in sizes:
            sep_s = run_separate(store, teacher, k, args.updates)
            sep_rate = k * args.updates / sep_s
            results[k] = {"separate_updates_per_s": round(sep_rate, 1)}
            for mode in modes:
                warm, pop_s = run_population(store, teacher, k, args.updates, mode, args.threads)
                pop_rate = k * args.updates / pop_s
                results[k][label[mode]] = {"population_updates_per_s": round(pop_rate, 1),
                                           "ratio": round(pop_rate / sep_rate, 2), "warm_up_s": round(warm, 1)}
                print(f"{k:>3} {label[mode]:>10} {pop_rate:>8.1f} {sep_rate:>15.1f} {pop_rate / sep_rate:>6.2f} {warm:>10.1f}",
                      flush=True)
    print(json.dumps({"benchmark": "population", "batch_size": BATCH, "student": STUDENT, "updates": args.updates,
                      "cores": mp.cpu_count(), "population_threads": args.threads, "goal": "ratio >= 3 at K = 5 on 2 cores",
                      "members": {str(k): v for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
