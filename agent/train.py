"""Offline TD-MPC2 training with optional teacher distillation (TD-MPC-Opt), library-style.

One update (official order): TD targets and next latents without gradient -> latent rollout ->
total = 20 consistency + 0.1 reward + 0.1 value + d_coef distill -> backward, clip 20, Adam step
(encoder lr x 0.3) -> policy update on the detached rollout (RunningScale-normalised Q, entropy
bonus 1e-4; separate Adam with eps 1e-5) -> Polyak update of the target Q heads (tau 0.01).

    trainer = Trainer(model, TrainConfig(), batch_source, teacher=teacher_model)
    trainer.train(1000, callback=lambda step, metrics: print(step, metrics["total"]))
    trainer.save("run/trainer.pt")            # atomic, weights_only-safe; resume with .load()

The saved state holds everything a bit-identical continuation needs: model (incl. target Q),
both optimizers, RunningScale, distillation projection / PCA basis, step, and the random streams
(torch global, python `random`, and the batch source's numpy Generator).
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agent.batches import StoreBatches
from agent.checkpoint import atomic_torch_save, checkpoint_payload, load_world_model, read_checkpoint
from agent.config import ModelConfig, TrainConfig
from agent.distill import CACHEABLE, LatentProjection, PcaProjection, fit_pca, teacher_latents
from agent.errors import CheckpointError, ConfigError
from agent.losses import TrainBatch, as_batch, compute_losses, task_discounts
from agent.ops import HALF_LOG_2PI, native_training
from agent.runtime import flushed_denormals, keep_freed_memory
from agent.scale import RunningScale
from agent.train_kernels import heads_for, use_compiled_mish
from agent.world_model import WorldModel

TRAINER_FORMAT = "distill-sweeps/trainer"
TRAINER_VERSION = 1
Metrics = dict[str, float]


class Trainer:
    """Owns the student, its optimizers and the update step.

    model: the student WorldModel (trained in place). cfg: TrainConfig.
    batch_source: zero-argument callable returning a batch (TrainBatch or (obs, action, reward,
    task)); optional if every `update()` call passes its batch.
    teacher: live teacher WorldModel (any dims, same task set), or None (then a distillation
    target needs cached teacher outputs in the batches).
    pca: PcaProjection for a live `latent_pca` teacher (from the teacher cache or `fit_pca`).
    cached_teacher: distil from the cached teacher outputs every batch carries (no live teacher).
    Without teacher and cache the student trains on the TD-MPC2 loss alone.
    """

    def __init__(self, model: WorldModel, cfg: TrainConfig | None = None, batch_source: Callable[[], Any] | None = None,
                 teacher: WorldModel | None = None, *, pca: PcaProjection | None = None, cached_teacher: bool = False):
        self.cfg = (cfg or TrainConfig()).validate()
        keep_freed_memory()  # an update frees and reallocates many ~1 MB tensors: without this, ~6,000 page faults each
        self.model = model
        self.batch_source = batch_source
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        # no teacher and no cached teacher outputs: plain TD-MPC2 training
        self.target = self.cfg.distill.target if (teacher is not None or cached_teacher) else None
        self.pca = pca
        self.projection: LatentProjection | None = None
        if self.target == "latent_linear":
            if teacher is None:
                raise ConfigError("latent_linear distillation needs a live teacher (its raw latents are not cached)")
            self.projection = LatentProjection(teacher.cfg.latent_dim, model.cfg.latent_dim).to(self._device)
        if cached_teacher and teacher is None and self.target not in CACHEABLE:
            raise ConfigError(f"distillation target {self.target!r} needs a live teacher")

        c = self.cfg
        named = dict(model.named_parameters())
        groups = model_param_groups(named, c) + [
            {"params": list(self.projection.parameters()) if self.projection is not None else []}]
        self._model_params = [p for g in groups for p in g["params"]]
        self._pi_params = [named[n] for n in policy_param_names(named)]
        # fused: one vectorised kernel per tensor (~4x faster than the per-op loop on CPU)
        self.optim = torch.optim.Adam(groups, lr=c.lr, fused=c.fused_adam)
        self.pi_optim = torch.optim.Adam(self._pi_params, lr=c.lr, eps=c.pi_adam_eps, fused=c.fused_adam)
        if c.fast_kernels and c.compile_mish and not (self._device.type == "cpu" and native_training()):
            use_compiled_mish(True)  # compiling it costs seconds and serves only where the native kernels do not
        self.scale = RunningScale(c.tau)
        self.discount = task_discounts(model.cfg, c.loss, self._device)
        self.step = 0
        self._rate_window: list[float] = []
        model.eval()

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- one update ---------------------------------------------------------------------------
    def _next_batch(self) -> TrainBatch:
        if self.batch_source is None:
            raise ConfigError("Trainer has no batch_source; pass a batch to update()")
        return as_batch(self.batch_source())

    def update(self, batch: Any = None, eps_td: torch.Tensor | None = None,
               eps_pi: torch.Tensor | None = None) -> Metrics:
        """One model + policy + target update; returns the step's metrics (floats).
        eps_td (H, B, A) / eps_pi (H+1, B, A): policy noise of the TD target / policy loss (drawn if None)."""
        started = time.perf_counter()
        with flushed_denormals(self.cfg.flush_denormal):
            metrics = self._update(batch, eps_td, eps_pi)
        elapsed = time.perf_counter() - started
        self._rate_window = (self._rate_window + [elapsed])[-50:]
        metrics.update(update_ms=1000 * elapsed, updates_per_s=len(self._rate_window) / sum(self._rate_window))
        return metrics

    def _update(self, batch: Any, eps_td: torch.Tensor | None, eps_pi: torch.Tensor | None) -> Metrics:
        b = self._next_batch() if batch is None else as_batch(batch)
        b = self._to_device(b)
        if self.target is not None and self.teacher is None and not _has_cached(b, self.target):
            raise ConfigError(f"distillation target {self.target!r}: no live teacher and no cached teacher outputs in the batch")
        c, loss_cfg, model = self.cfg, self.cfg.loss, self.model

        set_scheduled_lr((self.optim, self.pi_optim), c, self.step)
        model.train()
        self.optim.zero_grad(set_to_none=True)  # also drops gradients a previous policy loss left behind
        out = compute_losses(model, b, self.teacher, self.target, loss_cfg=loss_cfg, discount=self.discount,
                             eps_td=eps_td, projection=self.projection, pca=self.pca, fast=c.fast_kernels)
        t = out.terms
        total = loss_cfg.consistency_coef * t["consistency"] + loss_cfg.reward_coef * t["reward"] \
            + loss_cfg.value_coef * t["value"]
        if not out.distill_on_policy:
            total = total + c.distill.d_coef * t["distill"]
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self._model_params, c.grad_clip_norm)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)

        pi_metrics = self._update_pi(out.zs.detach(), b.task, eps_pi,
                                     c.distill.d_coef * t["distill"] if out.distill_on_policy else None)
        model.soft_update_target(c.tau)
        model.eval()
        self.step += 1
        metrics = {name: float(value.detach()) for name, value in t.items()}
        metrics.update(total=float(total.detach()), grad_norm=float(grad_norm), **pi_metrics, step=float(self.step))
        return metrics

    def _update_pi(self, zs: torch.Tensor, task: torch.Tensor | None, eps: torch.Tensor | None,
                   extra_loss: torch.Tensor | None) -> Metrics:
        """Upstream policy loss: mean_t rho^t mean_b (-(entropy_coef * scaled_entropy + Q / scale))
        (or TD-MPC-Opt's entropy_coef * log_pi - Q / scale, see LossConfig.policy_entropy)."""
        c = self.cfg
        pi_loss, self.scale.value, entropy = policy_objective(self.model, zs, task, eps, self.scale, self.scale.value,
                                                              c.loss, c.fast_kernels)
        loss = pi_loss if extra_loss is None else pi_loss + extra_loss
        loss.backward()
        pi_grad_norm = torch.nn.utils.clip_grad_norm_(self._pi_params, c.grad_clip_norm)
        self.pi_optim.step()
        self.pi_optim.zero_grad(set_to_none=True)
        return {"pi_loss": float(pi_loss.detach()), "pi_grad_norm": float(pi_grad_norm),
                "pi_scale": float(self.scale.value), "pi_entropy": float(entropy)}

    def _to_device(self, b: TrainBatch) -> TrainBatch:
        device = self._device
        if b.obs.device == device:
            return b
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        teacher = b.teacher
        if teacher is not None:
            teacher = type(teacher)(move(teacher.reward), move(teacher.latent))
        return TrainBatch(move(b.obs), move(b.action), move(b.reward), move(b.task), teacher)

    def train(self, steps: int, callback: Callable[[int, Metrics], Any] | None = None) -> Metrics:
        """Run `steps` updates from the batch source; callback(step, metrics) after each. Returns the last metrics."""
        metrics: Metrics = {}
        for _ in range(steps):
            metrics = self.update()
            if callback is not None:
                callback(self.step, metrics)
        return metrics

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-identical continuation needs; only tensors, numbers, strings, lists, dicts."""
        python_state = random.getstate()
        source = self.batch_source
        return {
            "format": TRAINER_FORMAT,
            "version": TRAINER_VERSION,
            "step": self.step,
            "train_config": self.cfg.to_dict(),
            "model": checkpoint_payload(self.model),
            "optim": self.optim.state_dict(),
            "pi_optim": self.pi_optim.state_dict(),
            "scale": self.scale.state_dict(),
            "projection": self.projection.state_dict() if self.projection is not None else None,
            "pca": self.pca.state_dict() if self.pca is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": [python_state[0], list(python_state[1]), python_state[2]],
                "batch_source": source.state_dict() if hasattr(source, "state_dict") else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != TRAINER_FORMAT:
            raise CheckpointError("not a distill-sweeps trainer state")
        if state.get("version", 0) > TRAINER_VERSION:
            raise CheckpointError(f"trainer state written by a newer version ({state.get('version')})")
        saved_cfg = ModelConfig.from_dict(state["model"]["config"])
        if saved_cfg != self.model.cfg:
            raise ConfigError("trainer state: the saved model config differs from this trainer's model")
        if (state["projection"] is None) != (self.projection is None):
            raise ConfigError("trainer state: distillation projection present in only one of state / trainer")
        self.model.load_state_dict(state["model"]["model"])
        self.optim.load_state_dict(state["optim"])
        self.pi_optim.load_state_dict(state["pi_optim"])
        self.scale.load_state_dict(state["scale"])
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])
        if state["pca"] is not None:
            self.pca = PcaProjection.from_state_dict(state["pca"])
        self.step = int(state["step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        if rng["batch_source"] is not None:
            if not hasattr(self.batch_source, "load_state_dict"):
                raise ConfigError("trainer state has a batch-source random stream but this batch source cannot restore it")
            self.batch_source.load_state_dict(rng["batch_source"])

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write the full trainer state (torch.load(weights_only=True) reads it)."""
        return atomic_torch_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> "Trainer":
        """Restore the state saved by `save` into this trainer (same model config and setup)."""
        self.load_state_dict(read_checkpoint(path))
        return self


# The model optimizer's parameter groups, in order; the encoder learns at lr * enc_lr_scale. The
# policy prior has its own optimizer and the target Q heads are Polyak copies (no group).
MODEL_GROUPS: tuple[str, ...] = ("_encoder", "_dynamics", "_reward", "_Qs", "_task_emb")
POLICY_GROUP = "_pi"


def model_param_groups(named: dict[str, Any], cfg: TrainConfig) -> list[dict[str, Any]]:
    """Adam groups of the model optimizer over `named` (WorldModel parameter name -> tensor, in
    `named_parameters()` order; tensors may carry a leading population dim)."""
    groups = []
    for prefix in MODEL_GROUPS:
        group: dict[str, Any] = {"params": [p for n, p in named.items() if n.startswith(prefix + ".")]}
        if prefix == "_encoder":
            group["lr"] = cfg.lr * cfg.enc_lr_scale
        groups.append(group)
    return groups


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of every optimizer group's base lr for the update after `step` updates."""
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(step, cfg.lr_schedule_steps) / cfg.lr_schedule_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_scheduled_lr(optimizers: Sequence[torch.optim.Optimizer], cfg: TrainConfig, step: int) -> None:
    """Sets each group's lr to its base lr x lr_factor(cfg, step). The base is kept in the group
    ("initial_lr", as torch's schedulers name it), so it travels with the optimizer's state_dict
    and a resumed run continues the same schedule."""
    if cfg.lr_schedule == "constant":
        return
    factor = lr_factor(cfg, step)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def policy_param_names(named: dict[str, Any]) -> list[str]:
    return [n for n in named if n.startswith(POLICY_GROUP + ".")]


def policy_objective(model: WorldModel, zs: torch.Tensor, task: torch.Tensor | None, eps: torch.Tensor | None,
                     scale: RunningScale, scale_value: torch.Tensor, loss_cfg: Any, fast: bool):
    """The policy prior's loss on a detached latent rollout.

    zs (H+1, B, L), task (B,), eps (H+1, B, A) policy noise (drawn if None), scale_value (1,): the
    RunningScale value before this step. Upstream loss: mean_t rho^t mean_b (-(entropy_coef *
    scaled_entropy + Q / scale)) (or TD-MPC-Opt's entropy_coef * log_pi - Q / scale, see
    LossConfig.policy_entropy), Q the mean of two random heads, without gradient to the Q heads.
    Returns (loss (), scale value after this step (1,), mean entropy ()). Pure in `scale`, so it
    runs under torch.func.vmap for populations.
    """
    # fresh heads: the task embedding was just updated; detached: this loss trains the policy only
    heads = heads_for(model, task, fast, detach_emb=True)
    action, info = heads.pi(zs, eps=eps)
    q = heads.q_value(zs, action, "avg", detach=True)    # (H+1, B, 1)
    value = scale.advanced(scale_value, q[0])
    q = q / value
    rho = loss_cfg.rho ** torch.arange(q.shape[0], dtype=q.dtype, device=q.device)
    if loss_cfg.policy_entropy == "upstream":
        per_sample = -(loss_cfg.entropy_coef * info["scaled_entropy"] + q)
    else:
        per_sample = loss_cfg.entropy_coef * td_mpc_opt_log_prob(model, info, action, task) - q
    return (per_sample.mean(dim=(1, 2)) * rho).mean(), value, info["entropy"].detach().mean()


def td_mpc_opt_log_prob(model: WorldModel, info: dict[str, torch.Tensor], action: torch.Tensor,
                        task: torch.Tensor | None) -> torch.Tensor:
    """TD-MPC-Opt's log-prob of a policy sample: [sum_j(-eps_j^2 / 2 - log_std_j) - ln(2 pi) / 2] * n_a
    - sum_j ln(relu(1 - action_j^2) + 1e-6), eps / log_std masked, n_a = the task's action dim. (..., 1)"""
    mask = model.action_mask(task)
    n_a = mask.sum(-1, keepdim=True) if mask is not None else float(action.shape[-1])
    residual = (-0.5 * info["eps"].pow(2) - info["log_std"]).sum(-1, keepdim=True)
    squash = torch.log(torch.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return (residual - HALF_LOG_2PI) * n_a - squash


def _has_cached(b: TrainBatch, target: str) -> bool:
    field = CACHEABLE.get(target)
    return field is not None and b.teacher is not None and getattr(b.teacher, field) is not None


def read_trainer_model(path: str | os.PathLike) -> WorldModel:
    """A fresh student WorldModel with the config stored in a trainer state file (weights loaded)."""
    state = read_checkpoint(path)
    if state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a distill-sweeps trainer state")
    model = WorldModel(ModelConfig.from_dict(state["model"]["config"]))
    model.load_state_dict(state["model"]["model"])
    return model


def seed_everything(seed: int) -> None:
    """torch, python `random` and numpy's legacy global stream."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def fit_store_pca(teacher: WorldModel, store: Any, k: int, rows: int = 65536, seed: int = 0,
                  chunk: int = 4096) -> PcaProjection:
    """PCA basis of teacher latents over a uniform sample of `rows` store entries (the teacher
    cache's recipe, so a live `latent_pca` teacher matches the cached one)."""
    total = store.num_episodes * store.episode_length
    sample = np.sort(np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False))
    obs_flat = store.obs.reshape(-1, store.obs_dim)
    latents = torch.cat([
        teacher_latents(teacher, torch.from_numpy(np.array(obs_flat[part])),
                        torch.from_numpy(np.array(store.task[part // store.episode_length]))).double()
        for part in np.array_split(sample, max(1, -(-sample.size // chunk)))
    ])
    return fit_pca(latents, k)


@dataclass
class OfflineInputs:
    """What offline training on a store needs besides the student: the effective TrainConfig (no
    distillation without a teacher), the teacher-target cache or the live teacher, the PCA basis."""

    store: Any
    cfg: TrainConfig
    cache: Any = None
    teacher: WorldModel | None = None
    pca: PcaProjection | None = None

    def batches(self, seed: int, model_tasks: list[str], task_ids: list[int] | None = None) -> StoreBatches:
        """A batch source over the store with its own random stream (`seed`)."""
        return StoreBatches(self.store, self.cfg.batch_size, self.cfg.horizon, seed=seed, teacher_cache=self.cache,
                            task_ids=task_ids, model_tasks=model_tasks)


def offline_inputs(model: WorldModel, store: Any, cfg: TrainConfig | None = None,
                   teacher_path: str | os.PathLike | None = None, *, use_cache: bool = True,
                   device: str | torch.device = "cpu") -> OfflineInputs:
    """The store, cache and teacher for training `model` (or students of its config) offline;
    torch's, python's and numpy's global streams are seeded with cfg.seed on return.

    Cacheable targets (reward, reward_observed, latent_pca) read the teacher-target cache (built on
    first use, keyed by the teacher file's hash) and need no live teacher; other targets load
    the teacher and run it live. The cache is used only when the store's and the model's task
    lists agree (its teacher outputs are keyed by the store's ids). `device` runs the teacher
    (live, or while building the cache); cached targets stay on the host until a batch moves.
    """
    from agent.data import EpisodeStore, TeacherCache

    cfg = (cfg or TrainConfig()).validate()
    store = store if not isinstance(store, (str, os.PathLike)) else EpisodeStore(store)
    target = cfg.distill.target if teacher_path is not None else None
    if teacher_path is None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "distill": {**cfg.to_dict()["distill"], "target": None}})
    inputs = OfflineInputs(store, cfg)
    if target in CACHEABLE and use_cache and list(store.tasks) == list(model.cfg.tasks):
        pca_dim = model.cfg.latent_dim if target == "latent_pca" else None
        inputs.cache = TeacherCache.get_or_build(store, teacher_path, pca_dim=pca_dim, device=str(device))
        if inputs.cache.pca is not None:
            pca = inputs.cache.pca
            inputs.pca = PcaProjection(torch.from_numpy(np.array(pca.mean)), torch.from_numpy(np.array(pca.components)))
    elif target is not None:
        inputs.teacher = load_world_model(teacher_path, device=device)
        if target == "latent_pca":
            inputs.pca = fit_store_pca(inputs.teacher, store, model.cfg.latent_dim, cfg.distill.pca_fit_rows,
                                       cfg.distill.pca_seed)
    # Dropout and the random Q-head pair draw from torch's global stream. Loading a teacher
    # initialises a model first, which draws from it, and only the process that builds the cache
    # loads one: reseeding here keeps training independent of whether the cache existed.
    seed_everything(cfg.seed)
    return inputs


def offline_trainer(model: WorldModel, store: Any, cfg: TrainConfig | None = None,
                    teacher_path: str | os.PathLike | None = None, *, use_cache: bool = True,
                    task_ids: list[int] | None = None) -> Trainer:
    """A Trainer sampling `store` (EpisodeStore or path), distilling from the teacher file if given
    (see `offline_inputs`). `task_ids` (store ids) restricts sampling to those tasks' episodes;
    store task ids are translated to the model's task list."""
    inputs = offline_inputs(model, store, cfg, teacher_path, use_cache=use_cache)
    source = inputs.batches(inputs.cfg.seed, model.cfg.tasks, task_ids)
    return Trainer(model, inputs.cfg, source, inputs.teacher, pca=inputs.pca, cached_teacher=inputs.cache is not None)
