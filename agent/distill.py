"""Distillation targets: what a teacher world model predicts for a batch, and how far the student is.

Teacher and student may differ in every dimension (latent, task embedding, widths, num_q) but
share the task set and the obs / action padding. Teacher outputs are computed without gradient,
either live or taken from precomputed `TeacherTargets` (the teacher-target cache); both give the
same numbers because the cache stores exactly the quantities defined here:

    reward[h] = two_hot_inv(teacher.reward(teacher.encode(obs[h]), action[h]))      (H, B, 1)
    latent[h] = (teacher.encode(obs[h]) - pca.mean) @ pca.components.T              (H+1, B, k)

Student-side terms are MSEs; multi-step ones weight step t by rho^t and divide by the number of
steps (the TD-MPC2 convention for its own terms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from agent.config import DISTILL_TARGETS
from agent.errors import ConfigError
from agent.math import two_hot_inv
from agent.world_model import WorldModel

# targets whose teacher side a TeacherTargets field can supply
CACHEABLE = {"reward": "reward", "reward_observed": "reward", "latent_pca": "latent"}


@dataclass
class TeacherTargets:
    """Precomputed teacher outputs for one batch (None = compute live).

    reward: (H, B, 1) teacher reward at the observed obs[h] and action[h] (h = 0 is the paper's target);
    latent: (H+1, B, k) teacher latents of obs[h] projected onto the PCA basis.
    """

    reward: torch.Tensor | None = None
    latent: torch.Tensor | None = None


@dataclass
class PcaProjection:
    """Top-k principal directions of teacher latents: project(z) = (z - mean) @ components.T.

    mean: (Z,), components: (k, Z) with orthonormal rows, both float32.
    """

    mean: torch.Tensor
    components: torch.Tensor

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., Z) -> (..., k)."""
        return (z - self.mean) @ self.components.T

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "PcaProjection":
        return cls(state["mean"].float(), state["components"].float())


@torch.no_grad()
def fit_pca(latents: torch.Tensor, k: int) -> PcaProjection:
    """PCA of teacher latents (N, Z) in float64 (the teacher cache's recipe); keeps k components."""
    if k > min(latents.shape):
        raise ConfigError(f"latent_pca: k={k} exceeds min(teacher latent dim {latents.shape[1]}, rows {latents.shape[0]})")
    z = latents.double()
    mean = z.mean(0)
    _, _, vt = torch.linalg.svd(z - mean, full_matrices=False)
    return PcaProjection(mean.float(), vt[:k].float().contiguous())


class LatentProjection(nn.Module):
    """Learned linear map teacher latent (Zt) -> student latent (Zs), trained with the student."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.linear = nn.Linear(teacher_dim, student_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


def check_compatible(student: WorldModel, teacher: WorldModel) -> None:
    """Teacher and student must share task set and obs/action padding (every other dim is free)."""
    s, t = student.cfg, teacher.cfg
    for name in ("obs_dim", "action_dim"):
        if getattr(s, name) != getattr(t, name):
            raise ConfigError(f"teacher {name} {getattr(t, name)} != student {name} {getattr(s, name)}")
    if len(s.tasks) != len(t.tasks) or s.task_action_dims != t.task_action_dims:
        raise ConfigError(f"teacher task set ({len(t.tasks)} tasks) differs from the student's ({len(s.tasks)} tasks)")


def check_target(target: str | None) -> None:
    if target is not None and target not in DISTILL_TARGETS:
        raise ConfigError(f"unknown distillation target {target!r}; known: {', '.join(DISTILL_TARGETS)}")


def rho_weighted_mse(student: torch.Tensor, teacher: torch.Tensor, rho: float) -> torch.Tensor:
    """(1/T) sum_t rho^t mean((student[t] - teacher[t])^2) over steps t of (T, B, ...) tensors."""
    steps = student.shape[0]
    per_step = (student - teacher).pow(2).flatten(1).mean(1)
    weights = rho ** torch.arange(steps, dtype=per_step.dtype, device=per_step.device)
    return (per_step * weights).sum() / steps


# -- live teacher passes (no gradient) --------------------------------------------------------

def _decoded(model: WorldModel, logits: torch.Tensor) -> torch.Tensor:
    return two_hot_inv(logits, model.cfg.vmin, model.cfg.vmax)


@torch.no_grad()
def teacher_observed_rewards(teacher: WorldModel, obs: torch.Tensor, action: torch.Tensor,
                             task: torch.Tensor | None) -> torch.Tensor:
    """obs: (T, B, D) (T <= H), action: (T, B, A) -> (T, B, 1): the cache's `reward` definition."""
    return _decoded(teacher, teacher.reward(teacher.encode(obs, task), action, task))


@torch.no_grad()
def teacher_rollout_rewards(teacher: WorldModel, obs0: torch.Tensor, action: torch.Tensor,
                            task: torch.Tensor | None) -> torch.Tensor:
    """Teacher latent rollout from obs0 (B, D) along action (H, B, A) -> rewards (H, B, 1)."""
    z = teacher.encode(obs0, task)
    rewards = []
    for t in range(action.shape[0]):
        rewards.append(_decoded(teacher, teacher.reward(z, action[t], task)))
        if t + 1 < action.shape[0]:
            z = teacher.next(z, action[t], task)
    return torch.stack(rewards)


@torch.no_grad()
def teacher_latents(teacher: WorldModel, obs: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
    """obs: (T, B, D) -> teacher latents (T, B, Zt)."""
    return teacher.encode(obs, task)


@torch.no_grad()
def teacher_q_mean(teacher: WorldModel, obs0: torch.Tensor, action0: torch.Tensor,
                   task: torch.Tensor | None) -> torch.Tensor:
    """Mean over ALL teacher Q heads of the decoded values at (encode(obs0), action0) -> (B, 1).
    (All heads rather than two random ones: deterministic, and lower variance for a target.)"""
    logits = teacher.Q(teacher.encode(obs0, task), action0, task, return_type="all")
    return _decoded(teacher, logits).mean(0)


@torch.no_grad()
def teacher_policy_mean(teacher: WorldModel, obs0: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
    """Teacher policy mean tanh(mean_raw) * mask at encode(obs0) -> (B, A)."""
    z = teacher.encode(obs0, task)
    return teacher.pi(z, task, eps=torch.zeros(*z.shape[:-1], teacher.cfg.action_dim, device=z.device))[1]["mean"]
