"""Hard and soft votes over several proxies (SPEC section 5).

A score matrix has one row per architecture and one column per proxy. `signs` (+1 or -1 per
proxy; default all +1, which is right for every proxy in `wrcor_jax.proxies`) turn each
column into higher-is-better before anything is compared.

NaN ranks below every value, -inf included, and two NaNs tie: a proxy that failed on an
architecture never makes it win, and never lets it draw level with a finite score.

Votes are also score columns of `wrcor-jax score`: `parse_columns` reads a column list such as
``wrcor,vote(synflow,jacob_cov,wrcor),softvote(wrcor,act_cor)`` into the base proxies to
score and the `VoteColumn`s computed from them once every row is scored.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "VOTE_KINDS",
    "VoteColumn",
    "hard_vote_compare",
    "hard_vote_ranks",
    "parse_columns",
    "soft_vote",
    "vote_scores",
    "zscores",
]

VOTE_KINDS = ("vote", "softvote")  # hard vote (the paper's), soft vote


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
    that comparison produces, as in the paper; ties keep the input order. The comparison
    runs on per-proxy integer ranks in plain Python (NaN lowest, as in `hard_vote_compare`):
    15,625 architectures sort in well under a second instead of seconds with NumPy calls.
    """
    matrix = _adjusted(score_matrix, signs)
    if matrix.ndim != 2:
        raise ValueError(f"score matrix must be (architectures, proxies), got {matrix.shape}")
    codes = np.full(matrix.shape, -1, dtype=np.int64)  # NaN: below everything
    for column in range(matrix.shape[1]):
        values = matrix[:, column]
        known = ~np.isnan(values)
        codes[known, column] = np.unique(values[known], return_inverse=True)[1]
    rows = [tuple(row) for row in codes.tolist()]
    half = matrix.shape[1] / 2

    def compare(i: int, j: int) -> int:
        a, b = rows[i], rows[j]
        if sum(x > y for x, y in zip(a, b, strict=True)) > half:
            return 1
        if sum(x < y for x, y in zip(a, b, strict=True)) > half:
            return -1
        return 0

    order = sorted(range(len(rows)), key=functools.cmp_to_key(compare))
    ranks = np.empty(len(rows), dtype=np.int64)
    ranks[order] = np.arange(len(rows))
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


@dataclasses.dataclass(frozen=True)
class VoteColumn:
    """A score column computed from base proxies over a whole set of architectures.

    `name` is the column's literal text without spaces, e.g. ``vote(synflow,jacob_cov,wrcor)``;
    `kind` is ``vote`` (hard vote; the score is the position in the sorted order) or
    ``softvote`` (mean z-score).
    """

    name: str
    kind: str
    proxies: tuple[str, ...]
    signs: tuple[float, ...]

    def scores(self, table: ArrayLike) -> np.ndarray:
        """Vote scores of the rows of `table` (architectures x `proxies`, in that order)."""
        if self.kind == "vote":
            return hard_vote_ranks(table, self.signs).astype(np.float64)
        return soft_vote(table, self.signs)


_VOTE_ITEM = re.compile(r"(\w+)\((.*)\)")


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside parentheses; parentheses must balance and not nest."""
    items, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested parentheses in {text!r}")
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced parentheses in {text!r}")
    items.append("".join(current))
    return [item for item in items if item]


def _parse_vote(item: str, known: Collection[str], signs: Mapping[str, float]) -> VoteColumn:
    match = _VOTE_ITEM.fullmatch(item)
    if not match:
        raise ValueError(f"cannot read column {item!r}: expected a proxy name or kind(a,b,...)")
    kind, members = match[1], match[2].split(",")
    if kind not in VOTE_KINDS:
        raise ValueError(f"unknown vote {kind!r} in {item!r}; known votes: {', '.join(VOTE_KINDS)}")
    for name in members:
        if name not in known:
            raise ValueError(
                f"unknown proxy {name!r} in {item!r}; known proxies: {', '.join(known)}"
            )
    if len(set(members)) != len(members):
        raise ValueError(f"proxy listed twice in {item!r}")
    if len(members) < 2:
        raise ValueError(f"{item!r}: a vote needs at least two proxies")
    return VoteColumn(item, kind, tuple(members), tuple(signs.get(m, 1.0) for m in members))


def parse_columns(
    text: str, known: Collection[str], signs: Mapping[str, float] | None = None
) -> tuple[list[str], list[VoteColumn]]:
    """Read a column list into (base proxies to score, vote columns).

    ``"wrcor,vote(synflow,jacob_cov,wrcor)"`` -> (["wrcor", "synflow", "jacob_cov"], [vote]):
    the listed proxies in order, then those only a vote needs. Spaces are dropped, so a vote
    column is named by its text without them. `signs` gives a proxy's sign (+1: higher is
    better, the default; -1: lower is better) inside votes.
    """
    signs = dict(signs or {})
    bad = {name: sign for name, sign in signs.items() if sign not in (1, -1)}
    if bad:
        raise ValueError(f"signs must be +1 or -1, got {bad}")
    items = _split_top_level("".join(text.split()))
    if not items:
        raise ValueError("no proxy given; known proxies: " + ", ".join(known))
    if len(set(items)) != len(items):
        duplicate = next(item for item in items if items.count(item) > 1)
        raise ValueError(f"column {duplicate!r} listed twice")
    base: list[str] = []
    votes: list[VoteColumn] = []
    for item in items:
        if "(" in item or ")" in item:
            votes.append(_parse_vote(item, known, signs))
        elif item in known:
            base.append(item)
        else:
            raise ValueError(f"unknown proxy {item!r}; known proxies: {', '.join(known)}")
    base += [p for p in dict.fromkeys(p for v in votes for p in v.proxies) if p not in base]
    return base, votes


def vote_scores(
    votes: Sequence[VoteColumn], proxies: Sequence[str], table: ArrayLike
) -> dict[str, np.ndarray]:
    """Each vote column's scores from `table` (architectures x `proxies`)."""
    table = np.asarray(table, dtype=np.float64).reshape(-1, len(proxies))
    index = {name: i for i, name in enumerate(proxies)}
    missing = [p for v in votes for p in v.proxies if p not in index]
    if missing:
        raise ValueError(f"vote needs proxy {missing[0]!r}, which is not scored")
    return {v.name: v.scores(table[:, [index[p] for p in v.proxies]]) for v in votes}
