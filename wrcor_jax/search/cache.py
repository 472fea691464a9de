"""Scores computed once: a cache keyed by architecture, proxy and scoring configuration.

A score depends on the architecture, the proxy and the configuration (space, dataset, the
data's content, the init/batch seed, the batch size). The configuration is hashed into a
folder of the cache directory; inside it, one append-only `<proxy>.csv` (`arch,<proxy>`,
a `ResultsFile`) per proxy, so searches with different proxy sets share what they have in
common. `key.json` beside them says in words what the hash stands for. The engine is not
part of the key: both engines compute the same quantity.

Without a directory the cache lives in memory, which still saves rescoring an architecture
a search meets twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from wrcor_jax.benchmarks.nb201 import parse_score
from wrcor_jax.data import get_dataset_info
from wrcor_jax.results import ResultsFile
from wrcor_jax.scoring import ScoreConfig, out_of_memory_named
from wrcor_jax.spaces import Space, get_space
from wrcor_jax.spaces.base import Arch, Scorer

__all__ = ["CachedFitness", "ScoreCache", "cached_fitness", "score_key"]


def _content_id(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ValueError(f"cannot read data {path}: {exc.strerror}") from None
    return "sha256:" + digest.hexdigest()[:16]


def score_key(config: ScoreConfig) -> dict[str, object]:
    """What besides the architecture and the proxy determines a score of `config`.

    A local .npz counts by its content (moving or renaming it keeps the cache valid); tfds
    data by its data_dir.
    """
    get_dataset_info(config.dataset)  # an unknown dataset fails here, before any search
    data = _content_id(config.data) if config.data else f"tfds:{config.data_dir or ''}"
    return {
        "space": config.space,
        "dataset": config.dataset,
        "data": data,
        "seed": config.seed,
        "batch_size": config.batch_size,
    }


class ScoreCache:
    """Proxy scores by architecture for one configuration `key`; never forgets a score."""

    def __init__(self, key: Mapping[str, object], directory: str | Path | None = None):
        self.key = dict(key)
        self.space = get_space(str(self.key.get("space", "nb201")))
        text = json.dumps(self.key, sort_keys=True)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.directory = Path(directory) / self.digest if directory is not None else None
        self._tables: dict[str, dict[str, float]] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            key_file = self.directory / "key.json"
            if not key_file.exists():
                key_file.write_text(json.dumps(self.key, indent=1, sort_keys=True) + "\n")

    def _file(self, proxy: str) -> ResultsFile:
        return ResultsFile(self.directory / f"{proxy}.csv", [proxy])

    def _table(self, proxy: str) -> dict[str, float]:
        if not proxy.isidentifier():
            raise ValueError(f"proxy name {proxy!r} cannot name a cache file")
        if proxy not in self._tables:
            table = {}
            if self.directory is not None and self._file(proxy).done():  # drops a cut row
                with self._file(proxy).path.open(newline="") as f:
                    table = {row["arch"]: parse_score(row[proxy]) for row in csv.DictReader(f)}
            self._tables[proxy] = table
        return self._tables[proxy]

    def get(self, arch: str, proxies: Sequence[str]) -> list[float] | None:
        """The scores of `arch` for `proxies`, or None unless all of them are known."""
        row = [self._table(proxy).get(arch) for proxy in proxies]
        return None if any(value is None for value in row) else row

    def lacking(self, arch: str, proxies: Sequence[str]) -> tuple[str, ...]:
        """Those of `proxies` with no score of `arch` yet."""
        return tuple(proxy for proxy in proxies if arch not in self._table(proxy))

    def put(self, rows: Iterable[tuple[str, Sequence[float]]], proxies: Sequence[str]) -> int:
        """Record scores (arch, one value per proxy); known ones are kept. Returns how many
        (arch, proxy) scores were new."""
        rows = list(rows)
        added = 0
        for column, proxy in enumerate(proxies):
            table = self._table(proxy)
            new = {arch: float(scores[column]) for arch, scores in rows if arch not in table}
            if self.directory is not None and new:
                self._file(proxy).append((arch, [value]) for arch, value in new.items())
            table.update(new)
            added += len(new)
        return added

    def preload(self, path: str | Path) -> int:
        """Add the scores of a `wrcor-jax score` results file made with this configuration.

        The file cannot prove which configuration made it: that is the caller's word.
        Every column but `arch` and the votes is a proxy. Returns how many scores were new.
        """
        try:
            with open(path, newline="") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read scores {path}: {exc.strerror}") from None
        # A file still being written (a running `wrcor-jax score`) may end in a cut row.
        reader = csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1]))
        rows = list(reader)
        columns = reader.fieldnames or []
        # Vote columns (e.g. "vote(a,b,c)") rank a whole file's set: no per-arch score to cache.
        proxies = [c for c in columns if c != "arch" and "(" not in c]
        if "arch" not in columns or not proxies:
            raise ValueError(f"{path} needs an 'arch' column and at least one proxy column")
        return self.put(
            (
                (self.space.canonical(row["arch"]), [parse_score(row[p]) for p in proxies])
                for row in rows
            ),
            proxies,
        )


class CachedFitness:
    """A search's fitness: scores from the cache, the scorer (built on first need) for the
    rest, which then go into the cache. An architecture is scored only for the proxies the
    cache lacks, so a vote search after a WRCor search computes no WRCor again."""

    def __init__(
        self, cache: ScoreCache, proxies: Sequence[str], make_scorer: Callable[[], Scorer]
    ):
        self.cache = cache
        self.proxies = tuple(proxies)
        self.identity = cache.digest
        self._make_scorer = make_scorer
        self._scorer: Scorer | None = None
        self.scored = 0
        self.hits = 0

    @property
    def space(self) -> Space:
        """The space of the architectures scored (the cache key's)."""
        return self.cache.space

    def score(self, candidates: Sequence[Arch]) -> list[list[float]]:
        """One row of scores (in `proxies` order) per architecture of `candidates`."""
        archs = [self.space.format(arch) for arch in candidates]
        to_score: dict[tuple[str, ...], dict[str, int]] = {}  # lacking proxies -> arch -> row
        for i, arch in enumerate(archs):
            lacking = self.cache.lacking(arch, self.proxies)
            if lacking:
                to_score.setdefault(lacking, {}).setdefault(arch, i)
        missing = sum(map(len, to_score.values()))
        self.hits += len(archs) - missing
        self.scored += missing
        for lacking, rows in to_score.items():
            if self._scorer is None:
                self._scorer = self._make_scorer()
            # A call's worth at a time into the cache, so that a killed search (an mbv2
            # population of 64 takes a quarter of an hour on a CPU) loses one call, not all.
            pending = list(rows.items())
            step = self._scorer.archs_per_call
            for begin in range(0, len(pending), step):
                chunk = pending[begin : begin + step]
                with out_of_memory_named([arch for arch, _ in chunk]):
                    fresh = self._scorer.score([candidates[i] for _, i in chunk], lacking)
                self.cache.put(zip((arch for arch, _ in chunk), fresh, strict=True), lacking)
        return [list(map(float, self.cache.get(arch, self.proxies))) for arch in archs]


def cached_fitness(config: ScoreConfig, cache_dir: str | Path | None = None) -> CachedFitness:
    """The cached fitness of `config` in its space; the scorer (data, weights, compilation)
    is only built when an architecture is missing from the cache."""
    cache = ScoreCache(score_key(config), cache_dir)
    return CachedFitness(cache, config.proxies, lambda: cache.space.scorer(config))
