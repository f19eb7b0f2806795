"""Inference kernels for planning: the world model's heads with the task embedding folded in.

Every first layer of a TD-MPC2 head sees [z, task_emb, action]. During planning the task
embedding is constant per environment, so its product with the weights (plus the bias) is
computed once per environment instead of once per sample, and the reward and dynamics heads,
which share their input, run their first layer as one matrix product. Same function as the
model's own heads, fewer FLOPs.

Rows are laid out environment-major: a tensor of N = E * R rows holds R rows per environment. A call
for the environments `envs` gets their rows only; a chunk of rows inside one environment passes
that single environment as `envs`. The element-wise epilogues (constant add, LayerNorm, Mish,
SimNorm, two-hot decode) run in the fused kernels of `agent.native` when they are available, and
`value_net` hands the same weights to `native.ValueNet`, which does a whole value estimate in one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from agent import math as tdmath
from agent import native
from agent.layers import simnorm
from agent.world_model import WorldModel


def fast_mish(x: torch.Tensor) -> torch.Tensor:
    """Mish for inference: x * tanh(softplus(x)) = x - 2x / ((e^x + 1)^2 + 1).

    One exp instead of exp + log1p + tanh, one temporary, no clamp (e^x = inf gives exactly x).
    x is overwritten."""
    r = torch.exp(x).add_(1.0).square_().add_(1.0).reciprocal_()
    return x.addcmul_(x, r, value=-2.0)


def _hidden(x: torch.Tensor, layer, const: torch.Tensor | None = None) -> torch.Tensor:
    """Mish(LayerNorm(x + const)) for a NormedLinear `layer`; see `_ln_mish`."""
    return _ln_mish(x, layer.ln.weight, layer.ln.bias, const, layer.ln.eps)


def _ln_mish(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, const: torch.Tensor | None,
             eps: float = 1e-5) -> torch.Tensor:
    """Mish(LayerNorm(x + const) * gamma + beta), x (N, out) a linear output (overwritten);
    const (n, out): row i of x gets const[i // (N / n)] (per-environment constants), or None."""
    if native.usable(x, gamma, beta, *(() if const is None else (const,))):
        return native.ln_act(x, gamma, beta, eps, add=const, out=x)
    if const is not None:
        x.view(const.shape[0], -1, x.shape[-1]).add_(const.unsqueeze(1))
    return fast_mish(F.layer_norm(x, (x.shape[-1],), gamma, beta, eps))


def _linear_hidden(x: torch.Tensor, layer) -> torch.Tensor:
    # the bias joins the epilogue: addmm would first copy it into every output row
    return _hidden(x @ layer.weight.T, layer, layer.bias.view(1, -1))


def _decode(logits: torch.Tensor, cfg) -> torch.Tensor:
    """Two-hot logits (N, >= num_bins; extra columns are padding) -> values (N, 1)."""
    if native.usable(logits):
        return native.two_hot_decode(logits, cfg.vmin, cfg.vmax, cfg.num_bins)
    return tdmath.two_hot_inv(logits[:, :cfg.num_bins], cfg.vmin, cfg.vmax)


def _padded_output(weight: torch.Tensor, bias: torch.Tensor, multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """An output layer (out, in) as (W.T (in, out_padded), bias (out_padded,)) with zero columns up
    to a multiple of `multiple`: MKL runs 101 output columns ~1.5x slower than 112."""
    out_features = weight.shape[0]
    padded = -(-out_features // multiple) * multiple
    w_t = weight.new_zeros(weight.shape[1], padded)
    w_t[:, :out_features] = weight.T
    b = bias.new_zeros(padded)
    b[:out_features] = bias
    return w_t, b


def _ln_simnorm(x: torch.Tensor, layer, group: int) -> torch.Tensor:
    """SimNorm(LayerNorm(x)) for the last dynamics layer; x (N, latent) its linear output (overwritten)."""
    gamma, beta = layer.ln.weight, layer.ln.bias
    if native.usable(x, gamma, beta):
        return native.ln_simnorm_(x, gamma, beta, group, layer.ln.eps)
    return simnorm(F.layer_norm(x, (layer.out_features,), gamma, beta, layer.ln.eps), group)


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
                const = bias.expand(num_envs, *bias.shape).contiguous()
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
        w_z, w_a, q_const = split(q_w, q0.bias.reshape(-1), True)
        q_w = torch.cat([w_z, w_a], 1).T  # (L + A, num_q * mlp)
        width = cfg.mlp_dim
        self.reward_out = _padded_output(model._reward[-1].weight, model._reward[-1].bias)
        last_q = model._Qs.layers[-1]
        self.q_out = [_padded_output(last_q.weight[h], last_q.bias[h]) for h in range(cfg.num_q)]
        # per head: (first-layer weight (L + A, mlp), per-env constant (E, mlp)), both contiguous
        self.q_first = [(q_w[:, h * width:(h + 1) * width].contiguous(), q_const[:, h * width:(h + 1) * width].contiguous())
                        for h in range(cfg.num_q)]
        self._value_nets: dict[tuple, object] = {}

    def value_net(self, heads: torch.Tensor, rows_per_env: int, horizon: int, discount: float):
        """`native.ValueNet` doing step x horizon + pi + q_avg(heads) in one call, or None where the
        native kernels (or torch's BLAS entry points) are unavailable or the weights are not on CPU.
        heads: (2,) Q head indices."""
        key = (tuple(sorted(heads.tolist())), rows_per_env, horizon, discount)  # a + b == b + a: order is moot
        if key in self._value_nets:
            return self._value_nets[key]
        self._value_nets[key] = net = self._build_value_net(torch.tensor(key[0]), rows_per_env, horizon, discount)
        return net

    def _build_value_net(self, heads: torch.Tensor, rows_per_env: int, horizon: int, discount: float):
        m, cfg = self.model, self.cfg
        if (not native.value_kernel_available() or self.reward_w.device.type != "cpu" or heads.numel() != 2
                or self.reward_w.dtype != torch.float32 or len(m._Qs.layers) != 3):
            return None
        dense = native.Dense

        def hidden(layer):
            return dense(layer.weight.T, layer.bias, layer.ln.weight, layer.ln.bias)

        rew0, dyn0, q_layers = m._reward[0], m._dynamics[0], m._Qs.layers
        q0, q1 = [], []
        for head in heads.tolist():
            w_first, const = self.q_first[head]
            q0.append(dense(w_first, const, q_layers[0].ln_weight[head], q_layers[0].ln_bias[head]))
            q1.append(dense(q_layers[1].weight[head].T, q_layers[1].bias[head], q_layers[1].ln_weight[head],
                            q_layers[1].ln_bias[head]))
        layers = {
            "first": dense(torch.cat([self.reward_w, self.next_w], 1), torch.cat([self.reward_const, self.next_const], 1),
                           torch.cat([rew0.ln.weight, dyn0.ln.weight]), torch.cat([rew0.ln.bias, dyn0.ln.bias])),
            "reward1": hidden(m._reward[1]), "reward_out": dense(*self.reward_out),
            "next1": hidden(m._dynamics[1]), "next_out": hidden(m._dynamics[2]),
            "pi0": dense(self.pi_w, self.pi_const, m._pi[0].ln.weight, m._pi[0].ln.bias), "pi1": hidden(m._pi[1]),
            "pi_out": dense(m._pi[2].weight.T, m._pi[2].bias),
            "q0": q0, "q1": q1, "q_out": [dense(*self.q_out[head]) for head in heads.tolist()],
        }
        return native.ValueNet(layers, latent=cfg.latent_dim, action=cfg.action_dim, mlp=cfg.mlp_dim, bins=cfg.num_bins,
                               simnorm=cfg.simnorm_dim, rows_per_env=rows_per_env, horizon=horizon, discount=discount,
                               vmin=cfg.vmin, vmax=cfg.vmax, log_std_min=cfg.log_std_min, log_std_max=cfg.log_std_max,
                               ln_eps=rew0.ln.eps)

    def encode(self, obs: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """obs: (E, obs_dim) -> z (E, latent) (E rows only; uses the model directly)."""
        return self.model.encode(obs, task)

    def step(self, z: torch.Tensor, a: torch.Tensor, envs: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (N, L), a: (N, A) for the environments `envs` -> (reward value (N, 1), next z (N, L))."""
        m = self.model
        za = torch.cat([z, a], -1)
        h_r = _hidden(za @ self.reward_w, m._reward[0], self.reward_const[envs])
        h_d = _hidden(za @ self.next_w, m._dynamics[0], self.next_const[envs])
        h_r, h_d = _linear_hidden(h_r, m._reward[1]), _linear_hidden(h_d, m._dynamics[1])
        reward = _decode(torch.addmm(self.reward_out[1], h_r, self.reward_out[0]), self.cfg)
        last = m._dynamics[2]
        z_next = _ln_simnorm(F.linear(h_d, last.weight, last.bias), last, self.cfg.simnorm_dim)
        return reward, z_next

    def pi(self, z: torch.Tensor, mask: torch.Tensor | None, envs: slice = slice(None),
           eps: torch.Tensor | None = None) -> torch.Tensor:
        """z: (N, L) -> sampled squashed action (N, A); mask: (N, A) or None; eps: (N, A) noise (drawn if None)."""
        m, cfg = self.model, self.cfg
        h = _hidden(z @ self.pi_w, m._pi[0], self.pi_const[envs])
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
        za = torch.cat([z, a], -1)
        values = 0.0
        for head in heads.tolist():  # one head at a time: 2-D GEMMs, activations stay in cache
            w_first, const = self.q_first[head]
            h = za @ w_first
            for i, layer in enumerate(layers):
                if not layer.normed:  # the output layer, padded
                    w_out, b_out = self.q_out[head]
                    h = torch.addmm(b_out, h, w_out)
                    continue
                if i > 0:
                    h, const_i = h @ layer.weight[head].T, layer.bias[head].view(1, -1)
                else:
                    const_i = const[envs]
                h = _ln_mish(h, layer.ln_weight[head], layer.ln_bias[head], const_i)
            values = values + _decode(h, cfg)
        return values / 2
