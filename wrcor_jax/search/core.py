"""What every search shares: the fitness, the comparison, the budget and the history.

A search is a seeded program that asks `Evaluations.evaluate` for scores. Each evaluation
is appended to `history.csv` (`step, arch, <proxy>..., best_arch, seconds`) as it happens.
Re-running the same search in the same folder runs the program again from the seed; the
first evaluations are answered from the history instead of the fitness, which is exact
because the program consumes its RNG the same way whatever the scores' source, so the run
continues where the other stopped and ends as an uninterrupted one would. Every replayed
architecture is checked against the recorded one.

Conventions:
- the budget counts evaluations, every one of them: the initial population of evolution,
  REINFORCE's warm-up, an architecture drawn again (the fitness cache makes a repeat free);
- candidates compare by their single proxy, or with several proxies by the hard vote's
  pairwise majority, or by the soft vote with z-scores over all evaluations so far;
- the best architecture is kept as it goes: a new evaluation replaces it only when it wins
  the comparison (ties keep the incumbent);
- `seconds` is the search time up to each evaluation, summed over interrupted runs
  (scorer set-up and compilation included).

result.json also holds the found architecture's cost (`resolution`, `flops`, `params` from
the space's `describe` at its default class count, the count its limits are about) and, in
a space with landmarks (`Space.landmarks`, e.g. SPEC 8's architectures in mbv2), where each
one within the space's ranges and limits would stand among the distinct architectures the
search evaluated, by the search's own comparison: scored by the same fitness, outside the
budget and the history. A search that fails before its first evaluation leaves nothing
behind in its folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from tqdm import tqdm

from wrcor_jax.benchmarks.nb201 import DATASETS, parse_score
from wrcor_jax.jsonio import write_json
from wrcor_jax.results import CsvLog, format_score
from wrcor_jax.spaces import Space, get_space
from wrcor_jax.spaces.base import Arch
from wrcor_jax.vote import hard_vote_compare, soft_vote

VOTES = ("hard", "soft")
COST = ("resolution", "flops", "params")  # what result.json keeps of `Space.describe`


class Fitness(Protocol):
    """Scores a batch of architectures: one row per architecture, in `proxies` order,
    higher is better. `identity` names what determines the scores besides the architecture
    (for the cached NB201 fitness, the configuration hash)."""

    proxies: tuple[str, ...]
    identity: str

    def score(self, archs: Sequence[Arch]) -> list[list[float]]: ...


@dataclasses.dataclass(frozen=True)
class Criterion:
    """How candidates compare: one proxy directly, several by the hard or the soft vote."""

    num_proxies: int
    vote: str = "hard"

    def __post_init__(self):
        if self.vote not in VOTES:
            raise ValueError(f"unknown vote {self.vote!r}; known: {', '.join(VOTES)}")

    def _keys(self, rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """What candidates compare by, one row each: their scores, or the soft vote's value
        with z-scores over `seen`; `hard_vote_compare` of two rows is then the comparison."""
        keys = np.asarray(rows, np.float64)
        if self.num_proxies > 1 and self.vote == "soft":
            keys = soft_vote(keys, reference=seen)[:, None]
        return keys

    def best(self, rows: np.ndarray, seen: np.ndarray) -> int:
        """Index of the best of `rows` (the first on ties); `seen` holds every evaluation so
        far, the population the soft vote's z-scores are computed against."""
        keys = self._keys(rows, seen)
        best = 0
        for i in range(1, len(keys)):
            if hard_vote_compare(keys[i], keys[best]) > 0:
                best = i
        return best

    def standing(self, row: np.ndarray, rows: np.ndarray, seen: np.ndarray) -> tuple[int, int]:
        """(how many of `rows` beat `row`, how many it beats) by this comparison."""
        keys = self._keys(np.vstack([rows, row]), seen)
        outcomes = [hard_vote_compare(keys[-1], key) for key in keys[:-1]]
        return outcomes.count(-1), outcomes.count(1)


class Record(NamedTuple):
    """One row of history.csv."""

    step: int
    arch: str
    scores: tuple[float, ...]
    best_arch: str
    seconds: float


class History:
    """history.csv: one row per evaluation, flushed to disk before the search goes on."""

    def __init__(self, path: str | Path, proxies: Sequence[str]):
        self.path = Path(path)
        self._log = CsvLog(self.path, ["step", "arch", *proxies, "best_arch", "seconds"])

    def read(self) -> list[Record]:
        """The recorded evaluations; a row cut by a kill is dropped from the file."""
        records = [
            Record(int(r[0]), r[1], tuple(map(parse_score, r[2:-2])), r[-2], float(r[-1]))
            for r in self._log.rows()
        ]
        if [r.step for r in records] != list(range(len(records))):
            raise ValueError(f"{self.path}: steps are not 0, 1, 2, ...")
        return records

    def append(self, records: Sequence[Record]) -> None:
        """Write records and flush them to disk."""
        self._log.append(
            [r.step, r.arch, *map(format_score, r.scores), r.best_arch, f"{r.seconds:.3f}"]
            for r in records
        )


