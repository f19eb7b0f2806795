"""Training-time kernels: the world model's heads evaluated from its own parameters, with autograd,
for one batch of task ids. Same functions as `WorldModel.encode / next / reward / Q / pi`, cheaper:

* the task embedding is looked up once per batch, and its product with each head's first-layer
  weights (plus the bias) is computed once per batch row instead of being concatenated to every
  input row (first layer = z @ W_z.T + a @ W_a.T + (emb @ W_e.T + b));
* LayerNorm + Mish run as one fused native kernel forward and backward (`agent.ops.ln_mish`,
  `use_native_kernels`); the Q ensemble's first layer is one GEMM for all heads (shared input)
  and its per-head LayerNorm + Mish reads that (N, heads, D) output and writes (heads, N, D)
  directly, so no transposed copies are made;
* without the native kernels: torch's LayerNorm and `agent.ops.mish_train` (one exp; compiled
  with `use_compiled_mish`);
* dropout draws the gaps between dropped elements (geometric) instead of one Bernoulli per
  element: the same i.i.d. Bernoulli(p) mask at ~1% of the random draws (p = 0.01); the kept units'
  1 / (1 - p) is applied inside the LayerNorm kernel.

Dropout (Q ensemble, first layer) follows the model's train/eval mode and draws from the torch
RNG stream (so a restored RNG state reproduces it), but not the same numbers as nn.Dropout.

Every operation (LayerNorm + Mish, SimNorm, the policy head, the Q-pair draw) is `agent.ops`'s
one definition; this module only decides the schedule (which products, in which layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from agent import ops
from agent.math import two_hot_inv
from agent.ops import mish_train as mish  # noqa: F401  (the training Mish, under its old name)
from agent.ops import use_compiled_mish, use_native_kernels  # noqa: F401  (process-wide switches)
from agent.world_model import WorldModel


def drop_positions(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat positions in [0, n) dropped by an i.i.d. Bernoulli(p) mask (int64, ascending), drawn
    from the torch RNG as geometric gaps between dropped positions (cheap for small p)."""
    if p <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    expected = n * p
    draws = int(expected + 6 * math.sqrt(expected) + 16)
    positions = torch.empty(draws, dtype=torch.float64).geometric_(p).cumsum_(0).sub_(1)
    while positions[-1] < n:  # essentially never: extend until the sequence passes the end
        more = torch.empty(draws, dtype=torch.float64).geometric_(p).cumsum_(0).add_(positions[-1])
        positions = torch.cat([positions, more])
    return positions[positions < n].long().to(device)


