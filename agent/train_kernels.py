"""Training-time kernels: the world model's heads evaluated from its own parameters, with autograd,
for one batch of task ids. Same functions as `WorldModel.encode / next / reward / Q / pi`, cheaper:

* the task embedding is looked up once per batch, and its product with each head's first-layer
  weights (plus the bias) is computed once per batch row instead of being concatenated to every
  input row (first layer = z @ W_z.T + a @ W_a.T + (emb @ W_e.T + b));
* LayerNorm + Mish run as one fused native kernel forward and backward (`agent.native`,
  `use_native_kernels`); the Q ensemble's first layer is one GEMM for all heads (shared input)
  and its per-head LayerNorm + Mish reads that (N, heads, D) output and writes (heads, N, D)
  directly, so no transposed copies are made;
* without the native kernels: torch's LayerNorm, and Mish as x * n / (n + 2), n = e^x (e^x + 2)
  (one exp instead of exp, log1p and tanh; ~1e-7 relative), fused by torch.compile
  (`use_compiled_mish`) or as an eager chain whose backward reuses e^x and tanh(softplus(x));
* dropout draws the gaps between dropped elements (geometric) instead of one Bernoulli per
  element: the same i.i.d. Bernoulli(p) mask at ~1% of the random draws (p = 0.01); the kept units'
  1 / (1 - p) is applied inside the LayerNorm kernel.

Dropout (Q ensemble, first layer) follows the model's train/eval mode and draws from the torch
RNG stream (so a restored RNG state reproduces it), but not the same numbers as nn.Dropout.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from agent import native
from agent.layers import simnorm
from agent.math import two_hot_inv
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


def _mish_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^x, tanh(softplus(x))) for x clamped at 20 (beyond which tanh(softplus(x)) = 1 in float32)."""
    e = x.clamp(max=20.0).exp_()
    n = e.add(2.0).mul_(e)
    return e, n.div_(n.add(2.0))


class _Mish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        e, t = _mish_parts(x)
        ctx.save_for_backward(x, e, t)
        return x * t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, e, t = ctx.saved_tensors
        sigmoid = e.div(e.add(1.0))
        # d/dx x tanh(softplus(x)) = t + x (1 - t^2) sigmoid(x)
        return t.mul(t).neg_().add_(1.0).mul_(x).mul_(sigmoid).add_(t).mul_(grad)


