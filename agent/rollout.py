"""Inference kernels for planning: the world model's heads with the task embedding folded in.

Every first layer of a TD-MPC2 head sees [z, task_emb, action]. During planning the task
embedding is constant per environment, so its product with the weights (plus the bias) is
computed once per environment instead of once per sample, and the reward and dynamics heads,
which share their input, run their first layer as one matrix product. Same function as the
model's own heads, fewer FLOPs.

Rows are laid out environment-major: a tensor of N = E * R rows holds R rows per environment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from agent import math as tdmath
from agent.layers import simnorm
from agent.world_model import WorldModel


def fast_mish(x: torch.Tensor) -> torch.Tensor:
    """Mish for inference: x * tanh(softplus(x)) = x - 2x / ((e^x + 1)^2 + 1).

    One exp instead of exp + log1p + tanh, one temporary, no clamp (e^x = inf gives exactly x).
    x is overwritten."""
    r = torch.exp(x).add_(1.0).square_().add_(1.0).reciprocal_()
    return x.addcmul_(x, r, value=-2.0)


def _hidden(x: torch.Tensor, layer) -> torch.Tensor:
    """LayerNorm + Mish of an already-linear-transformed x for a NormedLinear `layer`."""
    return fast_mish(F.layer_norm(x, (layer.out_features,), layer.ln.weight, layer.ln.bias))


def _linear_hidden(x: torch.Tensor, layer) -> torch.Tensor:
    return _hidden(F.linear(x, layer.weight, layer.bias), layer)


class PlanningKernels:
    """Per-call snapshot of the model's weights split for planning over E environments.

    task: (E,) int64 (None for single-task models).
    """

    def __init__(self, model: WorldModel, task: torch.Tensor | None, num_envs: int):
        cfg = model.cfg
        self.model, self.cfg, self.E = model, cfg, num_envs
        L, A = cfg.latent_dim, cfg.action_dim
        emb = model.task_emb(task) if model.multitask else None  # (E, td)
        self.emb = emb

        def split(weight: torch.Tensor, bias: torch.Tensor, has_action: bool):
            """weight (..., out, L [+td] [+A]) -> (W_z, W_a or None, per-env constant (E, ..., out))."""
            w_z = weight[..., :L]
            w_a = weight[..., weight.shape[-1] - A:] if has_action else None
            if emb is not None:
                w_e = weight[..., L:L + cfg.task_dim]
                const = torch.einsum("et,...ot->e...o", emb, w_e) + bias
            else:
                const = bias.expand(num_envs, *bias.shape)
            return w_z, w_a, const

        rew0, dyn0 = model._reward[0], model._dynamics[0]
        w_z, w_a, self.reward_const = split(rew0.weight, rew0.bias, True)
        self.reward_w = torch.cat([w_z, w_a], 1).T.contiguous()  # (L + A, mlp)
        w_z, w_a, self.next_const = split(dyn0.weight, dyn0.bias, True)
        self.next_w = torch.cat([w_z, w_a], 1).T.contiguous()
        self.pi_w, _, self.pi_const = split(model._pi[0].weight, model._pi[0].bias, False)
        self.pi_w = self.pi_w.T.contiguous()
        q0 = model._Qs.layers[0]
        q_w = q0.weight.reshape(-1, q0.in_features)  # (num_q * mlp, in)
        w_z, w_a, self.q_const = split(q_w, q0.bias.reshape(-1), True)
        self.q_w = torch.cat([w_z, w_a], 1).T.contiguous()

    def _add_const(self, h: torch.Tensor, const: torch.Tensor, envs: slice) -> torch.Tensor:
        """h: (e * R, out) += const[envs] (e, out), broadcast over each environment's R rows."""
        const = const[envs]
        h.view(const.shape[0], -1, h.shape[-1]).add_(const.unsqueeze(1))
        return h

    def encode(self, obs: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """obs: (E, obs_dim) -> z (E, latent) (E rows only; uses the model directly)."""
        return self.model.encode(obs, task)

    def step(self, z: torch.Tensor, a: torch.Tensor, envs: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (N, L), a: (N, A) for the environments `envs` -> (reward value (N, 1), next z (N, L))."""
        m = self.model
        za = torch.cat([z, a], -1)
        h_r = _hidden(self._add_const(za @ self.reward_w, self.reward_const, envs), m._reward[0])
        h_d = _hidden(self._add_const(za @ self.next_w, self.next_const, envs), m._dynamics[0])
        h_r, h_d = _linear_hidden(h_r, m._reward[1]), _linear_hidden(h_d, m._dynamics[1])
        reward = tdmath.two_hot_inv(m._reward[2](h_r), self.cfg.vmin, self.cfg.vmax)
        last = m._dynamics[2]
        z_next = simnorm(F.layer_norm(F.linear(h_d, last.weight, last.bias), (last.out_features,), last.ln.weight,
                                       last.ln.bias), self.cfg.simnorm_dim)
        return reward, z_next

    def pi(self, z: torch.Tensor, mask: torch.Tensor | None, envs: slice = slice(None),
           eps: torch.Tensor | None = None) -> torch.Tensor:
        """z: (N, L) -> sampled squashed action (N, A); mask: (N, A) or None; eps: (N, A) noise (drawn if None)."""
        m, cfg = self.model, self.cfg
        h = _hidden(self._add_const(z @ self.pi_w, self.pi_const, envs), m._pi[0])
        out = m._pi[2](_linear_hidden(h, m._pi[1]))
        mean, log_std = out.chunk(2, dim=-1)
        log_std = cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (torch.tanh(log_std) + 1)
        eps = torch.randn_like(mean) if eps is None else eps
        if mask is not None:
            mean, log_std, eps = mean * mask, log_std * mask, eps * mask
        return torch.tanh(mean + eps * log_std.exp())

    def q_avg(self, z: torch.Tensor, a: torch.Tensor, envs: slice = slice(None),
              heads: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of two online Q heads' values (N, 1); heads: (2,) indices, random if None."""
        cfg, layers = self.cfg, self.model._Qs.layers
        if heads is None:
            heads = torch.randperm(cfg.num_q, device=z.device)[:2]
        width = cfg.mlp_dim
        za = torch.cat([z, a], -1)
        values = 0.0
        for head in heads.tolist():  # one head at a time: 2-D GEMMs, activations stay in cache
            h = self._add_const(za @ self.q_w[:, head * width:(head + 1) * width],
                                self.q_const[:, head * width:(head + 1) * width], envs)
            for i, layer in enumerate(layers):
                if i > 0:
                    h = torch.addmm(layer.bias[head], h, layer.weight[head].T)
                if layer.normed:
                    h = fast_mish(F.layer_norm(h, (h.shape[-1],), layer.ln_weight[head], layer.ln_bias[head]))
            values = values + tdmath.two_hot_inv(h, cfg.vmin, cfg.vmax)
        return values / 2
