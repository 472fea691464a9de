"""NAS-Bench-201 ground truth and the rank correlations a proxy is judged by (SPEC section 6).

The ground-truth table is the CSV of ``shared/data/nb201_test_accuracy.csv``: one row per
architecture with columns ``index, arch, cifar10, cifar100, imagenet16_120, unique_str``
(test accuracy in %, 200-epoch schedule, mean over seeds).

Correlations follow the reference: Kendall tau-b and Spearman rho, pairs with a NaN score
or accuracy omitted, -inf kept as the lowest rank (+inf as the highest). Both statistics
depend only on the order of the values, so they are computed on the ranks
(`scipy.stats.rankdata`, ties averaged), which orders infinities correctly; scipy fed the
raw values can turn an infinity into NaN (inf - inf) inside Spearman's Pearson step.
`evaluate_table` adds percentile-bootstrap confidence intervals (`bootstrap.bootstrap_ci`).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from wrcor_jax.benchmarks.bootstrap import bootstrap_ci

__all__ = [
    "DATASETS",
    "ArchRecord",
    "BenchmarkError",
    "GroundTruth",
    "dataset_column",
    "evaluate_scores",
    "evaluate_table",
    "load_ground_truth",
    "parse_score",
    "rank_correlations",
    "score_table",
]

# The three accuracy columns of the ground truth, named like wrcor_jax.data's datasets.
DATASETS = ("cifar10", "cifar100", "imagenet16_120")
_COLUMNS = ("index", "arch", *DATASETS, "unique_str")
_DATASET_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "imagenet16-120": "imagenet16_120",
    "imagenet16": "imagenet16_120",
}


class BenchmarkError(ValueError):
    """A ground-truth table or a score table cannot be used; the message says why."""


@dataclass(frozen=True)
class ArchRecord:
    """Ground truth of one architecture; also readable as ``record["cifar10"]``."""

    index: int
    arch: str
    cifar10: float
    cifar100: float
    imagenet16_120: float
    unique_str: str

    def __getitem__(self, key: str) -> Any:
        if key not in _COLUMNS:
            raise KeyError(key)
        return getattr(self, key)

    def accuracy(self, dataset: str) -> float:
        """Test accuracy (%) on `dataset` (cifar10, cifar100 or imagenet16_120)."""
        return getattr(self, dataset_column(dataset))


class GroundTruth(Mapping[str, ArchRecord]):
    """Read-only mapping arch string -> ArchRecord, in the table's (index) order."""

    def __init__(self, records: Iterable[ArchRecord], source: str = "<memory>") -> None:
        self._by_arch: dict[str, ArchRecord] = {}
        for record in records:
            if record.arch in self._by_arch:
                raise BenchmarkError(f"{source}: architecture {record.arch} appears twice")
            self._by_arch[record.arch] = record
        self.source = source

    def __getitem__(self, arch: str) -> ArchRecord:
        return self._by_arch[arch]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_arch)

    def __len__(self) -> int:
        return len(self._by_arch)

    def __repr__(self) -> str:
        return f"GroundTruth({len(self)} architectures from {self.source})"

    def accuracies(self, dataset: str) -> np.ndarray:
        """All accuracies on `dataset` as float64, in table order."""
        column = dataset_column(dataset)
        return np.array([getattr(r, column) for r in self._by_arch.values()], dtype=np.float64)


def dataset_column(dataset: str) -> str:
    """Map a dataset name ('cifar10', 'ImageNet16-120', ...) to its ground-truth column."""
    key = dataset.strip().lower()
    key = _DATASET_ALIASES.get(key, key)
    if key not in DATASETS:
        raise BenchmarkError(
            f"NAS-Bench-201 has no accuracies for dataset {dataset!r}: "
            f"expected one of {', '.join(DATASETS)}"
        )
    return key


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read the NAS-Bench-201 accuracy table (CSV) into a GroundTruth mapping."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"ground-truth file not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise BenchmarkError(
                f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(header)})"
            )
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                records.append(
                    ArchRecord(
                        index=int(row["index"]),
                        arch=row["arch"].strip(),
                        cifar10=float(row["cifar10"]),
                        cifar100=float(row["cifar100"]),
                        imagenet16_120=float(row["imagenet16_120"]),
                        unique_str=row["unique_str"],
                    )
                )
            except (TypeError, ValueError) as exc:
                raise BenchmarkError(f"{path}, line {line}: bad value ({exc})") from exc
    if not records:
        raise BenchmarkError(f"{path}: no rows")
    return GroundTruth(records, source=str(path))


