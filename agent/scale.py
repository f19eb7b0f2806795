"""RunningScale: the policy loss's running estimate of the Q-value range (official TD-MPC2)."""
from __future__ import annotations

import torch


class RunningScale:
    """value <- lerp(value, max(1, P95(x) - P5(x)), tau); starts at 1. Percentiles are linear
    interpolations between sorted samples along dim 0 (the official formula)."""

    def __init__(self, tau: float = 0.01, percentiles: tuple[float, float] = (5.0, 95.0)):
        self.tau = tau
        self.percentiles = torch.tensor(percentiles, dtype=torch.float32)
        self.value = torch.ones(1, dtype=torch.float32)

    def _percentile(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ...) -> (2, ...) values at the two percentiles over dim 0."""
        flat = x.flatten(1)
        ordered = torch.sort(flat, dim=0).values
        n = flat.shape[0]
        positions = self.percentiles.to(x.device) * (n - 1) / 100
        lower = torch.floor(positions)
        upper = torch.clamp(lower + 1, max=n - 1)
        w_upper = (positions - lower).unsqueeze(1)
        out = ordered[lower.long()] * (1.0 - w_upper) + ordered[upper.long()] * w_upper
        return out.reshape(-1, *x.shape[1:]).to(x.dtype)

    def advanced(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The value after one update with samples x (N, ...), without touching `self`: a pure
        function of (value, x), so population executors can run it under torch.func.vmap."""
        low, high = self._percentile(x.detach())
        return torch.lerp(value.to(x), torch.clamp(high - low, min=1.0), self.tau)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        self.value = self.advanced(self.value, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"value": self.value.clone(), "percentiles": self.percentiles.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = state["value"].clone().float()
        self.percentiles = state["percentiles"].clone().float()
