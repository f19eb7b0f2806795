"""Memory and throughput of sampling from one memory-mapped episode store in 1 and in N processes.

Builds a >= 2 GB store of random episodes in a temp dir (removed afterwards), then runs 1 and N
(default 4) fresh processes that each open the store and sample B = 256, H = 3 windows for a fixed
time. Each reports VmRSS / RssAnon / RssFile (/proc/self/status) and Pss (/proc/self/smaps_rollup)
before opening the store and after sampling, while all N are still alive. The store's pages are
file-backed and shared through the page cache: they show up in RssFile of every process that
touched them, but PSS splits them between the processes and RssAnon (private memory) barely moves.

    python benchmarks/data_memory.py [--gb 2.2] [--procs 4] [--seconds 8]

Prints a table, then one JSON object with all numbers as the last line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2**20
EPISODE_LENGTH, OBS_DIM, ACTION_DIM = 501, 24, 6
BATCH, HORIZON = 256, 3
EARLY_BATCHES = 50  # also measure after this many batches: RSS grows with the pages touched so far


def memory_now() -> dict[str, float]:
    """MiB: VmRSS, RssAnon, RssFile from /proc/self/status; Pss, Pss_Anon, Pss_File from smaps_rollup."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Pss", "Pss_Anon", "Pss_File"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass  # no smaps_rollup (old kernel / not Linux): PSS not reported
    return out


def build_store(path: Path, target_bytes: float) -> tuple[int, float]:
    """Random episodes up to `target_bytes`; one random block shifted per write keeps it cheap."""
    from agent.data import EpisodeStoreWriter
    from agent.tasksets import MT30

    per_episode = EPISODE_LENGTH * (OBS_DIM + ACTION_DIM + 1) * 4 + 8
    episodes = int(np.ceil(target_bytes / per_episode))
    block = 512
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((block, EPISODE_LENGTH, OBS_DIM), dtype=np.float32)
    action = rng.uniform(-1, 1, (block, EPISODE_LENGTH, ACTION_DIM)).astype(np.float32)
    reward = rng.uniform(0, 2, (block, EPISODE_LENGTH)).astype(np.float32)
    action[:, 0], reward[:, 0] = np.nan, np.nan
    shifted = np.empty_like(obs)
    started = time.perf_counter()
    with EpisodeStoreWriter(path, tasks=MT30, task_set="mt30", obs_dim=OBS_DIM, action_dim=ACTION_DIM,
                            episode_length=EPISODE_LENGTH, source="benchmarks/data_memory.py") as writer:
        for lo in range(0, episodes, block):
            n = min(block, episodes - lo)
            np.add(obs[:n], np.float32(lo), out=shifted[:n])
            writer.append(shifted[:n], action[:n], reward[:n], np.arange(lo, lo + n) % len(MT30))
    return episodes, time.perf_counter() - started


