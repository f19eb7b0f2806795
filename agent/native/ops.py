"""Python faces of the element-wise kernels: LayerNorm + activation (forward, and differentiable
through `LayerNormAct`), LayerNorm + SimNorm in place, and the two-hot decode. Each checks its
tensors (contiguous float32 CPU) and calls the library by argument name."""
from __future__ import annotations

import torch

from agent import native
from agent.native import _fits, _threads  # defined before this module is imported

MISH, NO_ACT = 1, 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not _fits(t):
            raise ValueError("native kernels take contiguous float32 CPU tensors")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _layout(x: torch.Tensor, heads: int, transpose_heads: bool) -> tuple[int, int, int, int]:
    """(rows per head, width, row stride, head stride) of x in elements."""
    width = x.shape[-1]
    rows = x.numel() // (width * heads)
    if heads == 1:
        return rows, width, width, 0
    if transpose_heads:      # (rows, heads, width)
        return rows, width, heads * width, width
    return rows, width, width, rows * width  # (heads, rows, width)


def ln_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5, act: int = MISH,
           add: torch.Tensor | None = None, out: torch.Tensor | None = None,
           stats: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float = 1.0,
           transpose_heads: bool = False) -> torch.Tensor:
    """act(LayerNorm(scale * (x + add)) * gamma + beta) over the last dim, no autograd.

    gamma, beta: (D,) for one LayerNorm, or (H, D) for H heads, each with its own affine; then x
    is (H, ..., D) (out likewise) or, with `transpose_heads`, (..., H, D) and out (H, ..., D).
    add: (N / k, D), row i of x (N, D) gets add[i // k] (per-environment constants), or None
    (one head only); out: destination, may be x itself unless transposing (default: new tensor);
    stats: (mean, rstd) buffers (x.numel() / D,) receiving the row statistics, head-major.
    act: MISH or NO_ACT. Large inputs are split over torch.get_num_threads() threads."""
    heads = gamma.shape[0] if gamma.dim() == 2 else 1
    rows, width, x_rs, x_hs = _layout(x, heads, transpose_heads)
    if out is None:
        out = torch.empty((heads, *x.shape[:-2], width) if transpose_heads else x.shape)
    _, _, o_rs, o_hs = _layout(out, heads, False)
    add_every = 1
    if add is not None:
        add_rows = add.numel() // width
        if heads != 1 or add_rows == 0 or rows % add_rows:
            raise ValueError(f"add has {add_rows} rows, which does not divide x's {rows} (or x has several heads)")
        add_every = rows // add_rows
    if transpose_heads and out.data_ptr() == x.data_ptr():
        raise ValueError("a transposing ln_act cannot write in place")
    mean, rstd = stats if stats is not None else (None, None)
    _check(x, out, add, gamma, beta, mean, rstd)
    native._library().ln_act_forward(
        x=_ptr(x), out=_ptr(out), rows=rows, heads=heads, width=width, x_row_stride=x_rs, x_head_stride=x_hs,
        out_row_stride=o_rs, out_head_stride=o_hs, add=_ptr(add), add_every=add_every, gamma=_ptr(gamma),
        beta=_ptr(beta), scale=float(scale), eps=float(eps), act=int(act), mean_out=_ptr(mean), rstd_out=_ptr(rstd),
        threads=_threads(heads * rows, width))
    return out


def ln_simnorm_(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, group: int, eps: float = 1e-5) -> torch.Tensor:
    """In place: SimNorm(LayerNorm(x) * gamma + beta) with simplex groups of `group`; x: (N, D)."""
    width = x.shape[-1]
    if width % group:
        raise ValueError(f"width {width} is not a multiple of the SimNorm group {group}")
    _check(x, gamma, beta)
    native._library().ln_simnorm(x=_ptr(x), rows=x.numel() // width, width=width, gamma=_ptr(gamma), beta=_ptr(beta),
                                 eps=float(eps), group=int(group))
    return x


