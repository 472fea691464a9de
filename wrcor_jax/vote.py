"""Hard and soft votes over several proxies (SPEC section 5).

A score matrix has one row per architecture and one column per proxy. `signs` (+1 or -1 per
proxy; default all +1, which is right for every proxy in `wrcor_jax.proxies`) turn each
column into higher-is-better before anything is compared.

NaN ranks below every value, -inf included, and two NaNs tie: a proxy that failed on an
architecture never makes it win, and never lets it draw level with a finite score.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["hard_vote_compare", "hard_vote_ranks", "soft_vote", "zscores"]


def _adjusted(scores: ArrayLike, signs: Sequence[float] | None) -> np.ndarray:
    """Scores as float64 with each proxy's sign applied (last axis = proxies)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError("scores need a proxy axis")
    if signs is None:
        return values
    signs = np.asarray(signs, dtype=np.float64)
    if signs.shape != values.shape[-1:] or not np.all(np.abs(signs) == 1):
        raise ValueError(f"signs must be {values.shape[-1]} values of +1 or -1, got {signs}")
    return values * signs


def _above(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per proxy, whether a ranks strictly above b (NaN lowest)."""
    return (a > b) | (np.isnan(b) & ~np.isnan(a))


def hard_vote_compare(
    a_scores: ArrayLike, b_scores: ArrayLike, signs: Sequence[float] | None = None
) -> int:
    """+1 when more than half of the proxies rank a above b, -1 when more than half rank it
    below, 0 otherwise (the paper's pairwise majority)."""
    a, b = _adjusted(a_scores, signs), _adjusted(b_scores, signs)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"two score vectors of one length expected, got {a.shape}, {b.shape}")
    half = a.size / 2
    if _above(a, b).sum() > half:
        return 1
    if _above(b, a).sum() > half:
        return -1
    return 0


def hard_vote_ranks(score_matrix: ArrayLike, signs: Sequence[float] | None = None) -> np.ndarray:
    """Each architecture's position in the ascending hard-vote order (higher is better).

    The pairwise majority is not transitive, so the order is whatever a stable sort with
    that comparison produces, as in the paper; ties keep the input order.
    """
    matrix = _adjusted(score_matrix, signs)
    if matrix.ndim != 2:
        raise ValueError(f"score matrix must be (architectures, proxies), got {matrix.shape}")
    order = sorted(
        range(len(matrix)),
        key=functools.cmp_to_key(lambda i, j: hard_vote_compare(matrix[i], matrix[j])),
    )
    ranks = np.empty(len(matrix), dtype=np.int64)
    ranks[order] = np.arange(len(matrix))
    return ranks


def zscores(
    score_matrix: ArrayLike,
    signs: Sequence[float] | None = None,
    reference: ArrayLike | None = None,
) -> np.ndarray:
    """Sign-adjusted z-scores per proxy, with the mean and (population) std of the finite
    values of `reference` (default: the matrix itself).

    Non-finite scores stay non-finite (-inf stays -inf). A proxy whose reference has no
    spread (fewer than two distinct finite values) carries no scale: its finite scores get 0.
    """
    values = _adjusted(score_matrix, signs)
    ref = values if reference is None else _adjusted(reference, signs)
    if values.ndim != 2 or ref.ndim != 2 or ref.shape[1] != values.shape[1]:
        raise ValueError(f"score matrices of one proxy count expected: {values.shape}, {ref.shape}")
    finite = np.isfinite(ref)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, ref, 0.0).sum(axis=0) / count
        std = np.sqrt(np.where(finite, (ref - mean) ** 2, 0.0).sum(axis=0) / count)
        z = (values - mean) / std
    flat = ~(std > 0)
    z[:, flat] = np.where(np.isfinite(values[:, flat]), 0.0, values[:, flat])
    return z


def soft_vote(
    score_matrix: ArrayLike,
    signs: Sequence[float] | None = None,
    reference: ArrayLike | None = None,
) -> np.ndarray:
    """Mean over proxies of the finite z-scores (see `zscores`); NaN where none is finite."""
    z = zscores(score_matrix, signs, reference)
    finite = np.isfinite(z)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, z, 0.0).sum(axis=1) / finite.sum(axis=1)
