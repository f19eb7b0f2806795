"""Inference kernels for planning: the world model's heads with the task embedding folded in.

Every first layer of a TD-MPC2 head sees [z, task_emb, action]. During planning the task
embedding is constant per environment, so its product with the weights (plus the bias) is
computed once per environment instead of once per sample, and the reward and dynamics heads,
which share their input, run their first layer as one matrix product. Same function as the
model's own heads, fewer FLOPs.

Rows are laid out environment-major: a tensor of N = E * R rows holds R rows per environment. A call
for the environments `envs` gets their rows only; a chunk of rows inside one environment passes
that single environment as `envs`. The element-wise epilogues (constant add, LayerNorm, Mish,
SimNorm, two-hot decode) are `agent.ops`'s inference variants (fused native kernels when they are
available), and `value_net` hands the same weights to `native.ValueNet`, which does a whole value
estimate in one call. When that one call cannot serve the model, `value_net` says why, once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from agent import native, ops
from agent.world_model import WorldModel


def _hidden(x: torch.Tensor, layer, const: torch.Tensor | None = None) -> torch.Tensor:
    """Mish(LayerNorm(x + const)) for a NormedLinear `layer`, x overwritten; see `ops.ln_mish_`."""
    return ops.ln_mish_(x, layer.ln.weight, layer.ln.bias, const, layer.ln.eps)


def _linear_hidden(x: torch.Tensor, layer) -> torch.Tensor:
    # the bias joins the epilogue: addmm would first copy it into every output row
    return _hidden(x @ layer.weight.T, layer, layer.bias.view(1, -1))


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
        """`native.ValueNet` doing step x horizon + pi + q_avg(heads) in one call, or None (with one
        warning per reason) where it cannot serve: the native kernels or torch's BLAS entry points
        are unavailable, or the weights are not float32 on CPU. heads: (2,) Q head indices."""
        key = (tuple(sorted(heads.tolist())), rows_per_env, horizon, discount)  # a + b == b + a: order is moot
        if key in self._value_nets:
            return self._value_nets[key]
        self._value_nets[key] = net = self._build_value_net(torch.tensor(key[0]), rows_per_env, horizon, discount)
        return net

    def value_net_unavailable(self, heads: torch.Tensor) -> str | None:
        """Why the one-call value estimate cannot serve this model here (one line), or None."""
        if self.reward_w.device.type != "cpu":
            return f"the model is on {self.reward_w.device.type} (the native value estimate runs on CPU)"
        if self.reward_w.dtype != torch.float32:
            return f"the model is {self.reward_w.dtype} (the native value estimate takes float32)"
        if heads.numel() != 2:
            return f"{heads.numel()} Q heads requested (the native value estimate averages two)"
        return native.value_kernel_unavailable()

    def _build_value_net(self, heads: torch.Tensor, rows_per_env: int, horizon: int, discount: float):
        m, cfg = self.model, self.cfg
        reason = self.value_net_unavailable(heads)
        if reason is not None:
            if native.available():  # else loading the kernels said so once already (or DISTILL_NATIVE=0)
                ops.fallback("one-call native MPPI value estimate -> chunked torch path", reason)
            return None
        dense = native.Dense

        def hidden(layer):
            return dense(layer.weight.T, layer.bias, layer.ln.weight, layer.ln.bias)

        rew0, dyn0, q_layers = m._reward[0], m._dynamics[0], m._Qs.layers
        q = []
        for head in heads.tolist():
            w_first, const = self.q_first[head]
            layers = [dense(w_first, const, q_layers[0].ln_weight[head], q_layers[0].ln_bias[head])]
            layers += [dense(layer.weight[head].T, layer.bias[head], layer.ln_weight[head], layer.ln_bias[head])
                       for layer in q_layers[1:-1]]
            q.append(layers + [dense(*self.q_out[head])])
        layers = {
            "first": dense(torch.cat([self.reward_w, self.next_w], 1), torch.cat([self.reward_const, self.next_const], 1),
                           torch.cat([rew0.ln.weight, dyn0.ln.weight]), torch.cat([rew0.ln.bias, dyn0.ln.bias])),
            "reward1": hidden(m._reward[1]), "reward_out": dense(*self.reward_out),
            "next1": hidden(m._dynamics[1]), "next_out": hidden(m._dynamics[2]),
            "pi0": dense(self.pi_w, self.pi_const, m._pi[0].ln.weight, m._pi[0].ln.bias), "pi1": hidden(m._pi[1]),
            "pi_out": dense(m._pi[2].weight.T, m._pi[2].bias),
            "q": q,
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
        reward = self._decode(torch.addmm(self.reward_out[1], h_r, self.reward_out[0]))
        last = m._dynamics[2]
        z_next = ops.ln_simnorm_(F.linear(h_d, last.weight, last.bias), last.ln.weight, last.ln.bias,
                                 self.cfg.simnorm_dim, last.ln.eps)
        return reward, z_next

    def _decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits (N, >= num_bins; extra columns are padding) -> values (N, 1)."""
        return ops.decode(logits, self.cfg.vmin, self.cfg.vmax, self.cfg.num_bins)

    def pi(self, z: torch.Tensor, mask: torch.Tensor | None, envs: slice = slice(None),
           eps: torch.Tensor | None = None) -> torch.Tensor:
        """z: (N, L) -> sampled squashed action (N, A); mask: (N, A) or None; eps: (N, A) noise (drawn if None)."""
        m, cfg = self.model, self.cfg
        h = _hidden(z @ self.pi_w, m._pi[0], self.pi_const[envs])
        out = m._pi[2](_linear_hidden(h, m._pi[1]))
        return ops.squashed_gaussian(out, eps, mask, cfg.log_std_min, cfg.log_std_max, log_prob=False)[0]

    def q_avg(self, z: torch.Tensor, a: torch.Tensor, envs: slice = slice(None),
              heads: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of two online Q heads' values (N, 1); heads: (2,) indices, random if None."""
        cfg, layers = self.cfg, self.model._Qs.layers
        if heads is None:
            heads = ops.q_pair(cfg.num_q, z.device)
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
                h = ops.ln_mish_(h, layer.ln_weight[head], layer.ln_bias[head], const_i)
            values = values + self._decode(h)
        return values / 2
