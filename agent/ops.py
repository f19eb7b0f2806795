"""One definition per operation of the TD-MPC2 network, shared by every executor.

The network is evaluated by four executors: the reference `WorldModel` (its modules), the
training kernels (`agent.train_kernels.BatchKernels`), the planning kernels
(`agent.rollout.PlanningKernels`) and the native one-call value estimate (`agent.native.ValueNet`,
C). They differ in how they schedule the work, not in what they compute: each operation they share
is defined here once, with its fast variants beside the reference one, and each fast variant falls
back to the reference formula (never to a second copy of it).

    Mish                      mish (reference, F.mish), mish_train (one exp, own backward / compiled),
                              mish_ (inference, in place)
    LayerNorm + Mish          layer_ln_mish (the reference modules'; native member kernel inside
                              `member_kernels()`, also under torch.func / vmap),
                              ln_mish (differentiable; one or per-head affine, dropout, native kernel),
                              ln_mish_ (inference, in place, per-environment constants, native kernel)
    SimNorm                   simnorm, ln_simnorm (differentiable), ln_simnorm_ (inference, native kernel)
    two-hot decode            agent.math.two_hot_inv (reference), decode (inference, native kernel)
    policy head               policy_log_std, squashed_gaussian (action, log-prob, entropies),
                              with HALF_LOG_2PI the one ln(2 pi) / 2
    Q-pair draw               q_pair (two distinct heads of num_q), reduce_pair (min / mean)

A fast path that cannot serve a model or an input says so once per reason (`fallback`), as a
warning naming what runs instead.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from agent import native
from agent.math import two_hot_inv

# ln(2 pi) / 2, the normal log-density's constant per dimension. (The official code writes
# 0.9189385175704956, this value rounded to float32; in float32 arithmetic both are the same number.)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

_said: set[tuple[str, str]] = set()


def fallback(what: str, reason: str | None) -> None:
    """Warn once per (what, reason) that a fast path is not used: `what` names the path and what
    runs instead, `reason` why. reason None: nothing to say (see `_native_reason`)."""
    if reason is not None and (what, reason) not in _said:
        _said.add((what, reason))
        warnings.warn(f"{what}: {reason}", stacklevel=3)


def _native_reason(*tensors: torch.Tensor) -> str | None:
    """Why these tensors cannot go to the native kernels (device / dtype / layout), or None when the
    kernels are unavailable altogether: loading them said so once already (or DISTILL_NATIVE=0)."""
    if not native.available():
        return None
    for t in tensors:
        if not t.is_cpu:
            return f"the native kernels run on CPU, these tensors are on {t.device.type}"
        if t.dtype is not torch.float32:
            return f"the native kernels take float32, these tensors are {t.dtype}"
    return "the native kernels take contiguous tensors"


# -- Mish: x * tanh(softplus(x)) -----------------------------------------------------------------
def mish(x: torch.Tensor) -> torch.Tensor:
    """The reference Mish (torch's)."""
    return F.mish(x)


def _mish_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^x, tanh(softplus(x))) for x clamped at 20 (beyond which tanh(softplus(x)) = 1 in float32):
    tanh(softplus(x)) = n / (n + 2), n = e^x (e^x + 2)."""
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
                if not torch.allclose(probe.grad, torch.autograd.grad(mish(probe).sum(), probe)[0], rtol=1e-4, atol=1e-5):
                    raise RuntimeError("compiled Mish gradient differs from F.mish")
                self.fn = fn
            except Exception as exc:  # no C++ compiler, unsupported platform, inductor bug...
                warnings.warn(f"compiled Mish unavailable, using the eager one-exp Mish of agent.ops for training "
                              f"({type(exc).__name__}: {str(exc)[:120]})")
                self.fn = False
        self.enabled = bool(self.fn)
        return self.enabled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.reshape(-1)).view(x.shape)


_compiled_mish = _CompiledMish()


def use_compiled_mish(enabled: bool = True) -> bool:
    """Process-wide switch for the torch.compile'd `mish_train`; returns whether it is on."""
    return _compiled_mish.enable(enabled)


def mish_train(x: torch.Tensor) -> torch.Tensor:
    """Mish with one exp (~1e-7 relative to `mish`): compiled if enabled, else an eager chain whose
    backward reuses e^x and tanh(softplus(x)) (intermediates kept only when a gradient is needed)."""
    if _compiled_mish.enabled:
        return _compiled_mish(x)
    return _eager_mish(x)


def mish_(x: torch.Tensor) -> torch.Tensor:
    """Mish for inference, x overwritten: x - 2x / ((e^x + 1)^2 + 1) (= x tanh(softplus(x))).

    One exp instead of exp + log1p + tanh, one temporary, no clamp (e^x = inf gives exactly x)."""
    r = torch.exp(x).add_(1.0).square_().add_(1.0).reciprocal_()
    return x.addcmul_(x, r, value=-2.0)