class Evaluations:
    """The budgeted evaluations of one search: fitness or replayed history, best so far."""

    def __init__(
        self,
        fitness: Fitness,
        budget: int,
        criterion: Criterion,
        history: History,
        space: Space,
        progress: bool = False,
    ):
        self.fitness, self.budget, self.criterion = fitness, budget, criterion
        self.space = space
        self._history = history
        self._recorded = history.read()
        if len(self._recorded) > budget:
            raise ValueError(
                f"{history.path} holds {len(self._recorded)} evaluations, more than the "
                f"budget of {budget}"
            )
        self.archs: list[str] = []
        self._scores = np.full((budget, len(fitness.proxies)), np.nan)
        self.best: int | None = None
        self.seconds = 0.0
        self._offset = self._recorded[-1].seconds if self._recorded else 0.0
        self._start = time.perf_counter()
        self._bar = tqdm(total=budget, unit="arch", file=sys.stderr, disable=not progress)

    @property
    def count(self) -> int:
        """Evaluations done so far (replayed ones included)."""
        return len(self.archs)

    @property
    def remaining(self) -> int:
        return self.budget - self.count

    def seen(self) -> np.ndarray:
        """Scores of every evaluation so far, (count, proxies)."""
        return self._scores[: self.count]

    def evaluate(self, candidates: Sequence[Arch]) -> np.ndarray:
        """Scores (k, proxies) of k architectures of the space, counted against the budget."""
        if len(candidates) > self.remaining:
            raise ValueError(
                f"{len(candidates)} evaluations asked, {self.remaining} left in the budget"
            )
        archs = [self.space.format(arch) for arch in candidates]
        replay = self._recorded[self.count : self.count + len(candidates)]
        for record, arch in zip(replay, archs, strict=False):
            if record.arch != arch:
                raise ValueError(
                    f"{self._history.path} step {record.step} is {record.arch} but this search "
                    f"evaluates {arch} there: it is another search's history; choose another --out"
                )
        rows = [r.scores for r in replay]
        if len(replay) < len(candidates):
            rows += self.fitness.score(candidates[len(replay) :])
        fresh = []
        for i, (arch, row) in enumerate(zip(archs, rows, strict=True)):
            step = self.count
            self._scores[step] = row
            self.archs.append(arch)
            incumbent = [] if self.best is None else [self.best]  # the newcomer must beat it
            if self.criterion.best(self._scores[[*incumbent, step]], self.seen()) == len(incumbent):
                self.best = step
            if i < len(replay):
                self.seconds = replay[i].seconds
            else:
                self.seconds = self._offset + time.perf_counter() - self._start
                fresh.append(Record(step, arch, tuple(row), self.archs[self.best], self.seconds))
        self._history.append(fresh)
        self._bar.update(len(candidates))
        return self._scores[self.count - len(candidates) : self.count].copy()

    def close(self) -> None:
        self._bar.close()


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a search found; `as_dict()` is result.json."""

    algo: str
    seed: int
    budget: int
    proxies: tuple[str, ...]
    vote: str
    best_arch: str
    best_scores: tuple[float, ...]
    evaluations: int
    seconds: float
    best_test_accuracy: dict[str, float] | None = None
    resolution: int | None = None
    flops: int | None = None
    params: int | None = None
    landmarks: dict[str, dict[str, Any]] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["proxies"], out["best_scores"] = list(self.proxies), list(self.best_scores)
        details = out.pop("details")
        optional = ("best_test_accuracy", "resolution", "flops", "params", "landmarks")
        return {k: v for k, v in out.items() if k not in optional or v is not None} | details


def landmark_standings(
    evaluations: Evaluations, scores: Callable[[Sequence[Arch]], list[list[float]]]
) -> dict[str, dict[str, Any]]:
    """Per landmark of the space: its cost, and, when it lies within the space's ranges and
    limits, its `scores` and where the search's comparison puts it among the distinct
    architectures evaluated (`rank` 1 + `beaten_by`, `beats`, `of`; `beats_found`: whether
    it wins against the architecture found); otherwise why it lies `outside`."""
    space = evaluations.space
    landmarks = space.landmarks()
    inside = {name: arch for name, arch in landmarks.items() if not space.search_problems(arch)}
    rows = dict(zip(inside, scores(list(inside.values())) if inside else [], strict=True))
    seen = evaluations.seen()
    first = {arch: step for step, arch in reversed(list(enumerate(evaluations.archs)))}
    distinct, found = seen[sorted(first.values())], seen[evaluations.best]
    standings = {}
    for name, arch in landmarks.items():
        cost = space.describe(arch, space.default_num_classes)
        entry = {"arch": space.format(arch), **{k: cost[k] for k in COST}}
        if name in rows:
            row = np.asarray(rows[name], np.float64)
            beaten_by, beats = evaluations.criterion.standing(row, distinct, seen)
            _, wins = evaluations.criterion.standing(row, found[None], seen)
            entry |= {
                "scores": [float(v) for v in row],
                "rank": beaten_by + 1,
                "beaten_by": beaten_by,
                "beats": beats,
                "of": len(distinct),
                "beats_found": bool(wins),
            }
        else:
            entry["outside"] = "; ".join(space.search_problems(arch))
        standings[name] = entry
    return standings


def _check_identity(path: Path, identity: Mapping[str, Any]) -> bool:
    """The folder's search.json names the search its history belongs to; True when this
    call wrote it (a new search)."""
    if path.exists():
        # search.json files written before the space joined the identity are NB201's.
        recorded = {"space": {"name": "nb201"}} | json.loads(path.read_text())
        if recorded != identity:
            changed = sorted(
                k for k in identity.keys() | recorded.keys() if recorded.get(k) != identity.get(k)
            )
            differences = "; ".join(
                f"{k} {_short(recorded.get(k))} there, {_short(identity.get(k))} here"
                for k in changed
            )
            raise ValueError(
                f"{path.parent} holds another search ({differences}): choose another --out"
            )
        return False
    if path.with_name("history.csv").exists():
        raise ValueError(
            f"{path.parent} has a history.csv but no search.json: choose another --out"
        )
    write_json(path, identity)
    return True


def _short(value: Any) -> str:
    """A search.json value in one short phrase (a space by its name and options)."""
    if isinstance(value, Mapping):
        return " ".join(f"{v}" if k == "name" else f"{k}={v}" for k, v in value.items())
    return json.dumps(value)


def run_search(
    algo: str,
    program: Callable[[Evaluations, np.random.Generator], dict[str, Any]],
    fitness: Fitness,
    budget: int,
    seed: int,
    out_dir: str | Path,
    *,
    vote: str = "hard",
    options: Mapping[str, Any] | None = None,
    ground_truth: Mapping[str, Any] | None = None,
    progress: bool = False,
    space: Space | None = None,
) -> SearchResult:
    """Run (or resume) `program` with `budget` evaluations; write result.json in `out_dir`.

    `options` are the algorithm's settings that change its course (they join algo, seed,
    proxies, vote and the fitness identity in search.json, which a resume must match);
    the budget may grow between runs. `ground_truth` maps arch -> record with the three
    datasets' test accuracies. `space` (by default the fitness's, else NB201) reads
    and writes the architectures; the program gets it as `evaluations.space`.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"the budget must be a positive number of evaluations, got {budget!r}")
    criterion = Criterion(len(fitness.proxies), vote)
    # A fitness that knows its space (CachedFitness) names it; toy fitnesses score NB201.
    space = space or getattr(fitness, "space", None) or get_space("nb201")
    identity = {
        "algo": algo,
        "seed": seed,
        "proxies": list(fitness.proxies),
        "vote": vote,
        "fitness": fitness.identity,
        "options": dict(options or {}),
        "space": {"name": space.name, **space.options()},
    }
    out = Path(out_dir)
    new_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    new_search = _check_identity(out / "search.json", identity)
    history = History(out / "history.csv", fitness.proxies)
    evaluations = Evaluations(fitness, budget, criterion, history, space, progress)
    try:
        details = program(evaluations, np.random.default_rng(seed))
    except BaseException:
        if new_search and not evaluations.count:  # failed before its first evaluation
            for name in ("history.csv", "search.json"):
                (out / name).unlink(missing_ok=True)
            if new_dir and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        evaluations.close()
    if evaluations.remaining:
        raise RuntimeError(f"{algo} stopped with {evaluations.remaining} evaluations unspent")
    best = evaluations.archs[evaluations.best]
    cost = space.describe(space.parse(best), space.default_num_classes)
    accuracy = None
    if ground_truth is not None:
        if best not in ground_truth:
            raise ValueError(f"{best} is not in the ground truth")
        record = ground_truth[best]
        accuracy = {dataset: float(record[dataset]) for dataset in DATASETS}
    result = SearchResult(
        algo=algo,
        seed=seed,
        budget=budget,
        proxies=tuple(fitness.proxies),
        vote=vote,
        best_arch=best,
        best_scores=tuple(float(v) for v in evaluations.seen()[evaluations.best]),
        evaluations=evaluations.count,
        seconds=round(evaluations.seconds, 3),
        best_test_accuracy=accuracy,
        **{k: cost[k] for k in COST},
        landmarks=landmark_standings(evaluations, fitness.score) or None,
        details=details,
    )
    write_json(out / "result.json", result.as_dict())
    return result