def _eager_mish(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Mish.apply(x)
    return _mish_parts(x)[1].mul_(x)


def _mish_formula(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


class _CompiledMish:
    """Mish fused into one vectorised loop forward and one backward by torch.compile (inductor):
    ~3-4x faster than the eager chain. Compiled once per process for flat inputs of any length
    (grad and no-grad variants, checked at enable time); any failure falls back to eager."""

    def __init__(self) -> None:
        self.fn = None
        self.enabled = False

    def enable(self, enabled: bool = True) -> bool:
        """Turn the compiled path on (compiling and checking it now) or off; returns whether it is on."""
        if not enabled:
            self.enabled = False
            return False
        if self.fn is None:
            try:
                fn = torch.compile(_mish_formula, dynamic=True)
                probe = torch.linspace(-30.0, 30.0, 67, requires_grad=True)
                fn(probe).sum().backward()
                with torch.no_grad():
                    fn(probe.detach())
                if not torch.allclose(probe.grad, torch.autograd.grad(F.mish(probe).sum(), probe)[0], rtol=1e-4, atol=1e-5):
                    raise RuntimeError("compiled Mish gradient differs from F.mish")
                self.fn = fn
            except Exception as exc:  # no C++ compiler, unsupported platform, inductor bug...
                warnings.warn(f"compiled Mish unavailable, using eager kernels ({type(exc).__name__}: {str(exc)[:120]})")
                self.fn = False
        self.enabled = bool(self.fn)
        return self.enabled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.reshape(-1)).view(x.shape)


_compiled_mish = _CompiledMish()


def use_compiled_mish(enabled: bool = True) -> bool:
    """Process-wide switch for the torch.compile'd Mish of these kernels; returns whether it is on."""
    return _compiled_mish.enable(enabled)


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish (x * tanh(softplus(x))) with one exp: compiled if enabled, else the eager chain
    (intermediates kept only when a gradient is needed)."""
    if _compiled_mish.enabled:
        return _compiled_mish(x)
    return _eager_mish(x)


_native_hidden = True


def use_native_kernels(enabled: bool = True) -> bool:
    """Process-wide switch for `agent.native`'s fused LayerNorm + Mish (forward and backward) in
    these kernels; returns whether they are in use (False where they cannot be built)."""
    global _native_hidden
    _native_hidden = bool(enabled) and native.available()
    return _native_hidden


def _hidden(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """LayerNorm + Mish of a NormedLinear's linear output (no dropout: only the Q ensemble has it)."""
    gamma, beta = layer.ln.weight, layer.ln.bias
    if _native_hidden and native.usable(gamma, beta) and x.dtype == torch.float32 and x.device.type == "cpu":
        return native.layer_norm_act(x, gamma, beta, layer.ln.eps)
    return mish(F.layer_norm(x, (layer.out_features,), gamma, beta, layer.ln.eps))


def _ensemble_hidden(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, dropped: torch.Tensor | None = None,
                     p: float = 0.0, transpose_heads: bool = False) -> torch.Tensor:
    """Mish(LayerNorm(dropout(x)) * gamma[h] + beta[h]) of an ensemble layer's linear output, per head h.
    x: (num, N, D), or (N, num, D) with `transpose_heads`; gamma, beta: (num, D) -> (num, N, D).
    dropped: flat positions of x zeroed by dropout with rate p (kept units scaled by 1 / (1 - p)), or None.
    The native path zeroes them in x itself: x must be a temporary that nothing else reads."""
    scale = 1.0 / (1.0 - p) if dropped is not None else 1.0
    if _native_hidden and native.usable(gamma, beta) and x.dtype == torch.float32 and x.device.type == "cpu":
        return native.layer_norm_act(x, gamma, beta, 1e-5, native.MISH, scale, transpose_heads, dropped)
    if dropped is not None:  # out of place: an in-place fill on a view costs autograd several copies
        x = x.reshape(-1).index_fill(0, dropped, 0.0).view(x.shape) * scale
    if transpose_heads:
        x = x.transpose(0, 1)
    shape = (gamma.shape[0],) + (1,) * (x.dim() - 2) + (gamma.shape[1],)
    return mish(torch.addcmul(beta.view(shape), F.layer_norm(x, (x.shape[-1],)), gamma.view(shape)))


def _tail(x: torch.Tensor, seq: nn.Sequential, simnorm_group: int | None) -> torch.Tensor:
    """Layers 1.. of an `mlp` given layer 0's linear output x."""
    x = _hidden(x, seq[0])
    for layer in seq[1:-1]:
        x = _hidden(F.linear(x, layer.weight, layer.bias), layer)
    last = seq[-1]
    x = F.linear(x, last.weight, last.bias)
    if simnorm_group is None:
        return x
    return simnorm(F.layer_norm(x, (last.out_features,), last.ln.weight, last.ln.bias), simnorm_group)


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
        x = _ensemble_hidden(y, g0, beta0, dropped, p, transpose_heads=True)     # (num, N, out0)
        for layer, (w, b, g, beta) in zip(layers[1:], params[1:]):
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if layer.normed:
                x = _ensemble_hidden(x, g, beta)
        return x.view(num, *lead, -1)

    def q_value(self, z: torch.Tensor, a: torch.Tensor, reduce: str, target: bool = False,
                detach: bool = False) -> torch.Tensor:
        """min / avg over two randomly chosen heads of the decoded values (..., B, 1), as `WorldModel.Q`."""
        logits = self.q_all(z, a, target=target, detach=detach)
        heads = torch.randperm(self.cfg.num_q, device=logits.device)[:2]
        values = two_hot_inv(logits[heads], self.cfg.vmin, self.cfg.vmax)
        return values.min(0).values if reduce == "min" else values.mean(0)

    def pi(self, z: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Squashed Gaussian policy prior, `WorldModel.pi` conventions (upstream log-prob)."""
        cfg, seq = self.cfg, self.model._pi
        const = self._task_const(seq[0].weight, seq[0].bias, cfg.latent_dim)
        out = _tail(self._first(z, None, seq[0].weight, const), seq, None)
        mean_raw, log_std_raw = out.chunk(2, dim=-1)
        log_std = cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (torch.tanh(log_std_raw) + 1)
        if eps is None:
            eps = torch.randn_like(mean_raw)
        if self.mask is not None:
            mean_raw, log_std, eps = mean_raw * self.mask, log_std * self.mask, eps * self.mask
            action_dims = self.mask.sum(-1, keepdim=True)
        else:
            action_dims = torch.tensor(float(mean_raw.shape[-1]))
        gaussian_lp = (-0.5 * eps.pow(2) - log_std - 0.9189385175704956).sum(-1, keepdim=True)
        action = torch.tanh(mean_raw + eps * log_std.exp())
        log_prob = gaussian_lp - torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
        entropy_scale = gaussian_lp * action_dims / (log_prob + 1e-8)
        info = {"mean": torch.tanh(mean_raw), "log_std": log_std, "mean_raw": mean_raw, "eps": eps,
                "log_prob": log_prob, "entropy": -log_prob, "scaled_entropy": -log_prob * entropy_scale}
        return action, info


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