# -- LayerNorm + Mish ----------------------------------------------------------------------------
# a plain global, not a ContextVar: torch.compile (dynamo) traces reads of a global and guards on it
_member_kernels = False


@contextlib.contextmanager
def member_kernels(enabled: bool = True):
    """Within: the reference modules' LayerNorm + Mish (`layer_ln_mish`) runs float32 CPU tensors
    through the native fused kernel, which also serves torch.func transforms (the population
    executor's vmap over members becomes one kernel call with the members as heads). Outside,
    and for other tensors, the reference torch ops run."""
    global _member_kernels
    before, _member_kernels = _member_kernels, bool(enabled) and native.available()
    try:
        yield
    finally:
        _member_kernels = before


def layer_ln_mish(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The reference modules' Mish(LayerNorm(x) * gamma + beta) over the last dim: gamma, beta (D,)
    (NormedLinear, torch's affine LayerNorm) or (H, D), one affine per head of x (H, N, D)
    (EnsembleLinear). Inside `member_kernels()` the native fused kernel (~1e-6 from these ops)."""
    if _member_kernels and x.is_cpu and x.dtype is torch.float32:
        return native.member_layer_norm_act(x, gamma, beta, eps)
    if gamma.dim() == 1:
        return mish(F.layer_norm(x, (x.shape[-1],), gamma, beta, eps))
    return mish(F.layer_norm(x, (x.shape[-1],), eps=eps) * gamma.unsqueeze(1) + beta.unsqueeze(1))


_native_training = True


def use_native_kernels(enabled: bool = True) -> bool:
    """Process-wide switch for the native fused LayerNorm + Mish (forward and backward) in `ln_mish`;
    returns whether it is in use (False where the kernels cannot be built)."""
    global _native_training
    _native_training = bool(enabled) and native.available()
    return _native_training


def native_training() -> bool:
    """Whether `ln_mish` runs the native kernels where the tensors allow (float32 on CPU): switched
    on (`use_native_kernels`) and built."""
    return _native_training and native.available()


def ln_mish(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5, *,
            dropped: torch.Tensor | None = None, p: float = 0.0, transpose_heads: bool = False) -> torch.Tensor:
    """Differentiable Mish(LayerNorm(dropout(x)) * gamma + beta) over the last dim.

    gamma, beta: (D,) for one LayerNorm, or (H, D): one affine per head h of x (H, N, D), or of x
    (N, H, D) with `transpose_heads` (output (H, N, D) either way). dropped: flat positions of x
    zeroed by dropout with rate p (kept units scaled by 1 / (1 - p)), or None; the native path zeroes
    them in x itself, so x must then be a temporary nothing else reads. Native fused kernel where
    enabled (`use_native_kernels`) and the tensors allow, else torch's LayerNorm + `mish_train`."""
    scale = 1.0 / (1.0 - p) if dropped is not None else 1.0
    if _native_training:
        if native.usable(gamma, beta) and x.dtype is torch.float32 and x.is_cpu:
            return native.layer_norm_act(x, gamma, beta, eps, native.MISH, scale, transpose_heads, dropped)
        fallback("fused LayerNorm + Mish (training) -> torch ops", _native_reason(x, gamma, beta))
    if dropped is not None:  # out of place: an in-place fill on a view costs autograd several copies
        x = x.reshape(-1).index_fill(0, dropped, 0.0).view(x.shape) * scale
    if gamma.dim() == 1:
        return mish_train(F.layer_norm(x, (x.shape[-1],), gamma, beta, eps))
    if transpose_heads:
        x = x.transpose(0, 1)
    shape = (gamma.shape[0],) + (1,) * (x.dim() - 2) + (gamma.shape[1],)
    return mish_train(torch.addcmul(beta.view(shape), F.layer_norm(x, (x.shape[-1],), eps=eps), gamma.view(shape)))


def ln_mish_(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, const: torch.Tensor | None = None,
             eps: float = 1e-5) -> torch.Tensor:
    """Inference: Mish(LayerNorm(x + const) * gamma + beta), x (N, D) a linear output (overwritten);
    const (n, D): row i of x gets const[i // (N / n)] (per-environment constants), or None."""
    if native.usable(x, gamma, beta, *(() if const is None else (const,))):
        return native.ln_act(x, gamma, beta, eps, add=const, out=x)
    fallback("fused LayerNorm + Mish (planning) -> torch ops",
             _native_reason(x, gamma, beta, *(() if const is None else (const,))))
    if const is not None:
        x.view(const.shape[0], -1, x.shape[-1]).add_(const.unsqueeze(1))
    return mish_(F.layer_norm(x, (x.shape[-1],), gamma, beta, eps))


# -- SimNorm -------------------------------------------------------------------------------------
def simnorm(x: torch.Tensor, group: int) -> torch.Tensor:
    """Softmax within consecutive groups of `group` features of the last dim.

    Computed with the groups laid across the fast axis, (..., group, n_groups): torch's softmax
    over a tiny innermost dim (8) is ~5x slower than over a strided dim of the same size."""
    shape = x.shape
    across = x.reshape(-1, shape[-1] // group, group).transpose(1, 2).contiguous()
    return F.softmax(across, dim=1).transpose(1, 2).reshape(shape)


def ln_simnorm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, group: int, eps: float = 1e-5) -> torch.Tensor:
    """Differentiable SimNorm(LayerNorm(x) * gamma + beta) over the last dim."""
    return simnorm(F.layer_norm(x, (x.shape[-1],), gamma, beta, eps), group)


def ln_simnorm_(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, group: int, eps: float = 1e-5) -> torch.Tensor:
    """Inference: `ln_simnorm` of x (N, D), in the native kernel (x overwritten) where it can run."""
    if native.usable(x, gamma, beta):
        return native.ln_simnorm_(x, gamma, beta, group, eps)
    fallback("fused LayerNorm + SimNorm (planning) -> torch ops", _native_reason(x, gamma, beta))
    return ln_simnorm(x, gamma, beta, group, eps)


# -- two-hot decode ------------------------------------------------------------------------------
def decode(logits: torch.Tensor, vmin: float, vmax: float, bins: int) -> torch.Tensor:
    """Inference: two-hot logits (N, >= bins; extra columns are padding) -> values (N, 1), as
    `agent.math.two_hot_inv` over the first `bins` columns (the native kernel where it can run)."""
    if native.usable(logits):
        return native.two_hot_decode(logits, vmin, vmax, bins)
    fallback("fused two-hot decode (planning) -> agent.math.two_hot_inv", _native_reason(logits))
    return two_hot_inv(logits[..., :bins], vmin, vmax)


# -- policy head ---------------------------------------------------------------------------------
def policy_log_std(raw: torch.Tensor, log_std_min: float, log_std_max: float) -> torch.Tensor:
    """The policy's log std from its raw output: squashed by tanh into [log_std_min, log_std_max]."""
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (torch.tanh(raw) + 1)


def squashed_gaussian(out: torch.Tensor, eps: torch.Tensor | None, mask: torch.Tensor | None, log_std_min: float,
                      log_std_max: float, log_prob: bool = True):
    """The policy prior's squashed Gaussian from its output layer `out` (..., 2A) = [mean, log std raw].

    eps: standard normal noise (..., A) (drawn if None); mask (..., A): the task's action dims
    (multi-task models; mean, log std and noise are zeroed beyond them) or None. Returns (action,
    info): action = tanh(mean + eps * exp(log_std)); info['mean'] = tanh(mean) (masked),
    info['log_std'] (masked), info['mean_raw'], info['eps'], and unless `log_prob` is False
    info['log_prob'], info['entropy'] = -log_prob and info['scaled_entropy'] (..., 1) (the upstream
    log-prob: Gaussian log-density of eps per dim, minus the tanh correction; the scaled entropy
    multiplies by action_dims * gaussian / log_prob)."""
    mean_raw, log_std_raw = out.chunk(2, dim=-1)
    log_std = policy_log_std(log_std_raw, log_std_min, log_std_max)
    if eps is None:
        eps = torch.randn_like(mean_raw)
    if mask is not None:
        mean_raw, log_std, eps = mean_raw * mask, log_std * mask, eps * mask
    action = torch.tanh(mean_raw + eps * log_std.exp())
    info = {"mean": torch.tanh(mean_raw), "log_std": log_std, "mean_raw": mean_raw, "eps": eps}
    if not log_prob:
        return action, info
    action_dims = mask.sum(-1, keepdim=True) if mask is not None else torch.tensor(float(mean_raw.shape[-1]))
    gaussian_lp = (-0.5 * eps.pow(2) - log_std - HALF_LOG_2PI).sum(-1, keepdim=True)
    lp = gaussian_lp - torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
    entropy_scale = gaussian_lp * action_dims / (lp + 1e-8)
    info.update(log_prob=lp, entropy=-lp, scaled_entropy=-lp * entropy_scale)
    return action, info


# -- Q-pair draw ---------------------------------------------------------------------------------
def q_pair(num_q: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two distinct Q-head indices (2,) int64, uniformly drawn (the first two of a random
    permutation). With `generator` (a CPU stream) the draw is made on CPU and moved to `device`;
    without, from torch's global stream of `device`."""
    if generator is not None:
        heads = torch.randperm(num_q, generator=generator)[:2]
        return heads if device is None else heads.to(device)
    return torch.randperm(num_q, device=device)[:2]


def reduce_pair(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """values (2, ...) of the drawn heads -> their min ('min') or mean ('avg')."""
    if reduce == "min":
        return values.min(0).values
    if reduce == "avg":
        return values.mean(0)
    raise ValueError(f"reduce must be 'min' or 'avg', got {reduce!r}")
