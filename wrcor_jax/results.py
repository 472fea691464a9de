"""Append-only CSV of scores: one row per architecture, written as soon as it is computed.

A run that is killed loses at most the rows of the chunk in flight; re-running the same
command reads what is there and scores only the rest.

Derived columns (votes) depend on every row, so they stay empty while rows are appended and
are filled by one atomic rewrite (`fill_derived`) once a run has scored everything. A small
JSON sidecar (`<file>.json`, see `write_meta`) records which batch the scores came from.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wrcor_jax.jsonio import write_json


class ResultsError(ValueError):
    """An existing results file that does not belong to this run."""


def format_score(value: float) -> str:
    """Full float64 precision; NaN and infinities as 'nan', 'inf', '-inf'."""
    return repr(float(value))


def _cell(text: str) -> float:
    return float(text) if text else math.nan


class CsvLog:
    """A CSV with a fixed header, appended and fsync'ed row by row, so a killed writer
    loses at most the row in flight; reading drops that cut row from the file.

    `mismatch` is the error raised, with `hint` (what to do), when an existing file has
    another header: it belongs to another run.
    """

    def __init__(
        self,
        path: str | Path,
        header: Sequence[str],
        mismatch: type[Exception] = ValueError,
        hint: str = "choose another --out",
    ):
        self.path, self.header = Path(path), list(header)
        self.mismatch, self.hint = mismatch, hint

    def rows(self) -> list[list[str]]:
        """The complete rows (header excluded)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        text = self.path.read_text()
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if rows[0] != self.header:
            raise self.mismatch(
                f"{self.path} has columns {rows[0]}, this run writes {self.header}: {self.hint}"
            )
        complete = [row for row in rows[1:] if len(row) == len(self.header)]
        if complete and complete[-1] is rows[-1] and not text.endswith("\n"):
            complete.pop()  # cut inside its last cell: the count is right, the value is not
        if len(complete) != len(rows) - 1:
            self.rewrite(complete)
        return complete

    def append(self, rows: Iterable[Sequence[str]]) -> None:
        """Write rows (the header first into a new file) and flush them to disk."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.header)
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, rows: list[list[str]]) -> None:
        """Replace the file with header + rows: write a temporary file, fsync, rename."""
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([self.header, *rows])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class ResultsFile:
    """`arch,<proxy>...,<derived>...` CSV; `done()` lists architectures already scored."""

    def __init__(self, path: str | Path, columns: Sequence[str], derived: Sequence[str] = ()):
        self.path = Path(path)
        self.columns, self.derived = list(columns), list(derived)
        self.header = ["arch", *self.columns, *self.derived]
        self._log = CsvLog(
            self.path, self.header, ResultsError, "choose another --out or the same proxies"
        )

    def done(self) -> set[str]:
        """Architectures with a complete row; checks the header matches this run's."""
        return {row[0] for row in self._log.rows()}

    def append(self, rows: Iterable[tuple[str, Sequence[float]]]) -> None:
        """Write rows (base scores; derived cells left empty) and flush them to disk."""
        empty = [""] * len(self.derived)
        lines = []
        for arch, scores in rows:
            if len(scores) != len(self.columns):
                raise ValueError(f"{len(scores)} scores for {len(self.columns)} columns")
            lines.append([arch, *map(format_score, scores), *empty])
        self._log.append(lines)

    def fill_derived(self, compute: Callable[[np.ndarray], Mapping[str, np.ndarray]]) -> int:
        """Recompute the derived columns over all rows and rewrite the file atomically.

        `compute` gets the base scores (rows x columns, file order) and returns one array per
        derived column. Returns the number of rows.
        """
        rows = self._log.rows()
        width = 1 + len(self.columns)
        table = np.array([[_cell(c) for c in row[1:width]] for row in rows], dtype=np.float64)
        values = compute(table.reshape(len(rows), len(self.columns)))
        derived = np.array([values[name] for name in self.derived], dtype=np.float64)
        if derived.shape != (len(self.derived), len(rows)):
            raise ValueError(f"derived columns of shape {derived.shape} for {len(rows)} rows")
        self._log.rewrite(
            [row[:width] + [format_score(v) for v in derived[:, i]] for i, row in enumerate(rows)]
        )
        return len(rows)


def meta_path(results: str | Path) -> Path:
    """The sidecar of a results file: `results.csv` -> `results.csv.json`."""
    return Path(f"{results}.json")


def write_meta(results: str | Path, meta: Mapping[str, Any]) -> None:
    """Record how the scores of `results` were computed (dataset, seed, batch size...)."""
    path = meta_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(meta))


def read_meta(results: str | Path) -> dict[str, Any] | None:
    """The sidecar of `results`, or None when there is none (or it cannot be read)."""
    try:
        meta = json.loads(meta_path(results).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
