"""Batch sources for the trainer: windows sampled from an episode store (or an in-memory buffer
with the same layout), with cached teacher targets gathered for the same windows.

A batch source is any callable returning a batch; those with `state_dict()` / `load_state_dict()`
have their random stream saved and restored with the trainer (bit-exact resume).
"""
from __future__ import annotations

import json
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from agent.data.sampler import Sampler
from agent.distill import TeacherTargets
from agent.errors import ConfigError
from agent.losses import TrainBatch


class BatchSource(Protocol):
    def __call__(self) -> Any: ...


class StoreBatches:
    """Uniform windows of `horizon` from `store` (an `agent.data.EpisodeStore` or an
    `agent.replay.EpisodeBuffer`), as TrainBatch; with `teacher_cache` the batch carries the
    cached teacher rewards (H, B, 1) and, if the cache has PCA latents, latents (H+1, B, k).
    `model_tasks`: the trained model's task list; store task ids are translated into it (a store's
    ids index the store's own task list). The numpy Generator (seeded by `seed`) is the only
    random stream."""

    def __init__(self, store: Any, batch_size: int, horizon: int, seed: int | None = None, teacher_cache: Any = None,
                 task_ids: Sequence[int] | None = None, model_tasks: Sequence[str] | None = None) -> None:
        self.sampler = Sampler(store, batch_size, horizon, seed=seed, task_ids=task_ids)
        self.teacher_cache = teacher_cache
        self.horizon = horizon
        self.task_map = _task_map(list(store.tasks), model_tasks)

    def __call__(self) -> TrainBatch:
        obs, action, reward, task, index = self.sampler.next(return_index=True)
        if self.task_map is not None:
            task = self.task_map[task]
        teacher = None
        cache = self.teacher_cache
        if cache is not None:
            latent = cache.gather_latent(index.episode, index.start, self.horizon) if cache.pca is not None else None
            teacher = TeacherTargets(reward=cache.gather(index.episode, index.start, self.horizon), latent=latent)
        return TrainBatch(obs, action, reward, task, teacher)

    def state_dict(self) -> dict[str, str]:
        # JSON keeps the 128-bit PCG64 state exact and the checkpoint weights_only-safe
        return {"numpy_generator": json.dumps(self.sampler.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.sampler.rng.bit_generator.state = json.loads(state["numpy_generator"])


def _task_map(store_tasks: list[str], model_tasks: Sequence[str] | None) -> torch.Tensor | None:
    """Store task id -> model task id (None when they agree): a store's ids index ITS task list."""
    if model_tasks is None or list(model_tasks) == store_tasks:
        return None
    missing = [t for t in store_tasks if t not in model_tasks]
    if missing:
        raise ConfigError(f"store tasks {missing} are not in the model's task set ({', '.join(model_tasks)})")
    return torch.tensor([list(model_tasks).index(t) for t in store_tasks], dtype=torch.long)


def numpy_generator_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def set_numpy_generator_state(rng: np.random.Generator, state: str) -> None:
    rng.bit_generator.state = json.loads(state)

