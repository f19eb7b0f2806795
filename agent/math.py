"""Scalar transforms and the two-hot distributional regression used by TD-MPC2.

Values are regressed as 101-bin two-hot distributions over symlog(x) in [vmin, vmax].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# log(1 + |x|) and exp(|x|) - 1 rather than log1p/expm1: the official float32 rounding.
def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log(1 + x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * (torch.exp(x.abs()) - 1)


def bins(num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.linspace(vmin, vmax, num_bins, device=device, dtype=dtype)


def two_hot(x: torch.Tensor, num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0) -> torch.Tensor:
    """x: (N, 1) scalars -> (N, num_bins) two-hot weights over symlog bins."""
    bin_size = (vmax - vmin) / (num_bins - 1)
    s = symlog(x).clamp(vmin, vmax).squeeze(-1)
    pos = (s - vmin) / bin_size
    idx = torch.floor(pos)
    frac = (pos - idx).unsqueeze(-1)
    idx = idx.long().unsqueeze(-1)
    # out-of-place scatters: the population executor runs this under torch.func.vmap
    out = torch.zeros(*s.shape, num_bins, device=x.device, dtype=x.dtype)
    return out.scatter(-1, idx, 1 - frac).scatter_add(-1, (idx + 1) % num_bins, frac)


def two_hot_inv(logits: torch.Tensor, vmin: float = -10.0, vmax: float = 10.0) -> torch.Tensor:
    """logits: (..., num_bins) -> (..., 1) expected value in real space."""
    centers = bins(logits.shape[-1], vmin, vmax, logits.device, logits.dtype)
    return symexp(F.softmax(logits, dim=-1) @ centers).unsqueeze(-1)


def soft_ce(pred_logits: torch.Tensor, target: torch.Tensor, vmin: float = -10.0, vmax: float = 10.0) -> torch.Tensor:
    """pred_logits: (N, num_bins), target: (N, 1) scalars -> (N, 1) cross-entropy with two_hot(target)."""
    log_probs = F.log_softmax(pred_logits, dim=-1)
    target_dist = two_hot(target, pred_logits.shape[-1], vmin, vmax)
    return -(target_dist * log_probs).sum(-1, keepdim=True)