def parse_score(value: Any) -> float:
    """A score cell as float: numbers pass, strings 'nan'/'-inf'/'inf' parse, '' is NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return math.nan
        try:
            return float(text)  # float() accepts nan, inf, -inf, infinity in any case
        except ValueError:
            raise BenchmarkError(f"not a score: {value!r}") from None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BenchmarkError(f"not a score: {value!r}") from None


def rank_correlations(scores: Sequence[float], accuracies: Sequence[float]) -> dict[str, Any]:
    """Kendall tau-b and Spearman rho of scores vs accuracies, NaN pairs omitted, -inf lowest.

    Returns ``{"kendall": float, "spearman": float, "n": int}`` where n counts the pairs
    used; a correlation is NaN when fewer than two pairs remain or one side is constant.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(accuracies, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise BenchmarkError(f"{x.size} scores but {y.size} accuracies")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    result: dict[str, Any] = {"kendall": math.nan, "spearman": math.nan, "n": n}
    if n < 2:
        return result
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    if np.all(rx == rx[0]) or np.all(ry == ry[0]):
        return result  # constant input: no correlation is defined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        result["kendall"] = float(stats.kendalltau(rx, ry, variant="b").statistic)
        result["spearman"] = float(stats.spearmanr(rx, ry).statistic)
    return result


def score_table(
    rows: Iterable[Mapping[str, Any]],
    ground_truth: Mapping[str, ArchRecord],
    dataset: str,
    columns: Sequence[str],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The accuracies on `dataset` and each score column of `rows`, aligned row by row.

    `rows` are dicts (e.g. from csv.DictReader) with an 'arch' key and one cell per score
    column; cells may be numbers or strings such as "nan", "-inf", "inf" ("" is NaN).
    """
    column_name = dataset_column(dataset)
    columns = list(columns)
    if not columns:
        raise BenchmarkError("no score columns to evaluate")
    accuracies: list[float] = []
    scores: dict[str, list[float]] = {c: [] for c in columns}
    for number, row in enumerate(rows, start=1):
        if "arch" not in row:
            raise BenchmarkError(f"score row {number} has no 'arch'")
        arch = str(row["arch"]).strip()
        try:
            record = ground_truth[arch]
        except KeyError:
            raise BenchmarkError(
                f"score row {number}: architecture {arch} is not in the ground truth"
            ) from None
        accuracies.append(getattr(record, column_name))
        for column in columns:
            if column not in row:
                raise BenchmarkError(f"score row {number} has no column {column!r}")
            try:
                scores[column].append(parse_score(row[column]))
            except BenchmarkError as exc:
                raise BenchmarkError(f"score row {number}, column {column!r}: {exc}") from None
    return (
        np.asarray(accuracies, dtype=np.float64),
        {c: np.asarray(v, dtype=np.float64) for c, v in scores.items()},
    )


def evaluate_table(
    accuracies: ArrayLike,
    scores: Mapping[str, ArrayLike],
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """`rank_correlations` of each score column; with `bootstrap` resamples (> 0) also
    ``"kendall_ci"`` and ``"spearman_ci"``, 95% percentile-bootstrap intervals (`seed`)."""
    report = {}
    for column, values in scores.items():
        report[column] = rank_correlations(values, accuracies)
        if bootstrap > 0:
            cis = bootstrap_ci(values, accuracies, resamples=bootstrap, seed=seed)
            report[column].update({key: list(ci) for key, ci in cis.items()})
    return report


def evaluate_scores(
    rows: Iterable[Mapping[str, Any]],
    ground_truth: Mapping[str, ArchRecord],
    dataset: str,
    columns: Sequence[str],
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Correlate each score column of `rows` with the ground truth on `dataset`.

    Returns ``{column: {"kendall", "spearman", "n"}}``, plus ``"kendall_ci"`` and
    ``"spearman_ci"`` ([lo, hi]) when `bootstrap` > 0 (see `evaluate_table`).
    """
    accuracies, scores = score_table(rows, ground_truth, dataset, columns)
    return evaluate_table(accuracies, scores, bootstrap, seed)
