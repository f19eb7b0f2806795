"""The paper's own numbers, quoted beside ours where the setting matches.

Source: Kuzmenko & Shvai, "TD-MPC-Opt: Distilling Model-Based Multi-Task Reinforcement Learning
Agents", arXiv 2507.01823 (2025). Normalized MT30 score (mean over the 30 tasks of return / 10) of
a 1M-parameter student, distilled from the 317M TD-MPC2 teacher. Their best distilled student
(reported as d_coef ≈ 0.4, published as `mt30_1M_steps_045dist`) is filed under d_coef 0.45.
"""
from __future__ import annotations

import math

from analysis.values import same_value

PAPER_LABEL = "paper (MT30, 1M)"
PAPER_CITATION = "Kuzmenko & Shvai (2025), TD-MPC-Opt, arXiv 2507.01823"

# config key -> swept value -> the paper's normalized score for that setting.
PAPER_SCORES: dict[str, dict[object, float]] = {
    "d_coef": {0.0: 18.93, 0.45: 28.12, 0.9: 13.79},
    "batch_size": {256: 17.85, 1024: 14.04},
    "target": {"latent_linear": 7.69, "latent_pca": 8.78},
    "quant": {"fp32": 28.12, "fp16": 28.45, "int8_naive": 5.09, "mixed": 13.53},
}

# The other settings a paper number was measured at: the quantized models are their d_coef 0.45 student.
PAPER_CONTEXT: dict[str, dict[str, object]] = {
    "quant": {"d_coef": 0.45},
}


def paper_score(key: str, value: object, setting: dict[str, object]) -> float:
    """The paper's score for `key == value`, or NaN when the paper has none for this setting.

    `setting` holds the row's other config values; a number with a PAPER_CONTEXT is quoted only
    when the row was run at that context (e.g. quantization rows of a d_coef 0.45 student).
    """
    for paper_value, score in PAPER_SCORES.get(key, {}).items():
        if same_value(paper_value, value):
            context = PAPER_CONTEXT.get(key, {})
            if all(same_value(setting.get(k), v) for k, v in context.items()):
                return score
    return math.nan
