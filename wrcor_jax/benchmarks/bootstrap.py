"""Percentile-bootstrap confidence intervals of Kendall tau-b and Spearman rho.

Architectures are resampled with replacement (seeded), and each statistic is recomputed
on every resample; the interval is the central `level` of those values. A score column is
judged on one sample of architectures, so its correlation is an estimate: the interval says
how far another sample of the same size could move it.

Spearman is vectorised over resamples: values are coded once by their rank among the
distinct values, so a resample's tie-averaged ranks come from per-code counts (one
`bincount` for a block of resamples) instead of a sort. Kendall tau-b needs an O(n log n)
count per resample; scipy's takes ~4 ms on 15,625 architectures, so 1,000 resamples of the
whole NAS-Bench-201 space take ~5.5 s per column on one core (measured): fast enough to keep
the full count for every set size.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

__all__ = ["bootstrap_ci"]

_BLOCK_ELEMENTS = 2_000_000  # resamples x architectures handled at once


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Each value's index among the sorted distinct values (-inf lowest), and their count."""
    distinct, codes = np.unique(values, return_inverse=True)
    return codes.ravel(), len(distinct)


def _average_ranks(codes: np.ndarray, distinct: int) -> np.ndarray:
    """Tie-averaged ranks (1-based) of each row of `codes` (resamples x n)."""
    rows = codes.shape[0]
    offsets = (np.arange(rows) * distinct)[:, None]
    counts = np.bincount((codes + offsets).ravel(), minlength=rows * distinct)
    counts = counts.reshape(rows, distinct)
    below = np.cumsum(counts, axis=1) - counts
    rank_of_code = below + (counts + 1) / 2
    return np.take_along_axis(rank_of_code, codes, axis=1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def _kendall(x_codes: np.ndarray, y_codes: np.ndarray) -> float:
    if np.all(x_codes == x_codes[0]) or np.all(y_codes == y_codes[0]):
        return math.nan
    return float(stats.kendalltau(x_codes, y_codes, variant="b").statistic)


def bootstrap_ci(
    scores: ArrayLike,
    accuracies: ArrayLike,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """`{"kendall_ci": (lo, hi), "spearman_ci": (lo, hi)}` by the percentile bootstrap.

    Pairs with a NaN are omitted first and -inf ranks lowest, as in `rank_correlations`.
    Resamples where one side is constant have no correlation and are left out; an
    interval is (NaN, NaN) when fewer than two pairs remain or no resample has one.
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(accuracies, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} scores but {y.size} accuracies")
    keep = ~(np.isnan(x) | np.isnan(y))
    n = int(keep.sum())
    nan = (math.nan, math.nan)
    if n < 2:
        return {"kendall_ci": nan, "spearman_ci": nan}
    (x_codes, x_distinct), (y_codes, y_distinct) = _codes(x[keep]), _codes(y[keep])
    rng = np.random.default_rng(seed)
    kendall, spearman = np.empty(resamples), np.empty(resamples)
    block = max(1, _BLOCK_ELEMENTS // n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for start in range(0, resamples, block):
            rows = min(block, resamples - start)
            picks = rng.integers(0, n, size=(rows, n))
            xs, ys = x_codes[picks], y_codes[picks]
            spearman[start : start + rows] = _pearson_rows(
                _average_ranks(xs, x_distinct), _average_ranks(ys, y_distinct)
            )
            for i in range(rows):
                kendall[start + i] = _kendall(xs[i], ys[i])
    tails = [50 * (1 - level), 50 * (1 + level)]

    def interval(values: np.ndarray) -> tuple[float, float]:
        values = values[~np.isnan(values)]
        if values.size == 0:
            return nan
        lo, hi = np.percentile(values, tails)
        return float(lo), float(hi)

    return {"kendall_ci": interval(kendall), "spearman_ci": interval(spearman)}
