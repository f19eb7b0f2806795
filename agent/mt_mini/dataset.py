"""MT-mini data helpers: the cached copy of the shipped distillation store (the pooled online
replay), and optional rollouts of a teacher (MPPI, MT-mini planner) into a new store."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

CACHE_ENV = "DISTILL_CACHE"


def default_cache_root() -> Path:
    """`$DISTILL_CACHE/mt-mini` if set, else `~/.cache/distill-sweeps/mt-mini`."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env) / "mt-mini") if env else Path.home() / ".cache" / "distill-sweeps" / "mt-mini"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset store is built from; its hash names the cache entry."""

    teacher_sha256: str
    tasks: tuple[str, ...]
    episodes_per_task: int
    episode_steps: int
    planner: tuple[tuple[str, Any], ...]
    seed: int
    noise_std: float = 0.0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def collect_dataset(teacher: Path, out: Path, spec: DatasetSpec, num_envs: int = 64, progress: bool = True,
                    mode: str = "create"):
    """Roll the teacher out with MPPI into a new store at `out`; returns the EpisodeStore.
    obs (N, episode_steps + 1, 24), actions padded to 6, task ids in the teacher's task order."""
    from agent.checkpoint import load_world_model
    from agent.data import EpisodeStore, EpisodeStoreWriter
    from agent.data.collect import iter_collect, policy_from, task_set_of

    model = load_world_model(teacher)
    task_set = task_set_of(model)
    policy = policy_from(model, plan=True, seed=spec.seed, **dict(spec.planner))
    info = {"teacher": str(teacher), **asdict(spec)}
    with EpisodeStoreWriter(out, tasks=list(task_set.names), task_set="mt-mini", obs_dim=task_set.obs_pad,
                            action_dim=task_set.action_pad, episode_length=spec.episode_steps + 1, mode=mode,
                            source="agent.mt_mini.dataset", info=info) as writer:
        for wave in iter_collect(policy, list(spec.tasks), spec.episodes_per_task, spec.seed, task_set=task_set,
                                 num_envs=num_envs, noise_std=spec.noise_std, episode_steps=spec.episode_steps,
                                 progress=progress):
            writer.append(wave.obs, wave.action, wave.reward, wave.task)
    return EpisodeStore(out)


def cached_store_copy(source: Path, sha256: str, cache_root: Path, progress: bool = True) -> Path:
    """A copy of the shipped store `source` under `cache_root` (the teacher-target cache is written
    beside a store, so the shipped one stays read-only), made on first use and checked against
    `sha256` (recipe.store_sha256); one copier at a time, concurrent callers wait for it."""
    from agent.mt_mini.recipe import store_sha256
    from agent.data import EpisodeStore, StoreError
    from agent.errors import ConfigError

    cache_root.mkdir(parents=True, exist_ok=True)
    out = cache_root / f"pool-{sha256[:16]}"
    with FileLock(str(cache_root / f".pool-{sha256[:16]}.lock")):
        if out.exists():
            try:
                EpisodeStore(out)
                return out
            except StoreError:
                shutil.rmtree(out)  # an unreadable leftover: copy again below
        started = time.perf_counter()
        staging = cache_root / f".pool-{sha256[:16]}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        if store_sha256(staging) != sha256:
            shutil.rmtree(staging)
            raise ConfigError(f"MT-mini data {source}: checksum differs from MANIFEST (damaged checkout?)")
        staging.replace(out)
        if progress:
            print(f"MT-mini: distillation store copied to {out} ({time.perf_counter() - started:.1f}s, once)", flush=True)
    return out
