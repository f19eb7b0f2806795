"""The paper's ablations as named grids of trial overrides (crossed with seeds by the runner)."""
from __future__ import annotations

from typing import Any

from agent.config import DISTILL_TARGETS, QUANT_MODES
from agent.errors import ConfigError
from sweeps.config import TrialConfig

PAPER_STEPS = (200_000, 337_000, 1_000_000)
D_COEFS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.45, 0.6, 0.9)
BATCH_SIZES = (128, 256, 512, 1024)
GRID_NAMES = ("d_coef", "batch_size", "steps", "teacher_size", "target", "quant", "paper")


def SCRATCH(ablation: str) -> dict[str, Any]:  # noqa: N802 (a constant of one parameter)
    return dict(ablation=ablation, d_coef=0.0)


def _steps_values(base: TrialConfig) -> list[int]:
    if base.preset == "paper":
        return list(PAPER_STEPS)
    # the paper's 200k : 337k : 1M budget ratios, scaled to the preset's step budget
    return sorted({max(1, round(base.steps * s / PAPER_STEPS[-1])) for s in PAPER_STEPS})


def grid_points(name: str, base: TrialConfig, teacher_sizes: list[str]) -> list[dict[str, Any]]:
    """Override dicts (each with its `ablation` label) for the named grid."""
    if name == "d_coef":
        return [dict(ablation="d_coef", d_coef=v) for v in D_COEFS]
    if name == "batch_size":
        return [dict(ablation="batch_size", batch_size=v) for v in BATCH_SIZES]
    if name == "steps":
        return [dict(ablation="steps", steps=v, eval_every=min(base.eval_every, v)) for v in _steps_values(base)]
    # teacher_size and target: plus the scratch student (d_coef 0, no teacher), the partner of
    # every setting's paired difference in the report
    if name == "teacher_size":
        return [dict(ablation="teacher_size", teacher_size=s) for s in teacher_sizes] + [SCRATCH("teacher_size")]
    if name == "target":
        return [dict(ablation="target", target=t) for t in DISTILL_TARGETS] + [SCRATCH("target")]
    if name == "quant":  # one training run per seed, every precision evaluated at the end
        return [dict(ablation="quant", quant_modes=list(QUANT_MODES))]
    if name == "paper":
        points = [SCRATCH("d_coef")]  # the scratch baseline, once
        for sub in ("d_coef", "batch_size", "steps", "teacher_size", "target", "quant"):
            points += [p for p in grid_points(sub, base, teacher_sizes) if p.get("d_coef") != 0.0]
        return points
    raise ConfigError(f"unknown grid {name!r}; known: {', '.join(GRID_NAMES)}")


def swept_keys(name: str) -> list[str]:
    if name == "paper":
        return ["d_coef", "batch_size", "steps", "teacher_size", "target", "quant"]
    return [name, "d_coef"] if name in ("teacher_size", "target") else [name]
