"""Searches on toy fitness functions: seeds, resume, aging order, REINFORCE, the score cache."""

import csv
import json
import math
import sys

import numpy as np
import pytest
from conftest import GROUND_TRUTH, SAMPLE, require

from wrcor_jax.cli import main
from wrcor_jax.results import ResultsFile
from wrcor_jax.search import (
    ALGORITHMS,
    CachedFitness,
    Criterion,
    ScoreCache,
    regularized_evolution,
    reinforce,
)
from wrcor_jax.spaces import nb201

SMALL = {"random": {}, "evolution": {}, "reinforce": {"warmup": 20}}


class Interrupted(Exception):
    """The toy fitness's stand-in for a kill."""


class Toy:
    """Three proxies of the op counts; -inf for an all-'none' first node, like a dead cell.

    Counts architectures scored; raises `Interrupted` once `limit` have been scored.
    """

    proxies = ("conv3", "conv1", "not_none")
    identity = "toy"

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.scored = 0

    def score(self, ops: np.ndarray) -> list[list[float]]:
        ops = np.atleast_2d(ops)
        if self.limit is not None and self.scored + len(ops) > self.limit:
            raise Interrupted
        self.scored += len(ops)
        return [
            [float((o == 3).sum()), float((o == 2).sum()), -math.inf if o[0] == 0 else 1.0]
            for o in ops
        ]


class OneProxy(Toy):
    """Reward = number of edges using op 3 (nor_conv_3x3)."""

    proxies = ("conv3",)

    def score(self, ops: np.ndarray) -> list[list[float]]:
        return [row[:1] for row in super().score(ops)]