def sample_worker(store_path: str, seconds: float, seed: int, barrier, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from agent.data import EpisodeStore

    before = memory_now()
    store = EpisodeStore(store_path)
    sampler = store.sampler(BATCH, HORIZON, seed=seed)
    sampler.next()
    barrier.wait()  # all processes sample during the same window
    batches, started, early = 0, time.perf_counter(), None
    while time.perf_counter() - started < seconds:
        obs, action, reward, task = sampler.next()
        batches += 1
        if batches == EARLY_BATCHES:
            early = memory_now()
    elapsed = time.perf_counter() - started
    after_sampling = memory_now()
    barrier.wait()  # measure PSS while every process still maps the store
    after = memory_now()
    results.put({"before": before, "early": early or after_sampling,
                 "after": {**after_sampling, **{k: after[k] for k in after if k.startswith("Pss")}},
                 "batches": batches, "seconds": elapsed, "pid": os.getpid()})
    barrier.wait()


def run(store_path: Path, procs: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")  # fresh interpreters: nothing inherited from the builder
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=sample_worker, args=(str(store_path), seconds, seed, barrier, results))
               for seed in range(procs)]
    for w in workers:
        w.start()
    rows = [results.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    per_proc = []
    for r in rows:
        b, a = r["before"], r["after"]
        per_proc.append({
            "batches_per_s": r["batches"] / r["seconds"],
            "rss_mib": a["VmRSS"], "extra_rss_mib": a["VmRSS"] - b["VmRSS"],
            "extra_rss_early_mib": r["early"]["VmRSS"] - b["VmRSS"],
            "rss_anon_mib": a["RssAnon"], "extra_anon_mib": a["RssAnon"] - b["RssAnon"],
            "rss_file_mib": a["RssFile"], "extra_file_mib": a["RssFile"] - b["RssFile"],
            **({"pss_mib": a["Pss"], "extra_pss_mib": a["Pss"] - b["Pss"], "pss_file_mib": a["Pss_File"]}
               if "Pss" in a and "Pss" in b else {}),
        })
    mean = {k: float(np.mean([p[k] for p in per_proc])) for k in per_proc[0]}
    total_batches = sum(p["batches_per_s"] for p in per_proc)
    return {"procs": procs, "mean_per_process": mean, "max_extra_rss_mib": max(p["extra_rss_mib"] for p in per_proc),
            "max_extra_anon_mib": max(p["extra_anon_mib"] for p in per_proc),
            "total_batches_per_s": total_batches, "total_samples_per_s": total_batches * BATCH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2, help="store size in GB (1e9 bytes)")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="sampling time per run")
    parser.add_argument("--dir", default=None, help="where to build the temp store (default: system temp)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="data_memory_", dir=args.dir))
    try:
        store_path = tmp / "store"
        episodes, build_s = build_store(store_path, args.gb * 1e9)
        store_bytes = sum(f.stat().st_size for f in store_path.iterdir() if f.suffix == ".npy")
        runs = [run(store_path, n, args.seconds) for n in sorted({1, args.procs})]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"store: {episodes:,} episodes x {EPISODE_LENGTH} entries, {store_bytes / MIB:,.0f} MiB "
          f"(built in {build_s:.1f} s, page-cache warm); batches of B={BATCH}, H={HORIZON}; "
          f"{args.seconds:.0f} s of sampling per run; MiB per process (mean over processes)")
    head = ("procs", "batch/s/proc", "samples/s total", "VmRSS", f"+RSS@{EARLY_BATCHES}b", "+RSS", "+RssAnon",
            "+RssFile", "PSS", "+PSS")
    print("{:>5} {:>13} {:>16} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8}".format(*head))
    for r in runs:
        m = r["mean_per_process"]
        print("{:>5} {:>13,.0f} {:>16,.0f} {:>8.0f} {:>9.0f} {:>8.0f} {:>9.1f} {:>9.0f} {:>8} {:>8}".format(
            r["procs"], m["batches_per_s"], r["total_samples_per_s"], m["rss_mib"], m["extra_rss_early_mib"],
            m["extra_rss_mib"],
            m["extra_anon_mib"], m["extra_file_mib"],
            f"{m['pss_mib']:.0f}" if "pss_mib" in m else "n/a", f"{m['extra_pss_mib']:.0f}" if "pss_mib" in m else "n/a"))
    print("+X = after sampling minus before opening the store. Uniform sampling soon touches every page of the "
          "map, so VmRSS approaches the store size; those are RssFile pages of the shared, reclaimable page "
          "cache, counted in every process's RSS once. PSS splits them between the processes; RssAnon "
          "(private memory) is what each sampler really adds.")
    print(json.dumps({"benchmark": "data_memory", "store_bytes": store_bytes, "episodes": episodes,
                      "episode_length": EPISODE_LENGTH, "batch_size": BATCH, "horizon": HORIZON,
                      "seconds_per_run": args.seconds, "build_seconds": round(build_s, 2), "cpu_count": os.cpu_count(),
                      "runs": runs}))


if __name__ == "__main__":
    main()
