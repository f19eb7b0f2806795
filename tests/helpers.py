"""Small helpers shared by the test modules."""
from __future__ import annotations

import torch

from agent.config import model_config
from agent.world_model import WorldModel


def small_model(seed: int = 0, noise: float = 0.05, num_q: int = 3, **dims) -> WorldModel:
    """A tiny MT30 world model (enc/mlp 32/48, latent 16, task 8) with every parameter perturbed by
    `noise` * N(0, 1), so no head is left at its zero init."""
    torch.manual_seed(seed)
    model = WorldModel(model_config(None, **{**dict(enc_dim=32, mlp_dim=48, latent_dim=16, task_dim=8, num_q=num_q), **dims}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model