def history(out) -> list[dict]:
    """history.csv without its wall-time column."""
    if not (out / "history.csv").exists():
        return []
    with (out / "history.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def result(out) -> dict:
    """result.json without its wall time."""
    return {
        k: v for k, v in json.loads((out / "result.json").read_text()).items() if k != "seconds"
    }


def run(algo, fitness, out, seed=0, budget=150, **kwargs):
    return ALGORITHMS[algo](fitness, budget, seed, out, **SMALL[algo], **kwargs)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_same_seed_same_search(algo, tmp_path):
    run(algo, Toy(), tmp_path / "a")
    run(algo, Toy(), tmp_path / "b")
    run(algo, Toy(), tmp_path / "c", seed=1)
    assert history(tmp_path / "a") == history(tmp_path / "b")
    assert result(tmp_path / "a") == result(tmp_path / "b")
    assert history(tmp_path / "a") != history(tmp_path / "c")
    rows = history(tmp_path / "a")
    assert [int(r["step"]) for r in rows] == list(range(150))
    assert list(rows[0]) == ["step", "arch", *Toy.proxies, "best_arch"]
    assert result(tmp_path / "a")["evaluations"] == 150


@pytest.mark.parametrize(
    ("algo", "kwargs"),
    [
        ("random", {}),
        ("evolution", {}),
        ("evolution", {"vote": "soft", "children": 4}),
        ("reinforce", {}),
        ("reinforce", {"vote": "soft"}),
        ("reinforce", {"draws": 7}),
    ],
)
@pytest.mark.parametrize("stop_after", [5, 90])
def test_resume_ends_as_an_uninterrupted_run(algo, kwargs, stop_after, tmp_path):
    run(algo, Toy(), tmp_path / "whole", **kwargs)
    with pytest.raises(Interrupted):
        run(algo, Toy(limit=stop_after), tmp_path / "resumed", **kwargs)
    recorded = len(history(tmp_path / "resumed"))
    assert recorded <= stop_after
    again = Toy()
    run(algo, again, tmp_path / "resumed", **kwargs)
    assert again.scored == 150 - recorded  # the recorded evaluations were not rescored
    assert history(tmp_path / "resumed") == history(tmp_path / "whole")
    assert result(tmp_path / "resumed") == result(tmp_path / "whole")


def test_resume_of_a_finished_search_scores_nothing(tmp_path):
    run("evolution", Toy(), tmp_path)
    first = json.loads((tmp_path / "result.json").read_text())
    again = Toy()
    run("evolution", again, tmp_path)
    assert again.scored == 0
    assert json.loads((tmp_path / "result.json").read_text()) == first


def test_another_search_in_the_same_folder_is_refused(tmp_path):
    run("random", Toy(), tmp_path, budget=20)
    with pytest.raises(ValueError, match=r"another search.*seed"):
        run("random", Toy(), tmp_path, budget=20, seed=1)
    with pytest.raises(ValueError, match=r"another search.*algo"):
        run("evolution", Toy(), tmp_path, budget=20)
    with pytest.raises(ValueError, match="more than the budget"):
        run("random", Toy(), tmp_path, budget=10)


def test_history_of_another_search_is_detected_step_by_step(tmp_path):
    run("random", Toy(), tmp_path, budget=20)
    rows = list(csv.reader((tmp_path / "history.csv").open()))
    rows[3][1] = nb201.arch_string(np.zeros(6, np.int32))
    with (tmp_path / "history.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(ValueError, match=r"step 2 is .* another search's history"):
        run("random", Toy(), tmp_path, budget=20)


def test_a_row_cut_by_a_kill_is_dropped_and_rescored(tmp_path):
    run("random", Toy(), tmp_path / "whole", budget=20)
    run("random", Toy(), tmp_path / "cut", budget=20)
    text = (tmp_path / "cut" / "history.csv").read_text()
    (tmp_path / "cut" / "history.csv").write_text(text[: text.rindex("\n", 0, -1) + 10])
    again = Toy()
    run("random", again, tmp_path / "cut", budget=20)
    assert again.scored == 1  # only the cut row
    assert history(tmp_path / "cut") == history(tmp_path / "whole")


@pytest.mark.parametrize("children", [1, 5])
def test_evolution_ages_out_the_oldest(children, tmp_path):
    budget = 200
    found = regularized_evolution(Toy(), budget, 3, tmp_path, children=children)
    archs = [r["arch"] for r in history(tmp_path)]
    population = found.details["population"]
    assert len(population) == 64
    assert population == archs[-64:]  # the population is always the 64 youngest, in age order
    ops = np.stack([nb201.parse_arch(a) for a in archs])
    for step in range(64, budget):
        generation_start = 64 + (step - 64) // children * children
        window = ops[generation_start - 64 : generation_start]
        differing = (window != ops[step]).sum(axis=1)
        assert (differing == 1).any(), f"child {step} is no mutant of the population"


def test_evolution_beats_its_initial_population(tmp_path):
    found = regularized_evolution(OneProxy(), 300, 0, tmp_path)
    first = max(float(r["conv3"]) for r in history(tmp_path)[:64])
    assert found.best_scores[0] > first
    assert found.best_scores[0] == 6


def test_budget_smaller_than_population_or_warmup(tmp_path):
    assert regularized_evolution(Toy(), 7, 0, tmp_path / "e").evaluations == 7
    assert reinforce(Toy(), 7, 0, tmp_path / "r").evaluations == 7
    with pytest.raises(ValueError, match="positive"):
        regularized_evolution(Toy(), 0, 0, tmp_path / "z")


def test_reinforce_policy_moves_toward_reward(tmp_path):
    found = reinforce(OneProxy(), 400, 0, tmp_path)  # 100 warm-up + 300 updates
    policy = np.array(found.details["policy"])
    assert policy.shape == (6, 5)
    np.testing.assert_allclose(policy.sum(axis=1), 1, atol=1e-5)
    assert (policy.argmax(axis=1) == 3).all()
    assert (policy[:, 3] > 0.21).all()  # from 0.2


def test_batched_reinforce_draws_a_round_from_one_policy(tmp_path):
    """draws=5: each round's five architectures are scored in one call; the policy still
    learns; draws=1 is the reference course (its search.json names no draws)."""
    scorer = OneProxy()
    calls = []
    score = scorer.score
    scorer.score = lambda ops: calls.append(len(np.atleast_2d(ops))) or score(ops)
    found = reinforce(scorer, 400, 0, tmp_path / "five", draws=5)
    assert calls[-60:] == [5] * 60  # after the warm-up's chunks, 60 rounds of 5
    assert (np.array(found.details["policy"]).argmax(axis=1) == 3).all()
    assert json.loads((tmp_path / "five" / "search.json").read_text())["options"]["draws"] == 5
    reinforce(Toy(), 30, 0, tmp_path / "one", warmup=20)
    assert "draws" not in json.loads((tmp_path / "one" / "search.json").read_text())["options"]


def test_criterion_single_proxy_hard_and_soft():
    column = np.array([[1.0], [2], [0]])
    assert Criterion(1).best(column, column) == 1
    assert Criterion(1).best(np.array([[math.nan], [-math.inf]]), column) == 1
    rows = np.array([[1.0, 0, 0], [0, 1, 1]])
    assert Criterion(3, "hard").best(rows, rows) == 1  # wins two proxies of three
    assert Criterion(3, "soft").best(rows, rows) == 1
    # Against a population where proxies 1 and 2 spread widely, row 1's wins are tiny
    # z-scores and row 0's win on proxy 0 is large: the soft vote turns.
    wide = np.vstack([rows, [[0, -100, -100], [0, 100, 100]]])
    assert Criterion(3, "hard").best(rows, wide) == 1
    assert Criterion(3, "soft").best(rows, wide) == 0
    with pytest.raises(ValueError, match="unknown vote"):
        Criterion(2, "mean")


class CountingScorer:
    """The scorer behind a CachedFitness: toy scores, counting calls and architectures."""

    archs_per_call = 8

    def __init__(self):
        self.calls, self.archs, self.asked = 0, 0, []

    def score(self, ops: np.ndarray, proxies) -> list[list[float]]:
        self.calls += 1
        self.archs += len(ops)
        self.asked.append(tuple(proxies))
        columns = [Toy.proxies.index(p) for p in proxies]
        return [[row[c] for c in columns] for row in Toy().score(ops)]


def cached(cache: ScoreCache, proxies=Toy.proxies) -> tuple[CachedFitness, CountingScorer]:
    scorer = CountingScorer()
    return CachedFitness(cache, proxies, lambda: scorer), scorer


def test_cache_never_rescores(tmp_path):
    key = {"space": "nb201", "dataset": "toy", "data": "x", "seed": 0, "batch_size": 8}
    fitness, scorer = cached(ScoreCache(key, tmp_path / "cache"))
    ops = nb201.sample_archs(np.random.default_rng(0), 30)
    doubled = np.concatenate([ops, ops])
    first = fitness.score(doubled)
    assert scorer.archs == len({nb201.arch_string(o) for o in ops})  # repeats scored once
    assert first[:30] == first[30:] == Toy().score(ops)

    # Another search on the same configuration, a fresh process: nothing is scored.
    fitness, scorer = cached(ScoreCache(key, tmp_path / "cache"))
    assert fitness.score(doubled) == first and scorer.calls == 0
    regularized_evolution(fitness, 100, 0, tmp_path / "search")
    searched = scorer.archs
    fitness, scorer = cached(ScoreCache(key, tmp_path / "cache"))
    regularized_evolution(fitness, 100, 0, tmp_path / "again")
    assert searched > 0 and scorer.calls == 0

    # A subset of the proxies is served from the same files; a new proxy set must score.
    fitness, scorer = cached(ScoreCache(key, tmp_path / "cache"), ("conv1",))
    assert fitness.score(ops) == [[row[1]] for row in first[:30]] and scorer.calls == 0
    # Another configuration has its own folder.
    other, scorer = cached(ScoreCache(key | {"seed": 1}, tmp_path / "cache"))
    other.score(ops[:3])
    assert scorer.archs == 3


def test_cache_keeps_each_finished_call_of_a_killed_fitness(tmp_path):
    """A population is scored a call's worth at a time, each call cached before the next:
    a search killed on its third call has lost that call only."""
    key = {"k": 1}
    fitness, scorer = cached(ScoreCache(key, tmp_path / "cache"))
    score = scorer.score
    scorer.score = lambda ops, proxies: (
        score(ops, proxies) if scorer.calls < 2 else sys.exit("killed")
    )
    ops = nb201.sample_archs(np.random.default_rng(4), 20)
    with pytest.raises(SystemExit, match="killed"):
        fitness.score(ops)
    assert scorer.archs == 16
    fitness, scorer = cached(ScoreCache(key, tmp_path / "cache"))
    assert fitness.score(ops) == Toy().score(ops)
    assert scorer.archs == 4 and fitness.hits == 16


def test_cache_scores_only_the_proxies_it_lacks(tmp_path):
    """A vote search after a WRCor search: WRCor is never computed twice."""
    cache = ScoreCache({"k": 1}, tmp_path / "cache")
    ops = nb201.sample_archs(np.random.default_rng(2), 12)
    first, _ = cached(cache, ("conv3",))
    first.score(ops[:8])
    fitness, scorer = cached(cache)
    rows = fitness.score(ops)
    assert rows == Toy().score(ops)
    assert sorted(scorer.asked) == [("conv1", "not_none"), Toy.proxies]
    assert scorer.archs == len({nb201.arch_string(o) for o in ops})
    assert fitness.scored == scorer.archs and fitness.hits == len(ops) - scorer.archs


def test_cache_preloads_a_score_file(tmp_path):
    ops = nb201.sample_archs(np.random.default_rng(1), 20)
    archs = [nb201.arch_string(o) for o in ops]
    ResultsFile(tmp_path / "scores.csv", Toy.proxies).append(
        zip(archs, Toy().score(ops), strict=True)
    )
    cache = ScoreCache({"k": 1}, tmp_path / "cache")
    assert cache.preload(tmp_path / "scores.csv") == 3 * len(set(archs))
    assert cache.preload(tmp_path / "scores.csv") == 0
    fitness, scorer = cached(ScoreCache({"k": 1}, tmp_path / "cache"))
    assert fitness.score(ops) == Toy().score(ops) and scorer.calls == 0
    (tmp_path / "bad.csv").write_text("name,wrcor\n")
    with pytest.raises(ValueError, match="'arch' column"):
        cache.preload(tmp_path / "bad.csv")


def test_cache_preload_skips_vote_columns(tmp_path):
    archs = [nb201.arch_string(o) for o in nb201.sample_archs(np.random.default_rng(2), 3)]
    results = ResultsFile(tmp_path / "scores.csv", ["wrcor", "act_cor"], ["vote(wrcor,act_cor)"])
    results.append((arch, [k, -k]) for k, arch in enumerate(archs))
    results.fill_derived(lambda table: {"vote(wrcor,act_cor)": table[:, 0]})
    cache = ScoreCache({"k": 1}, tmp_path / "cache")
    assert cache.preload(tmp_path / "scores.csv") == 2 * 3
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.csv")) == [
        "act_cor.csv",
        "wrcor.csv",
    ]


def toy_score_file(path) -> None:
    """Every architecture's toy scores under real proxy names, as `wrcor-jax score` writes."""
    everything = nb201.all_archs()
    scores = [[r[0] + 0.1 * r[1], r[1]] for r in Toy().score(everything)]
    archs = map(nb201.arch_string, everything)
    ResultsFile(path, ["wrcor", "act_cor"]).append(zip(archs, scores, strict=True))


def test_cli_search_from_a_preloaded_cache(tmp_path, capsys):
    """The whole CLI path without scoring: every architecture is in the preloaded cache."""
    truth = require(GROUND_TRUTH)
    toy_score_file(tmp_path / "scores.csv")
    np.savez(tmp_path / "data.npz", x=np.zeros(3))  # only hashed: the scorer is never built
    base = ["search", "--algo", "evolution", "--proxies", "wrcor,act_cor", "--budget", "80"]
    base += ["--data", str(tmp_path / "data.npz"), "--cache-dir", str(tmp_path / "cache")]
    base += ["--ground-truth", str(truth), "--quiet"]
    args = [*base, "--out", str(tmp_path / "out")]
    assert main([*args, "--cache-preload", str(tmp_path / "scores.csv")]) == 0
    out, err = capsys.readouterr()
    found = json.loads(out)
    assert found == json.loads((tmp_path / "out" / "result.json").read_text())
    assert found["evaluations"] == 80 and found["algo"] == "evolution"
    assert found["proxies"] == ["wrcor", "act_cor"] and found["vote"] == "hard"
    assert set(found["best_test_accuracy"]) == {"cifar10", "cifar100", "imagenet16_120"}
    assert "0 scored, 80 from the cache" in err

    for extra, message in [
        (["--out", str(tmp_path / "out"), "--seed", "1"], "another search"),
        (["--out", str(tmp_path / "o2"), "--budget", "0"], "positive"),
        (["--out", str(tmp_path / "o3"), "--algo", "random", "--children", "2"], "--children"),
        (["--out", str(tmp_path / "o5"), "--draws", "2"], "--draws applies to --algo reinforce"),
        (["--out", str(tmp_path / "o4"), "--proxies", "nope"], "unknown proxy"),
    ]:
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_search_scores_real_architectures_once(tmp_path):
    """Random search with WRCor on the CIFAR-10 sample (batch 8, 6 architectures), then the
    same search from the cache without scoring."""
    from wrcor_jax.scoring import ScoreConfig
    from wrcor_jax.search import cached_fitness, random_search

    config = ScoreConfig(batch_size=8, data=str(require(SAMPLE)), workers=1)
    fitness = cached_fitness(config, tmp_path / "cache")
    found = random_search(fitness, 6, 0, tmp_path / "a")
    assert fitness.scored == 6 and found.evaluations == 6
    assert all(math.isfinite(v) or v == -math.inf for v in found.best_scores)
    again = cached_fitness(config, tmp_path / "cache")
    assert random_search(again, 6, 0, tmp_path / "b").best_arch == found.best_arch
    assert again.scored == 0 and again.hits == 6