def _hidden(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """LayerNorm + Mish of a NormedLinear's linear output (no dropout: only the Q ensemble has it)."""
    return ops.ln_mish(x, layer.ln.weight, layer.ln.bias, layer.ln.eps)


def _tail(x: torch.Tensor, seq: nn.Sequential, simnorm_group: int | None) -> torch.Tensor:
    """Layers 1.. of an `mlp` given layer 0's linear output x."""
    x = _hidden(x, seq[0])
    for layer in seq[1:-1]:
        x = _hidden(F.linear(x, layer.weight, layer.bias), layer)
    last = seq[-1]
    x = F.linear(x, last.weight, last.bias)
    if simnorm_group is None:
        return x
    return ops.ln_simnorm(x, last.ln.weight, last.ln.bias, simnorm_group, last.ln.eps)


class BatchKernels:
    """The heads of `model` for one batch with task ids `task` (B,) (None for single-task models).

    Inputs carry any leading dims before the batch dim: z (..., B, latent), a (..., B, action_dim).
    """

    def __init__(self, model: WorldModel, task: torch.Tensor | None, detach_emb: bool = False):
        self.model, self.cfg = model, model.cfg
        emb = model.task_emb(task) if model.multitask else None       # (B, task_dim), one lookup
        self.emb = emb.detach() if emb is not None and detach_emb else emb
        self.mask = model.action_mask(task) if model.multitask else None   # (B, action_dim)
        self._dynamics_const: dict[bool, torch.Tensor] = {}

    # -- first layers with the task embedding folded in --------------------------------------
    def _task_const(self, weight: torch.Tensor, bias: torch.Tensor, start: int) -> torch.Tensor:
        """emb @ W[:, start:start+td].T + b -> (B, out); just b for single-task models."""
        if self.emb is None:
            return bias
        return torch.addmm(bias, self.emb, weight[:, start:start + self.cfg.task_dim].T)

    def _first(self, x: torch.Tensor, a: torch.Tensor | None, weight: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """x @ W_x.T (+ a @ W_a.T) + const for inputs [x, emb, a]; x (..., B, width), const (B, out)."""
        width, lead = x.shape[-1], x.shape[:-1]
        x2 = x.reshape(-1, width)
        w_x = weight[:, :width].T
        if a is None:
            out = x2 @ w_x
        else:  # the action product enters the GEMM as its accumulator
            out = torch.addmm(a.reshape(-1, a.shape[-1]) @ weight[:, weight.shape[1] - a.shape[-1]:].T, x2, w_x)
        # out of place: an in-place add on this view would make autograd copy the tensor four times
        return out.view(*lead, -1) + const

    # -- heads ----------------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (..., B, obs_dim) -> z (..., B, latent)."""
        seq = self.model._encoder["state"]
        first = seq[0]
        const = self._task_const(first.weight, first.bias, self.cfg.obs_dim)
        return _tail(self._first(obs, None, first.weight, const), seq, self.cfg.simnorm_dim)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """One dynamics step (B, latent), (B, action_dim) -> (B, latent)."""
        seq = self.model._dynamics
        grad = torch.is_grad_enabled()
        if grad not in self._dynamics_const:  # shared by the steps of a rollout
            self._dynamics_const[grad] = self._task_const(seq[0].weight, seq[0].bias, self.cfg.latent_dim)
        return _tail(self._first(z, a, seq[0].weight, self._dynamics_const[grad]), seq, self.cfg.simnorm_dim)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """-> reward logits (..., B, num_bins)."""
        seq = self.model._reward
        const = self._task_const(seq[0].weight, seq[0].bias, self.cfg.latent_dim)
        return _tail(self._first(z, a, seq[0].weight, const), seq, None)

    def q_all(self, z: torch.Tensor, a: torch.Tensor, target: bool = False, detach: bool = False) -> torch.Tensor:
        """Logits of every Q head (num_q, ..., B, num_bins); `detach` cuts the gradient to the
        online heads' parameters (the policy loss), `target` uses the target heads."""
        net = self.model._target_Qs if target else self.model._Qs
        layers = net.layers
        params = [(l.weight, l.bias, getattr(l, "ln_weight", None), getattr(l, "ln_bias", None)) for l in layers]
        if detach:
            params = [tuple(p.detach() if p is not None else None for p in group) for group in params]
        num, L = net.num, self.cfg.latent_dim
        lead = z.shape[:-1]                                   # (..., B)
        w0, b0, g0, beta0 = params[0]
        out0 = w0.shape[1]
        w0_flat = w0.reshape(num * out0, -1)
        const = self._task_const(w0_flat, b0.reshape(-1), L)   # (B, num * out0)
        y = self._first(z, a, w0_flat, const).reshape(-1, num, out0)  # (N, num, out0)
        first = layers[0]
        dropped, p = None, 0.0
        if first.dropout is not None and first.training and first.dropout.p > 0:
            p = first.dropout.p
            dropped = drop_positions(y.numel(), p, y.device)
        x = ops.ln_mish(y, g0, beta0, dropped=dropped, p=p, transpose_heads=True)     # (num, N, out0)
        for layer, (w, b, g, beta) in zip(layers[1:], params[1:]):
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if layer.normed:
                x = ops.ln_mish(x, g, beta)
        return x.view(num, *lead, -1)

    def q_value(self, z: torch.Tensor, a: torch.Tensor, reduce: str, target: bool = False,
                detach: bool = False) -> torch.Tensor:
        """min / avg over two randomly chosen heads of the decoded values (..., B, 1), as `WorldModel.Q`."""
        logits = self.q_all(z, a, target=target, detach=detach)
        heads = ops.q_pair(self.cfg.num_q, logits.device)
        return ops.reduce_pair(two_hot_inv(logits[heads], self.cfg.vmin, self.cfg.vmax), reduce)

    def pi(self, z: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Squashed Gaussian policy prior, `WorldModel.pi` conventions (upstream log-prob)."""
        cfg, seq = self.cfg, self.model._pi
        const = self._task_const(seq[0].weight, seq[0].bias, cfg.latent_dim)
        out = _tail(self._first(z, None, seq[0].weight, const), seq, None)
        return ops.squashed_gaussian(out, eps, self.mask, cfg.log_std_min, cfg.log_std_max)


class ModelHeads:
    """The same interface as BatchKernels through the model's own methods (the reference path)."""

    def __init__(self, model: WorldModel, task: torch.Tensor | None, detach_emb: bool = False):
        self.model, self.cfg, self.task = model, model.cfg, task
        self.mask = model.action_mask(task) if model.multitask else None

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.model.encode(obs, self.task)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.model.next(z, a, self.task)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.model.reward(z, a, self.task)

    def q_all(self, z: torch.Tensor, a: torch.Tensor, target: bool = False, detach: bool = False) -> torch.Tensor:
        return self.model.Q(z, a, self.task, return_type="all", target=target, detach=detach)

    def q_value(self, z: torch.Tensor, a: torch.Tensor, reduce: str, target: bool = False,
                detach: bool = False) -> torch.Tensor:
        return self.model.Q(z, a, self.task, return_type=reduce, target=target, detach=detach)

    def pi(self, z: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.pi(z, self.task, eps=eps)


def heads_for(model: WorldModel, task: torch.Tensor | None, fast: bool = True, detach_emb: bool = False):
    """BatchKernels (fast) or ModelHeads (the model's own methods) for one batch."""
    return (BatchKernels if fast else ModelHeads)(model, task, detach_emb=detach_emb)
