"""The TD-MPC2 world-model loss terms plus a distillation term (TD-MPC-Opt), for one batch.

Batch layout (the episode sampler's, = the official trainer's):
    obs (H+1, B, obs_dim), action (H, B, action_dim), reward (H, B, 1), task (B,) int64 or None.

Terms (unweighted; rho = 0.5; the update weights them 20 / 0.1 / 0.1 / d_coef):
    consistency = (1/H) sum_t rho^t mean((zs[t+1] - next_z[t])^2)
    reward      = (1/H) sum_t rho^t mean_b soft_ce(reward_logits[t], reward[t])
    value       = (1/(H num_q)) sum_t sum_q rho^t mean_b soft_ce(q_logits[q, t], td[t])
    distill     = see `agent.distill` and `DISTILL_TARGETS`
with next_z = encode(obs[1:]) and td = reward + discount[task] * min of two random target heads at
(next_z, pi(next_z)) (both without gradient), zs[0] = encode(obs[0]), zs[t+1] = next(zs[t], action[t]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from agent import distill as dist
from agent.config import LossConfig, ModelConfig, discount_for
from agent.distill import LatentProjection, PcaProjection, TeacherTargets
from agent.errors import ConfigError
from agent.math import two_hot, two_hot_inv
from agent.train_kernels import heads_for
from agent.world_model import WorldModel

TERMS = ("consistency", "reward", "value", "distill")


@dataclass
class TrainBatch:
    """One sampled batch; `teacher` optionally carries cached teacher outputs for it."""

    obs: torch.Tensor               # (H+1, B, obs_dim)
    action: torch.Tensor            # (H, B, action_dim)
    reward: torch.Tensor            # (H, B, 1)
    task: torch.Tensor | None       # (B,) int64
    teacher: TeacherTargets | None = None

    @property
    def horizon(self) -> int:
        return self.action.shape[0]

    @property
    def batch_size(self) -> int:
        return self.action.shape[1]


def as_batch(batch: Any) -> TrainBatch:
    """A TrainBatch from a TrainBatch, a dict, or a tuple (obs, action, reward, task[, TeacherTargets | index])."""
    if isinstance(batch, TrainBatch):
        return batch
    if isinstance(batch, dict):
        return TrainBatch(batch["obs"], batch["action"], batch["reward"], batch.get("task"), batch.get("teacher"))
    if isinstance(batch, (tuple, list)) and len(batch) in (4, 5):
        teacher = batch[4] if len(batch) == 5 and isinstance(batch[4], TeacherTargets) else None
        return TrainBatch(batch[0], batch[1], batch[2], batch[3], teacher)
    raise TypeError(f"a batch is a TrainBatch, a dict or a tuple (obs, action, reward, task[, teacher]); got {type(batch).__name__}")


def task_discounts(cfg: ModelConfig, loss_cfg: LossConfig, device=None) -> torch.Tensor:
    """Per-task discount (num_tasks,) from the episode-length heuristic (0.99 for every MT30 task)."""
    value = discount_for(loss_cfg.episode_length, loss_cfg.discount_denom, loss_cfg.discount_min, loss_cfg.discount_max)
    return torch.full((len(cfg.tasks),), value, dtype=torch.float32, device=device)


@dataclass
class LossOutput:
    """Everything the update needs: the unweighted terms and the latent rollout."""

    terms: dict[str, torch.Tensor]
    zs: torch.Tensor                  # (H+1, B, latent) student latent rollout (with grad)
    distill_on_policy: bool = False   # the distill term trains the policy prior (policy optimizer)


def _rho_weights(rho: float, steps: int, like: torch.Tensor) -> torch.Tensor:
    return rho ** torch.arange(steps, dtype=like.dtype, device=like.device)


def _two_hot(target: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """target (..., 1) scalars -> two-hot distributions (..., num_bins)."""
    return two_hot(target.reshape(-1, 1), cfg.num_bins, cfg.vmin, cfg.vmax).view(*target.shape[:-1], cfg.num_bins)


def _soft_ce(logits: torch.Tensor, target_dist: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (..., bins) with (broadcastable) target distributions -> (...)."""
    return -(F.log_softmax(logits, dim=-1) * target_dist).sum(-1)


