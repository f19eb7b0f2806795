"""TD-MPC2 world model for state observations, single- and multi-task.

Shapes: B = batch, any leading dims allowed where noted. Task ids are int64 `(B,)`; multi-task
inputs are padded to the task set's dims (obs_dim, action_dim).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from agent import math as tdmath
from agent import ops
from agent.config import ModelConfig
from agent.layers import EnsembleMLP, SimNorm, mlp


class WorldModel(nn.Module):
    """encoder, latent dynamics, reward head, policy prior and a Q ensemble (+ target copy)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        num_tasks = len(cfg.tasks)
        if cfg.task_dim > 0:
            self._task_emb = nn.Embedding(num_tasks, cfg.task_dim, max_norm=1)
        masks = torch.zeros(num_tasks, cfg.action_dim)
        for i, dim in enumerate(cfg.task_action_dims):
            masks[i, :dim] = 1.0
        self.register_buffer("_action_masks", masks)
        td, ld, ad = cfg.task_dim, cfg.latent_dim, cfg.action_dim
        self._encoder = nn.ModuleDict({"state": mlp(cfg.obs_dim + td, max(cfg.num_enc_layers - 1, 1) * [cfg.enc_dim], ld,
                                                     act=SimNorm(cfg.simnorm_dim))})
        self._dynamics = mlp(ld + ad + td, 2 * [cfg.mlp_dim], ld, act=SimNorm(cfg.simnorm_dim))
        self._reward = mlp(ld + ad + td, 2 * [cfg.mlp_dim], cfg.num_bins)
        self._pi = mlp(ld + td, 2 * [cfg.mlp_dim], 2 * ad)
        self._Qs = EnsembleMLP(cfg.num_q, ld + ad + td, 2 * [cfg.mlp_dim], cfg.num_bins, dropout=cfg.dropout)
        self._target_Qs = copy.deepcopy(self._Qs).requires_grad_(False)
        self.reset_parameters()

    # -- construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Official init: truncated normal (std 0.02) weights, zero biases, U(-0.02, 0.02) task
        embedding, zero output weights of the reward head and the Q heads."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.uniform_(module.weight, -0.02, 0.02)
        for layer in self._Qs.layers:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self._reward[-1].weight.zero_()
            self._Qs.layers[-1].weight.zero_()
        self._target_Qs.load_state_dict(self._Qs.state_dict())

    def train(self, mode: bool = True) -> "WorldModel":
        super().train(mode)
        self._target_Qs.train(False)  # target network never uses dropout
        return self

    @torch.no_grad()
    def soft_update_target(self, tau: float) -> None:
        """Polyak average: target <- (1 - tau) * target + tau * online."""
        for target, online in zip(self._target_Qs.parameters(), self._Qs.parameters()):
            target.lerp_(online, tau)

    @property
    def multitask(self) -> bool:
        return self.cfg.task_dim > 0

    # -- task conditioning --------------------------------------------------------------------
    def task_emb(self, task: torch.Tensor) -> torch.Tensor:
        """task: (B,) int64 -> (B, task_dim). Rows with norm > 1 are renormalised in place (max_norm=1)."""
        return self._task_emb(task)

    def _with_task(self, x: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Append the task embedding to x: (..., B, D) -> (..., B, D + task_dim)."""
        if not self.multitask:
            return x
        emb = self.task_emb(task)
        return torch.cat([x, emb.expand(*x.shape[:-1], emb.shape[-1])], dim=-1)

    def action_mask(self, task: torch.Tensor | None) -> torch.Tensor | None:
        return self._action_masks[task] if self.multitask else None

    # -- heads --------------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """obs: (..., B, obs_dim) -> z: (..., B, latent_dim) on the simplex groups."""
        return self._encoder["state"](self._with_task(obs, task))

    def next(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, latent), a: (B, action_dim) -> next latent (B, latent)."""
        return self._dynamics(torch.cat([self._with_task(z, task), a], dim=-1))

    def reward(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """-> reward logits (..., B, num_bins)."""
        return self._reward(torch.cat([self._with_task(z, task), a], dim=-1))

    def pi(self, z: torch.Tensor, task: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        """Squashed Gaussian policy prior.

        z: (..., B, latent). Returns (action, info): action (..., B, action_dim) sampled with `eps`
        (standard normal, drawn if None); info['mean'] = tanh(mean_raw) * mask,
        info['log_std'] (masked), info['log_prob'], info['entropy'], info['scaled_entropy'] (..., B, 1),
        info['mean_raw'], info['eps'].
        """
        out = self._pi(self._with_task(z, task))
        return ops.squashed_gaussian(out, eps, self.action_mask(task), self.cfg.log_std_min, self.cfg.log_std_max)

    def Q(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None = None, return_type: str = "min",
          target: bool = False, detach: bool = False) -> torch.Tensor:
        """Q ensemble. 'all' -> logits of every head (num_q, ..., B, num_bins); 'min' / 'avg' ->
        min / mean over two randomly chosen heads of the decoded values (..., B, 1).
        `detach` evaluates the online heads without gradient to their parameters."""
        if return_type not in ("all", "min", "avg"):
            raise ValueError(f"return_type must be 'all', 'min' or 'avg', got {return_type!r}")
        x = torch.cat([self._with_task(z, task), a], dim=-1)
        net = self._target_Qs if target else self._Qs
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if detach:
            logits = torch.func.functional_call(net, {k: v.detach() for k, v in net.named_parameters()}, (x2,))
        else:
            logits = net(x2)
        logits = logits.view(net.num, *lead, -1)
        if return_type == "all":
            return logits
        heads = ops.q_pair(self.cfg.num_q, logits.device)
        return ops.reduce_pair(tdmath.two_hot_inv(logits[heads], self.cfg.vmin, self.cfg.vmax), return_type)

    def num_parameters(self, include_target: bool = False) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if include_target or not name.startswith("_target_Qs"))
