"""Statistics over seeds and tasks: bootstrap confidence intervals, paired differences and the interquartile mean."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # fixed, so the same scores always give the same interval
# Percentile rather than scipy's default BCa: with 3-5 seeds BCa's jackknife acceleration is noisy
# and with ties it shifts the interval off the data; percentile is what rliable uses.
BOOTSTRAP_METHOD = "percentile"
# scipy >= 1.15 takes `rng`; older releases (requirements allow 1.13) only `random_state`.
_RNG_ARG = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


def bootstrap_ci(values, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `values` (one per seed); (NaN, NaN) with fewer than 2.

    NaNs are dropped first. Note that with 5 seeds a nominal 95% interval covers the true mean
    only about 84% of the time (tests/test_analysis.py measures it): few seeds, narrow intervals.
    """
    sample = _finite(values)
    if sample.size < 2:
        return math.nan, math.nan
    result = scipy.stats.bootstrap((sample,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                   method=BOOTSTRAP_METHOD, vectorized=True,
                                   **{_RNG_ARG: np.random.default_rng(seed)})
    low, high = result.confidence_interval
    return float(low), float(high)


def column_bootstrap_ci(matrix) -> tuple[np.ndarray, np.ndarray]:
    """`bootstrap_ci` of each column of a (seeds × points) matrix, NaN = missing.

    Complete columns share one vectorised scipy call, which gives each the same interval as
    `bootstrap_ci` would alone (same seed, same resampled indices); the others go one by one.
    """
    matrix = np.asarray(matrix, dtype=float)
    lows, highs = np.full(matrix.shape[1], math.nan), np.full(matrix.shape[1], math.nan)
    complete = np.isfinite(matrix).all(axis=0)
    if matrix.shape[0] >= 2 and complete.any():
        result = scipy.stats.bootstrap((matrix[:, complete],), np.mean, axis=0, n_resamples=N_RESAMPLES,
                                       confidence_level=CONFIDENCE, method=BOOTSTRAP_METHOD, vectorized=True,
                                       **{_RNG_ARG: np.random.default_rng(BOOTSTRAP_SEED)})
        lows[complete], highs[complete] = result.confidence_interval
    for column in np.flatnonzero(~complete):
        lows[column], highs[column] = bootstrap_ci(matrix[:, column])
    return lows, highs


@dataclass(frozen=True)
class PairedDifference:
    """Mean over paired seeds of (score - baseline score), its `bootstrap_ci`, and the number of pairs."""

    mean: float  # NaN without pairs
    ci_low: float  # NaN below 2 pairs
    ci_high: float
    n_pairs: int

    def excludes_zero(self) -> bool:
        """True when the CI is known and lies entirely above or entirely below 0."""
        return self.ci_low > 0 or self.ci_high < 0  # False for NaN bounds


def paired_difference(scores: pd.Series, baseline: pd.Series) -> PairedDifference:
    """`scores - baseline` paired by index label (the seed): only labels with a finite value in both
    count. `scores`, `baseline`: one value per seed, unique index. The CI is `bootstrap_ci` of the
    per-seed differences (resampling pairs, so what the seeds share cancels)."""
    differences = scores.sub(baseline).to_numpy(dtype=float)  # aligned on the union of labels: NaN if unpaired
    differences = differences[np.isfinite(differences)]
    mean = float(differences.mean()) if differences.size else math.nan
    return PairedDifference(mean, *bootstrap_ci(differences), n_pairs=int(differences.size))


def paired_ratio_ci(scores: pd.Series, baseline: pd.Series) -> tuple[float, float]:
    """Percentile-bootstrap CI of mean(scores) / mean(baseline) over the labels (seeds) with a
    finite value in both, resampling pairs; (NaN, NaN) below 2 pairs or where a baseline value is
    not positive (a resample's denominator could be 0)."""
    both = pd.concat([scores.rename("a"), baseline.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 2 or not (both["b"] > 0).all():
        return math.nan, math.nan
    result = scipy.stats.bootstrap((both["a"].to_numpy(float), both["b"].to_numpy(float)),
                                   lambda a, b, axis=-1: a.mean(axis=axis) / b.mean(axis=axis), paired=True,
                                   n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, method=BOOTSTRAP_METHOD,
                                   vectorized=True, **{_RNG_ARG: np.random.default_rng(BOOTSTRAP_SEED)})
    low, high = result.confidence_interval
    return float(low), float(high)


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% of all finite values (e.g. tasks × seeds)."""
    sample = _finite(values)
    return float(scipy.stats.trim_mean(sample, 0.25)) if sample.size else math.nan


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[np.isfinite(array)]