@torch.no_grad()
def td_targets(heads: Any, next_z: torch.Tensor, reward: torch.Tensor, task: torch.Tensor | None,
               discount: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """reward + discount[task] * Q_target_min(next_z, pi(next_z)); next_z (H, B, L) -> (H, B, 1).
    heads: `agent.train_kernels` heads of the model for this batch; eps (H, B, A): the policy
    noise (drawn if None)."""
    action, _ = heads.pi(next_z, eps=eps)
    gamma = discount[task].unsqueeze(-1) if task is not None else discount[0]
    return reward + gamma * heads.q_value(next_z, action, "min", target=True)


def compute_losses(model: WorldModel, batch: Any, teacher: WorldModel | None = None, target: str | None = "reward",
                   *, loss_cfg: LossConfig | None = None, discount: torch.Tensor | None = None,
                   eps_td: torch.Tensor | None = None, projection: LatentProjection | None = None,
                   pca: PcaProjection | None = None, fast: bool = True) -> LossOutput:
    """The loss terms and the latent rollout for `batch`; see `loss_terms`."""
    loss_cfg = loss_cfg or LossConfig()
    dist.check_target(target)
    b = as_batch(batch)
    cfg, H, rho = model.cfg, b.horizon, loss_cfg.rho
    if discount is None:
        discount = task_discounts(cfg, loss_cfg, b.obs.device)
    if b.task is None and model.multitask:
        raise ConfigError("a multi-task model needs task ids in the batch")
    heads = heads_for(model, b.task, fast)

    with torch.no_grad():
        next_z = heads.encode(b.obs[1:])
        td = td_targets(heads, next_z, b.reward, b.task, discount, eps_td)

    z = heads.encode(b.obs[0])
    zs = [z]
    for t in range(H):
        z = heads.next(z, b.action[t])
        zs.append(z)
    zs_all = torch.stack(zs)                       # (H+1, B, L)
    weights = _rho_weights(rho, H, zs_all)

    consistency = ((zs_all[1:] - next_z).pow(2).mean(dim=(1, 2)) * weights).sum() / H
    rollout = zs_all[:-1]
    reward_logits = heads.reward(rollout, b.action)                          # (H, B, bins)
    q_logits = heads.q_all(rollout, b.action)                                # (num_q, H, B, bins)
    reward_loss = (_soft_ce(reward_logits, _two_hot(b.reward, cfg)).mean(1) * weights).sum() / H
    value_loss = (_soft_ce(q_logits, _two_hot(td, cfg)).mean(2) * weights).sum() / (H * cfg.num_q)

    distill, on_policy = _distill_term(model, b, teacher, target, loss_cfg, zs_all, reward_logits, q_logits,
                                       projection, pca, fast)
    terms = {"consistency": consistency, "reward": reward_loss, "value": value_loss, "distill": distill}
    return LossOutput(terms, zs_all, on_policy)


def loss_terms(model: WorldModel, batch: Any, teacher: WorldModel | None = None, target: str | None = "reward",
               **options: Any) -> dict[str, torch.Tensor]:
    """The UNWEIGHTED loss terms {consistency, reward, value, distill} (scalar tensors with grad)
    for one batch, without touching any optimizer. Same computation as the update step.

    batch: TrainBatch | (obs, action, reward, task[, TeacherTargets]); cached teacher outputs in
    the batch are used instead of live teacher passes where the target allows it.
    teacher: the teacher world model (any dims, same task set / padding), or None.
    target: one of `agent.config.DISTILL_TARGETS` (None: distill = 0).
    options: loss_cfg (LossConfig), discount ((num_tasks,) tensor), eps_td ((H, B, A) policy noise
    of the TD target, drawn if None), projection (LatentProjection, latent_linear), pca
    (PcaProjection, live latent_pca), fast (True: `agent.train_kernels.BatchKernels`; False: the
    model's own methods, the slower reference path).
    """
    return compute_losses(model, batch, teacher, target, **options).terms


def _distill_term(model: WorldModel, b: TrainBatch, teacher: WorldModel | None, target: str | None,
                  loss_cfg: LossConfig, zs: torch.Tensor, reward_logits: torch.Tensor, q_logits: torch.Tensor,
                  projection: LatentProjection | None, pca: PcaProjection | None, fast: bool) -> tuple[torch.Tensor, bool]:
    """(distill term, whether it trains the policy prior)."""
    zero = zs.new_zeros(())
    cached = b.teacher or TeacherTargets()
    field = dist.CACHEABLE.get(target or "")
    has_cache = field is not None and getattr(cached, field) is not None
    if target is None or (teacher is None and not has_cache):
        return zero, False
    if teacher is not None:
        dist.check_compatible(model, teacher)
        teacher.eval()
    cfg, rho, obs, action, task = model.cfg, loss_cfg.rho, b.obs, b.action, b.task

    def decoded(logits: torch.Tensor) -> torch.Tensor:
        return two_hot_inv(logits, cfg.vmin, cfg.vmax)

    if target == "reward":
        teacher_reward = cached.reward[0] if has_cache else dist.teacher_observed_rewards(teacher, obs[0], action[0], task)
        return F.mse_loss(decoded(reward_logits[0]), teacher_reward), False
    if target == "reward_observed":
        teacher_reward = cached.reward if has_cache else dist.teacher_observed_rewards(teacher, obs[:-1], action, task)
        return dist.rho_weighted_mse(decoded(reward_logits), teacher_reward, rho), False
    if target == "reward_multistep":
        teacher_reward = dist.teacher_rollout_rewards(teacher, obs[0], action, task)
        return dist.rho_weighted_mse(decoded(reward_logits), teacher_reward, rho), False
    if target == "latent_linear":
        if projection is None:
            raise ConfigError("latent_linear needs a LatentProjection (projection=...)")
        mapped = projection(dist.teacher_latents(teacher, obs, task))
        return dist.rho_weighted_mse(zs, mapped, rho), False
    if target == "latent_pca":
        if has_cache:
            projected = cached.latent
        elif pca is None:
            raise ConfigError("latent_pca without cached teacher latents needs a PcaProjection (pca=...)")
        else:
            projected = pca.project(dist.teacher_latents(teacher, obs, task))
        if projected.shape[-1] != cfg.latent_dim:
            raise ConfigError(f"latent_pca: teacher latents have {projected.shape[-1]} PCA dims, student latent is {cfg.latent_dim}")
        return dist.rho_weighted_mse(zs, projected, rho), False
    if target == "value":
        student_q = decoded(q_logits[:, 0]).mean(0)
        return F.mse_loss(student_q, dist.teacher_q_mean(teacher, obs[0], action[0], task)), False
    if target == "policy":
        # trains the policy prior only (through the policy optimizer): latent and task embedding detached
        z0 = zs[0].detach()
        heads = heads_for(model, task, fast, detach_emb=True)
        student_mean = heads.pi(z0, eps=torch.zeros(*z0.shape[:-1], cfg.action_dim, device=z0.device))[1]["mean"]
        return F.mse_loss(student_mean, dist.teacher_policy_mean(teacher, obs[0], task)), True
    raise ConfigError(f"unknown distillation target {target!r}")  # unreachable after check_target
