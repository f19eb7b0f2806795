"""Milliseconds per update of the 1M MT30 student (model_config(1)) at batch 256, horizon 3.

Variants, timed in interleaved rounds (so machine load hits them alike):
    no_teacher       TD-MPC2 loss only
    live_teacher     + reward distillation from a live 1M teacher (published fp16 file if present)
    cached_targets   + reward distillation from cached teacher rewards carried by the batches
    reference        this codebase's straightforward path (model methods, per-op Adam, no denormal
                     flush, eager Mish): the same algorithm without the speed work, for context
Ratios are only between variants measured in this run (each against the reference path). The
authors' code is not run here: their figures from elsewhere (EXTERNAL, with source, machine and
date) are printed beside the table for context and never divided by. The last output line is one
JSON object.

    python benchmarks/update_speed.py [--threads 1] [--rounds 7] [--updates 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import fixtures_path, matmul_peak_gflops

from agent.checkpoint import load_world_model
from agent.config import TrainConfig, model_config
from agent.distill import TeacherTargets, teacher_observed_rewards
from agent.losses import TrainBatch
from agent.tasksets import MT30, action_dims, obs_dims
from agent.train import Trainer
from agent.world_model import WorldModel

# Figures from elsewhere: printed, labelled, never divided by (a ratio needs both sides timed in one run).
EXTERNAL = {
    "what": "ms per update of the 1M student, batch 256: the authors' TD-MPC-Opt code patched to CPU, "
            "timed side by side with this codebase in one run",
    "source": "issue 17 (not measured by this script)",
    "machine": "this project's 2-core development VM",
    "date": "not recorded",
    "authors_ms": {"no_teacher": "156-169", "live_teacher": "168-182"},
    "this_codebase_ms_same_run": {"no_teacher": "85-93", "live_teacher": "89-100"},
}
TEACHER_FILE = "published/mt30_1M_steps_045dist_fp16.pt"


def make_batches(count: int, batch_size: int, horizon: int, seed: int) -> list[TrainBatch]:
    """Random MT30 batches with the official padding (obs / actions zero beyond each task's dims)."""
    g = torch.Generator().manual_seed(seed)
    obs_dim = torch.tensor(obs_dims(MT30))
    act_dim = torch.tensor(action_dims(MT30))
    batches = []
    for _ in range(count):
        task = torch.randint(0, len(MT30), (batch_size,), generator=g)
        obs = torch.randn(horizon + 1, batch_size, 24, generator=g) * (torch.arange(24) < obs_dim[task, None])
        action = (torch.rand(horizon, batch_size, 6, generator=g) * 2 - 1) * (torch.arange(6) < act_dim[task, None])
        reward = torch.rand(horizon, batch_size, 1, generator=g) * 2
        batches.append(TrainBatch(obs, action, reward, task))
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's default here). On a loaded machine use 1: "
                             "OpenMP threads spin-waiting for a descheduled partner make 2-thread timings explode")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=4, help="updates per variant per round")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fixtures", type=Path, default=fixtures_path())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    teacher_path = args.fixtures / TEACHER_FILE
    if teacher_path.is_file():
        teacher, teacher_source = load_world_model(teacher_path), str(TEACHER_FILE)
    else:
        torch.manual_seed(1)
        teacher, teacher_source = WorldModel(model_config(1)).eval(), "random 1M model (published file not found)"
    batches = make_batches(8, args.batch_size, 3, seed=0)
    cached = [TrainBatch(b.obs, b.action, b.reward, b.task,
                         TeacherTargets(reward=teacher_observed_rewards(teacher, b.obs[:-1], b.action, b.task)))
              for b in batches]

    setup_started = time.perf_counter()
    fast = TrainConfig(batch_size=args.batch_size)
    reference = TrainConfig(batch_size=args.batch_size, fast_kernels=False, fused_adam=False, flush_denormal=False,
                            compile_mish=False)

    def student() -> WorldModel:
        torch.manual_seed(0)
        return WorldModel(model_config(1))

    variants = {
        "no_teacher": (Trainer(student(), fast), batches),
        "live_teacher": (Trainer(student(), fast, teacher=teacher), batches),
        "cached_targets": (Trainer(student(), fast, cached_teacher=True), cached),
        "reference": (Trainer(student(), reference), batches),
    }
    for trainer, data in variants.values():  # warm-up (first-call allocations, compiled Mish)
        for b in data[:2]:
            trainer.update(b)
    setup_seconds = time.perf_counter() - setup_started

    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, (trainer, data) in variants.items():
            started = time.perf_counter()
            for i in range(args.updates):
                trainer.update(data[(round_index * args.updates + i) % len(data)])
            samples[name].append(1000 * (time.perf_counter() - started) / args.updates)

    rows = {}
    for name, values in samples.items():
        ms = statistics.median(values)
        rows[name] = {"ms_per_update": round(ms, 1), "min_ms": round(min(values), 1)}
    for name in ("no_teacher", "live_teacher", "cached_targets"):
        rows[name]["speedup_vs_reference"] = round(rows["reference"]["ms_per_update"] / rows[name]["ms_per_update"], 2)

    load = os.getloadavg()[0]
    gemm = matmul_peak_gflops()
    print(f"1M student, batch {args.batch_size}, horizon 3, {args.threads} thread(s), load average {load:.2f}, "
          f"fp32 GEMM {gemm:.0f} GFLOP/s now; median of {args.rounds} rounds x {args.updates} updates; "
          f"teacher: {teacher_source}")
    if args.threads > 1 and load > (os.cpu_count() or 1) - args.threads + 0.5:
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores: with {args.threads} threads the timings are "
              "dominated by OpenMP threads spin-waiting for descheduled partners; rerun with --threads 1")
    print("| variant | ms / update | min ms | speed-up vs reference path (this run) |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        ref = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-"
        print(f"| {name} | {r['ms_per_update']:.1f} | {r['min_ms']:.1f} | {ref} |")
    authors = ", ".join(f"{k} {v} ms" for k, v in EXTERNAL["authors_ms"].items())
    ours = ", ".join(f"{k} {v} ms" for k, v in EXTERNAL["this_codebase_ms_same_run"].items())
    print(f"For context, from elsewhere (not measured in this run; no ratio is taken with it): {EXTERNAL['what']}: "
          f"authors {authors}; this codebase in that run {ours} ({EXTERNAL['source']}; {EXTERNAL['machine']}; "
          f"date {EXTERNAL['date']})")
    print(json.dumps({"benchmark": "update_speed", "threads": args.threads, "batch_size": args.batch_size,
                      "load_average_1min": round(load, 2), "gemm_gflops": round(gemm, 1), "setup_seconds": round(setup_seconds, 1),
                      "teacher": teacher_source, "torch": torch.__version__, "rows": rows,
                      "external_not_measured_here": EXTERNAL}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