def two_hot_decode(logits: torch.Tensor, vmin: float, vmax: float, bins: int | None = None) -> torch.Tensor:
    """logits (N, width) -> (N, 1) symexp of the expected bin centre (= agent.math.two_hot_inv) over
    the first `bins` columns (default: all; more columns are padding for a faster GEMM)."""
    _check(logits)
    width = logits.shape[-1]
    bins = width if bins is None else bins
    if not 1 < bins <= width:
        raise ValueError(f"bins must be in (1, {width}], got {bins}")
    rows = logits.numel() // width
    out = torch.empty(rows, 1)
    native._library().two_hot_decode(logits=_ptr(logits), stride=width, out=_ptr(out), rows=rows, bins=bins,
                                     vmin=float(vmin), vmax=float(vmax))
    return out


class LayerNormAct(torch.autograd.Function):
    """act(LayerNorm(scale * x) * gamma + beta) with a fused forward and backward (training); gamma
    (D,) or (H, D) per head, layouts as `ln_act`. `dropped`: flat positions of x to zero first
    (dropout; x is zeroed there in place, so it must be a temporary). Saves x and the row
    statistics, recomputes the rest in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, act: int, scale: float,
                transpose_heads: bool, dropped: torch.Tensor | None) -> torch.Tensor:
        x, gamma, beta = _contiguous(x), _contiguous(gamma), _contiguous(beta)
        if dropped is not None:
            x.view(-1).index_fill_(0, dropped, 0.0)
        items = x.numel() // x.shape[-1]
        mean, rstd = torch.empty(items), torch.empty(items)
        out = ln_act(x, gamma, beta, eps, act, stats=(mean, rstd), scale=scale, transpose_heads=transpose_heads)
        ctx.save_for_backward(x, gamma, beta, mean, rstd, dropped)
        ctx.act, ctx.scale, ctx.transpose_heads = act, scale, transpose_heads
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gamma, beta, mean, rstd, dropped = ctx.saved_tensors
        want_affine = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_x, grad_gamma, grad_beta = ln_act_backward(grad_out, x, gamma, beta, mean, rstd, ctx.act, ctx.scale,
                                                        ctx.transpose_heads, want_affine)
        if dropped is not None:
            grad_x.view(-1).index_fill_(0, dropped, 0.0)
        return (grad_x, grad_gamma, grad_beta) + (None,) * 5


def ln_act_backward(grad_out: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor, act: int = MISH, scale: float = 1.0,
                    transpose_heads: bool = False, want_affine: bool = True):
    """The gradients of `ln_act` (no autograd): grad_out like ln_act's output, x its input, mean /
    rstd the row statistics it wrote. Returns (grad_x like x, grad_gamma, grad_beta like gamma),
    the affine gradients None unless `want_affine`."""
    grad_out = _contiguous(grad_out)
    heads = gamma.shape[0] if gamma.dim() == 2 else 1
    rows, width, x_rs, x_hs = _layout(x, heads, transpose_heads)
    _, _, g_rs, g_hs = _layout(grad_out, heads, False)
    grad_x = torch.empty_like(x)
    threads = _threads(heads * rows, width)
    # one gamma / beta accumulator per thread (threads must not add into the same rows)
    grad_affine = torch.zeros(threads, 2, *gamma.shape) if want_affine else None
    _check(grad_out, x, mean, rstd, gamma, beta)
    native._library().ln_act_backward(
        x=_ptr(x), grad_y=_ptr(grad_out), grad_x=_ptr(grad_x), rows=rows, heads=heads, width=width,
        x_row_stride=x_rs, x_head_stride=x_hs, grad_row_stride=g_rs, grad_head_stride=g_hs, mean=_ptr(mean),
        rstd=_ptr(rstd), gamma=_ptr(gamma), beta=_ptr(beta), scale=float(scale), act=act,
        grad_affine=_ptr(grad_affine), threads=threads)
    if not want_affine:
        return grad_x, None, None
    grad_gamma, grad_beta = grad_affine.sum(0) if threads > 1 else grad_affine[0]
    return grad_x, grad_gamma, grad_beta


# -- under torch.func (vmap over population members) ----------------------------------------------
def _fold_members(size: int, dims: tuple[int | None, ...], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor with its vmapped dim moved to the front (expanded to `size` where unbatched), contiguous."""
    out = []
    for t, d in zip(tensors, dims):
        t = t.unsqueeze(0).expand(size, *t.shape) if d is None else t.movedim(d, 0)
        out.append(_contiguous(t))
    return out


