"""Building blocks of the TD-MPC2 world model.

Hidden layers are Linear -> (Dropout) -> LayerNorm -> Mish. Module and parameter names follow the
official state-dict keys (`<i>.weight`, `<i>.bias`, `<i>.ln.weight`, `<i>.ln.bias`) so official
checkpoints map onto these modules without renaming (except the Q ensemble, see `EnsembleMLP`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from agent.ops import layer_ln_mish, mish, simnorm  # noqa: F401  (simnorm: the one definition, also importable from here)


class SimNorm(nn.Module):
    """Simplicial normalization: softmax within consecutive groups of `group` features."""

    def __init__(self, group: int = 8):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simnorm(x, self.group)


class NormedLinear(nn.Linear):
    """Linear -> optional Dropout -> LayerNorm -> activation (Mish by default)."""

    def __init__(self, in_features: int, out_features: int, act: nn.Module | None = None, dropout: float = 0.0):
        super().__init__(in_features, out_features)
        self.ln = nn.LayerNorm(out_features)
        self.act = act if act is not None else nn.Mish()
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        if type(self.act) is nn.Mish:
            return layer_ln_mish(x, self.ln.weight, self.ln.bias, self.ln.eps)
        return self.act(self.ln(x))


def mlp(in_dim: int, hidden: list[int], out_dim: int, act: nn.Module | None = None, dropout: float = 0.0) -> nn.Sequential:
    """NormedLinear hidden layers (dropout on the first only), then Linear, or NormedLinear(act) if `act`."""
    dims = [in_dim] + list(hidden)
    layers: list[nn.Module] = [NormedLinear(dims[i], dims[i + 1], dropout=dropout * (i == 0)) for i in range(len(hidden))]
    layers.append(NormedLinear(dims[-1], out_dim, act=act) if act is not None else nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """`num` independent Linear(+LayerNorm+Mish) layers with stacked parameters.

    weight: (num, out, in); bias, ln_weight, ln_bias: (num, out).
    Input x: (N, in) shared by all members, or (num, N, in); output (num, N, out).
    """

    def __init__(self, num: int, in_features: int, out_features: int, normed: bool = True, dropout: float = 0.0):
        super().__init__()
        self.num, self.in_features, self.out_features = num, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num, out_features))
        self.normed = normed
        if normed:
            self.ln_weight = nn.Parameter(torch.ones(num, out_features))
            self.ln_bias = nn.Parameter(torch.zeros(num, out_features))
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # shared input: one GEMM for all members
            y = (x @ self.weight.reshape(-1, self.in_features).T).view(x.shape[0], self.num, self.out_features)
            y = y.transpose(0, 1) + self.bias.unsqueeze(1)
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        if not self.normed:
            return y
        if self.dropout is not None:
            y = self.dropout(y)
        return layer_ln_mish(y, self.ln_weight, self.ln_bias)


class EnsembleMLP(nn.Module):
    """Ensemble of `num` mlp(in, hidden, out, dropout) networks evaluated in one pass; output (num, N, out)."""

    def __init__(self, num: int, in_dim: int, hidden: list[int], out_dim: int, dropout: float = 0.0):
        super().__init__()
        dims = [in_dim] + list(hidden)
        layers = [EnsembleLinear(num, dims[i], dims[i + 1], dropout=dropout * (i == 0)) for i in range(len(hidden))]
        layers.append(EnsembleLinear(num, dims[-1], out_dim, normed=False))
        self.layers = nn.ModuleList(layers)
        self.num = num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
