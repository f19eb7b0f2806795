"""MT-mini, the embedded benchmark: a few fast-learning MT30 tasks with two shipped teachers and
their distillation data, runnable on a laptop with no official files (library in
`agent.mt_mini.benchmark`, recipe in `agent.mt_mini.recipe`, CLI `python -m agent.mt_mini`).

    from agent.mt_mini import mt_mini_tasks, teacher_path, ensure_dataset, QUICK_DEFAULTS
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "QUICK_DEFAULTS", "MiniBenchmarkError", "ensure_dataset", "evaluate_mt_mini", "manifest", "mt_mini_tasks",
    "student_config", "teacher_path", "verify_step",
]


def __getattr__(name: str) -> Any:
    # lazy, so `python -m agent.mt_mini` does not import the module twice
    if name in __all__:
        from agent.mt_mini import benchmark as mt_mini
        return getattr(mt_mini, name)
    raise AttributeError(f"module 'agent.mt_mini' has no attribute {name!r}")
