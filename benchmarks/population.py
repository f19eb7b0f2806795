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

`--trials` times whole trials instead, as a sweep runs them (`sweeps.trial.run_trial`, the quick
preset on the shipped MT-mini data and large teacher, `--trial-steps` updates, then the preset's
final evaluation): K one-seed trials in K processes started together (one torch thread each; a
one-seed trial on CPU trains in the single-student Trainer) against one K-seed population trial
in one process (`--threads`). `--settings S` times S settings of K seeds each: S x K one-seed
trials against S population trials, each side started together; `--settings 3 --threads 1` is
the shape of the quick d_coef sweep, whose three population trials run at once with one thread
each. Both sides are timed from the processes' start to the last one's end, so imports, data and
teacher-target loading, sampling, training and evaluation all count; the teacher-target cache is
built once beforehand, in a temporary $DISTILL_CACHE.

`--cost-model` measures instead, in this process on one thread, what bounds that ratio: the update
time of the single-student Trainer and of the eager population (K in `--members`) at each batch
size B in `--batches`, fitted as

    separate:    t(B)    = fixed + per_sample * B          (one student)
    population:  t(K, B) = fixed + per_sample * K * B      (K students)

A population amortizes only `fixed`; its K-member update can never take less than per_sample * K *
B, so no K beats the ceiling t_separate(B) / (per_sample_population * B). Beside it: the matmul
floor, the update's matmul FLOPs per sample (torch's FlopCounterMode) at this host's GEMM rate for
the student's layer shapes, both measured in this run; the ceiling if every non-matmul cost vanished.

    python benchmarks/population.py [--members 1,5,10] [--updates 60] [--compile both|off|on] [--threads N]
    python benchmarks/population.py --cost-model [--batches 32,256] [--members 1,5] [--updates 20]
    python benchmarks/population.py --trials [--members 5] [--trial-steps 300] [--settings 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from _common import best_time
from agent.checkpoint import save_world_model
from agent.config import DistillConfig, TrainConfig, model_config
from agent.data import write_store
from agent.mt_mini.benchmark import QUICK_DEFAULTS
from agent.world_model import WorldModel

TASKS = ["cartpole-balance", "cup-catch", "reacher-easy", "walker-stand", "finger-spin"]
STUDENT = QUICK_DEFAULTS["student_dims"]  # the quick preset's student, batch and learning rate
BATCH = QUICK_DEFAULTS["batch_size"]


def _train_config(compile: str = "off", batch_size: int = BATCH) -> TrainConfig:
    return TrainConfig(batch_size=batch_size, lr=QUICK_DEFAULTS["lr"], distill=DistillConfig(target="reward", d_coef=0.45),
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
    pop = offline_members([_student(s) for s in seeds], store, _train_config(compile), seeds, teacher, log=lambda _: None,
                          population_of_one=True)
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


def _seconds_per_update(train: Callable[[int], object], updates: int) -> float:
    train(3)
    started = time.perf_counter()
    train(updates)
    return (time.perf_counter() - started) / updates


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(intercept), float(slope)


def matmul_floor_s_per_sample(store: Path, teacher: Path, repeats: int = 20) -> tuple[float, float, float]:
    """(matmul FLOPs per sample of one single-student update, this host's GEMM FLOP/s at the
    student's layer shapes on this thread count, their quotient: seconds per sample)."""
    from torch.utils.flop_counter import FlopCounterMode

    from agent.train import offline_trainer

    trainer = offline_trainer(_student(1), store, _train_config(), teacher)
    trainer.train(1)
    with FlopCounterMode(display=False) as counter:
        trainer.train(1)
    flops_per_sample = counter.get_total_flops() / BATCH
    # the student's hidden-layer GEMM over (horizon + 1) x batch rows (its other layers' shapes run no faster)
    width, rows = STUDENT["mlp_dim"], (4 * BATCH)
    a, w = torch.randn(rows, width), torch.randn(width, width)
    rate = 2 * rows * width * width / best_time(lambda: a @ w, repeats=repeats)
    return flops_per_sample, rate, flops_per_sample / rate


def cost_model(store: Path, teacher: Path, batches: Sequence[int], members: Sequence[int], updates: int) -> dict:
    """Fixed and per-sample update costs of both executors on one thread (see the module docstring)."""
    from agent.population import offline_members
    from agent.train import offline_trainer

    torch.set_num_threads(1)
    single, population = {}, {}
    for b in batches:
        cfg = _train_config(batch_size=b)
        trainer = offline_trainer(_student(1), store, cfg, teacher)
        single[b] = _seconds_per_update(trainer.train, updates)
        for k in members:
            seeds = list(range(1, k + 1))
            pop = offline_members([_student(s) for s in seeds], store, cfg, seeds, teacher, log=lambda _: None,
                                  population_of_one=True)
            population[(k, b)] = _seconds_per_update(pop.train, updates)
    s_fixed, s_per = _line(list(single), list(single.values()))
    p_fixed, p_per = _line([k * b for k, b in population], list(population.values()))
    flops, rate, floor = matmul_floor_s_per_sample(store, teacher)
    return {
        "separate_ms": {str(b): round(1e3 * t, 2) for b, t in single.items()},
        "population_ms": {f"K={k},B={b}": round(1e3 * t, 2) for (k, b), t in population.items()},
        "separate_fit": {"fixed_ms": round(1e3 * s_fixed, 2), "per_sample_us": round(1e6 * s_per, 2)},
        "population_fit": {"fixed_ms": round(1e3 * p_fixed, 2), "per_sample_us": round(1e6 * p_per, 2)},
        "matmul_floor": {"flops_per_sample": round(flops), "gemm_gflops": round(rate / 1e9, 1),
                         "per_sample_us": round(1e6 * floor, 2)},
        # per batch size: separate seconds per student-update over the population's least possible
        # seconds per student-update (fixed cost fully amortized); None where the fitted per-sample
        # cost is not positive (timings too noisy to bound anything)
        "ceiling_ratio_at_batch": {str(b): round(single[b] / (p_per * b), 2) if p_per > 0 else None for b in batches},
        "ceiling_ratio_at_matmul_floor": {str(b): round(single[b] / (floor * b), 2) for b in batches},
    }


def _trial_worker(config: dict, threads: int, done) -> None:
    """One trial as a sweep runs it; puts (the final fp32 scores of its members, the executor its
    training rows name) on `done`."""
    os.environ["DISTILL_TRIAL_THREADS"] = str(threads)
    from sweeps.config import TrialConfig
    from sweeps.trial import TrialContext, run_trial

    cfg = TrialConfig.from_dict(config)
    rows: list[dict] = []
    run_trial(cfg, TrialContext(f"bench-seed-{cfg.seed}-of-{cfg.num_seeds}"), lambda r, _checkpoint: rows.extend(r))
    executors = {r["executor"] for r in rows if r["phase"] == "train"}
    done.put(([r["score"] for r in rows if r["phase"] == "final" and r["quant"] == "fp32"], ",".join(sorted(executors))))


def _run_trials(configs: list[dict], threads: int) -> tuple[float, list[float], list[str]]:
    """Seconds from starting one process per config until the last has finished its trial, the
    final fp32 scores of all their members, and the executors the trials ran (sorted, distinct)."""
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    began = time.perf_counter()
    procs = [ctx.Process(target=_trial_worker, args=(c, threads, done)) for c in configs]
    for p in procs:
        p.start()
    scores: list[float] = []
    executors: set[str] = set()
    for _ in procs:
        while True:  # a process that dies before reporting must not leave this waiting
            try:
                trial_scores, executor = done.get(timeout=2)
                scores += trial_scores
                executors.add(executor)
                break
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    for p in procs:
                        p.kill()  # the processes this benchmark started
                    raise RuntimeError(f"a benchmark trial process exited with {dead[0]} (its stderr says why)") from None
    for p in procs:
        p.join()
    return time.perf_counter() - began, scores, sorted(executors)


def whole_trials(members: int, steps: int, threads: int, work: Path, preset: str = "quick", settings: int = 1) -> dict:
    """settings x K one-seed trials in as many processes against `settings` K-seed trials of
    `preset`, each side's processes started together (see the module docstring); setting i trains
    seeds i K + 1 .. (i + 1) K. `work` holds the caches (and the smoke preset's generated inputs).
    $DISTILL_CACHE points there during the call (the trial processes inherit it) and is put back
    afterwards."""
    previous = os.environ.get("DISTILL_CACHE")
    os.environ["DISTILL_CACHE"] = str(work)  # the MT-mini store copy and teacher-target cache go here
    try:
        return _whole_trials(members, steps, threads, work, preset, settings)
    finally:
        if previous is None:
            os.environ.pop("DISTILL_CACHE", None)
        else:
            os.environ["DISTILL_CACHE"] = previous


def _whole_trials(members: int, steps: int, threads: int, work: Path, preset: str, settings: int) -> dict:
    from agent.train import offline_inputs
    from sweeps.config import preset_config
    from sweeps.setup import resolve_inputs
    from sweeps.trial import build_student, train_config

    inputs = resolve_inputs(preset, [], None, work / "inputs")
    base = preset_config(preset).with_overrides({"data": inputs.data, "teacher": inputs.teachers[inputs.default_teacher],
                                                 "steps": steps, "eval_every": steps, "eval_at_start": False})
    base.validate()
    offline_inputs(build_student(base, _store_tasks(inputs.data)), inputs.data,
                   train_config(base), base.teacher)  # builds the teacher-target cache once, untimed
    separate_s, separate_scores, separate_executors = _run_trials(
        [{**base.to_dict(), "seed": seed, "num_seeds": 1} for seed in range(1, settings * members + 1)], 1)
    population_s, population_scores, population_executors = _run_trials(
        [{**base.to_dict(), "seed": 1 + i * members, "num_seeds": members} for i in range(settings)], threads)
    return {"members": members, "settings": settings, "steps": steps, "final_eval_episodes": base.episodes_at(steps),
            "scores": {"separate": len(separate_scores), "population": len(population_scores)},
            "executors": {"separate": separate_executors, "population": population_executors},
            "separate_s": round(separate_s, 1), "population_s": round(population_s, 1),
            "ratio": round(separate_s / population_s, 2),
            "separate_mean_score": round(float(np.mean(separate_scores)), 2),
            "population_mean_score": round(float(np.mean(population_scores)), 2)}


def _store_tasks(data: str) -> list[str]:
    from agent.data import EpisodeStore

    return list(EpisodeStore(data).manifest.tasks)


def print_cost_model(result: dict) -> None:
    s, p, f = result["separate_fit"], result["population_fit"], result["matmul_floor"]
    print("one thread, ms per update:")
    for b, t in result["separate_ms"].items():
        print(f"  separate (1 student), B={b}: {t}")
    for key, t in result["population_ms"].items():
        print(f"  population {key}: {t}")
    print(f"fit: separate {s['fixed_ms']} ms + {s['per_sample_us']} us x B; "
          f"population {p['fixed_ms']} ms + {p['per_sample_us']} us x K x B")
    print(f"matmul floor: {f['flops_per_sample'] / 1e6:.2f} MFLOP per sample at {f['gemm_gflops']} GFLOP/s = "
          f"{f['per_sample_us']} us per sample")
    for b, r in result["ceiling_ratio_at_batch"].items():
        ceiling = f"{r}x" if r is not None else "none (per-sample cost fitted <= 0: time more updates)"
        print(f"B={b}: ceiling of population / separate over every K: {ceiling}; "
              f"with only matmuls left: {result['ceiling_ratio_at_matmul_floor'][b]}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="1,5,10", help="population sizes K (comma-separated)")
    parser.add_argument("--updates", type=int, default=60, help="timed updates per student")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both",
                        help="population executors to time: eager (off), compiled (on) or both")
    parser.add_argument("--threads", type=int, default=mp.cpu_count(),
                        help="torch threads of the population process (default: every core)")
    parser.add_argument("--cost-model", action="store_true",
                        help="fit fixed and per-sample update costs on one thread instead (module docstring)")
    parser.add_argument("--batches", default=f"32,{BATCH}", help="batch sizes of --cost-model (comma-separated)")
    parser.add_argument("--trials", action="store_true",
                        help="time whole trials (train, evaluate) as a sweep runs them instead (module docstring)")
    parser.add_argument("--trial-steps", type=int, default=300, help="updates per trial of --trials")
    parser.add_argument("--settings", type=int, default=1,
                        help="--trials: settings timed together, each K seeds (3 with --threads 1: the quick d_coef sweep's shape)")
    args = parser.parse_args(argv)
    if args.trial_steps < 1:
        parser.error(f"--trial-steps must be >= 1, got {args.trial_steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.settings < 1:
        parser.error(f"--settings must be >= 1, got {args.settings}")
    sizes = [int(k) for k in args.members.split(",")]
    if args.trials:
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-population-trials-") as tmp:
            for k in sizes:
                result = whole_trials(k, args.trial_steps, args.threads, Path(tmp), settings=args.settings)
                n = args.settings
                print(f"K={k}: {n * k} one-seed trials {result['separate_s']} s, {n} {k}-seed population trial(s) "
                      f"{result['population_s']} s: {result['ratio']}x ({args.trial_steps} updates, final evaluation "
                      f"{result['final_eval_episodes']} episodes per task)", flush=True)
                results.append(result)
        print(json.dumps({"benchmark": "population-trials", "cores": mp.cpu_count(), "population_threads": args.threads,
                          "goal": "ratio >= 3 at K = 5 on 2 cores", "trials": results}))
        return 0
    if args.cost_model:
        batches = [int(b) for b in args.batches.split(",")]
        if len(set(batches)) < 2:
            parser.error(f"--cost-model needs two or more batch sizes to fit a line, got --batches {args.batches}")
        with tempfile.TemporaryDirectory(prefix="bench-population-") as tmp:
            store, teacher = make_inputs(Path(tmp))
            result = cost_model(store, teacher, batches, sizes, args.updates)
        print_cost_model(result)
        print(json.dumps({"benchmark": "population-cost-model", "student": STUDENT, "updates": args.updates,
                          "threads": 1, **result}))
        return 0
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
