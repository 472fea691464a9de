"""Append-only CSV of scores: one row per architecture, written as soon as it is computed.

A run that is killed loses at most the rows of the chunk in flight; re-running the same
command reads what is there and scores only the rest.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class ResultsError(ValueError):
    """An existing results file that does not belong to this run."""


def format_score(value: float) -> str:
    """Full float64 precision; NaN and infinities as 'nan', 'inf', '-inf'."""
    return repr(float(value))


class ResultsFile:
    """`arch,<proxy>...` CSV; `done()` lists architectures already scored."""

    def __init__(self, path: str | Path, columns: Sequence[str]):
        self.path = Path(path)
        self.header = ["arch", *columns]

    def done(self) -> set[str]:
        """Architectures with a complete row; checks the header matches this run's."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        if rows[0] != self.header:
            raise ResultsError(
                f"{self.path} has columns {rows[0]}, this run writes {self.header}: "
                "choose another --out or the same proxies"
            )
        complete = [row for row in rows[1:] if len(row) == len(self.header)]
        if len(complete) != len(rows) - 1:  # a row cut by a kill: drop it, keep the rest
            self._rewrite(complete)
        return {row[0] for row in complete}

    def append(self, rows: Iterable[tuple[str, Sequence[float]]]) -> None:
        """Write rows and flush them to disk before returning."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.header)
            for arch, scores in rows:
                writer.writerow([arch, *map(format_score, scores)])
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, rows: list[list[str]]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([self.header, *rows])
        tmp.replace(self.path)