class MemberLayerNormAct(torch.autograd.Function):
    """act(LayerNorm(x) * gamma + beta) over the last dim, differentiable and vmappable (torch.func):
    under vmap over K members, x (K, ..., D) with gamma (K, D), or x (K, H, N, D) with per-head
    gamma (K, H, D), runs as one call of the per-head kernel with K (or K * H) heads. Forward and
    backward are `ln_act` and `ln_act_backward`. Returns (out, mean, rstd); the row statistics are
    not differentiable."""

    @staticmethod
    def forward(x, gamma, beta, eps, act):
        x, gamma, beta = _contiguous(x), _contiguous(gamma), _contiguous(beta)
        items = x.numel() // x.shape[-1]
        mean, rstd = torch.empty(items), torch.empty(items)
        out = ln_act(x, gamma, beta, eps, act, stats=(mean, rstd))
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gamma, beta, _, act = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, gamma, beta, mean, rstd)
        ctx.act = act

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, gamma, beta, mean, rstd = ctx.saved_tensors
        grad_x, grad_gamma, grad_beta = _MemberLayerNormActGrad.apply(grad_out, x, gamma, beta, mean, rstd, ctx.act)
        return grad_x, grad_gamma, grad_beta, None, None

    @staticmethod
    def vmap(info, in_dims, x, gamma, beta, eps, act):
        x, gamma, beta = _fold_members(info.batch_size, in_dims[:3], x, gamma, beta)
        shape = x.shape
        x, gamma, beta = _as_heads(x, gamma), gamma.reshape(-1, gamma.shape[-1]), beta.reshape(-1, beta.shape[-1])
        out, mean, rstd = MemberLayerNormAct.apply(x, gamma, beta, eps, act)
        k = info.batch_size
        return (out.view(shape), mean.view(k, -1), rstd.view(k, -1)), (0, 0, 0)


def _as_heads(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x (K, ..., D) with gamma (K, D) -> (K, rows, D); with gamma (K, H, D): x (K, H, N, D) -> (K * H, N, D)."""
    if gamma.dim() == 2:
        return x.view(x.shape[0], -1, x.shape[-1])
    return x.view(x.shape[0] * x.shape[1], -1, x.shape[-1])


class _MemberLayerNormActGrad(torch.autograd.Function):
    """MemberLayerNormAct's backward as a vmappable function (once differentiable)."""

    @staticmethod
    def forward(grad_out, x, gamma, beta, mean, rstd, act):
        return ln_act_backward(grad_out, _contiguous(x), _contiguous(gamma), _contiguous(beta), _contiguous(mean),
                               _contiguous(rstd), act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the fused LayerNorm + activation is differentiable once (no double backward)")

    @staticmethod
    def vmap(info, in_dims, grad_out, x, gamma, beta, mean, rstd, act):
        grad_out, x, gamma, beta, mean, rstd = _fold_members(info.batch_size, in_dims[:6], grad_out, x, gamma, beta,
                                                             mean, rstd)
        shape, affine_shape = x.shape, gamma.shape
        gamma2, beta2 = gamma.reshape(-1, gamma.shape[-1]), beta.reshape(-1, beta.shape[-1])
        grad_x, grad_gamma, grad_beta = _MemberLayerNormActGrad.apply(
            _as_heads(grad_out, gamma), _as_heads(x, gamma), gamma2, beta2, mean.reshape(-1), rstd.reshape(-1), act)
        return (grad_x.view(shape), grad_gamma.view(affine_shape), grad_beta.view(affine_shape)), (0, 0, 0)


def member_layer_norm_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
                          act: int = MISH) -> torch.Tensor:
    """Differentiable act(LayerNorm(x) * gamma + beta) through the fused kernels that also runs under
    torch.func (grad, vmap over population members; see MemberLayerNormAct). gamma / beta (D,), or
    (H, D) per head of x (H, N, D)."""
    return MemberLayerNormAct.apply(x, gamma, beta, eps, act)[0]


def layer_norm_act(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
                   act: int = MISH, scale: float = 1.0, transpose_heads: bool = False,
                   dropped: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable act(LayerNorm(scale * x) * gamma + beta) over the last dim through the fused
    kernels; gamma / beta (D,) or (H, D) for H heads (layouts as `ln_act`); dropped: flat positions
    of x zeroed first, in place (see LayerNormAct)."""
    return LayerNormAct.apply(x, gamma, beta, eps, act, scale, transpose_heads, dropped)
