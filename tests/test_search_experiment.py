"""experiments/search_nb201.py with toy scores: the runs, resume, aggregation and table."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from wrcor_jax.results import ResultsFile, write_meta
from wrcor_jax.search import CachedFitness, ScoreCache
from wrcor_jax.spaces import nb201

SCRIPT = Path(__file__).parents[1] / "experiments" / "search_nb201.py"
spec = importlib.util.spec_from_file_location("search_nb201", SCRIPT)
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)

TOY = {  # proxy -> function of the op counts (none, skip, conv1, conv3, pool)
    "wrcor": lambda c: c[3] + 0.1 * c[2],
    "synflow": lambda c: float(c[2]),
    "jacob_cov": lambda c: -float(c[4]),
}


def toy_rows(ops: np.ndarray, proxies) -> list[list[float]]:
    counts = [np.bincount(o, minlength=5) for o in np.atleast_2d(ops)]
    return [[float(TOY[p](c)) for p in proxies] for c in counts]


class ToyScorer:
    archs_per_call = 8

    def __init__(self, proxies):
        self.proxies, self.archs, self.asked = proxies, 0, set()

    def score(self, ops, proxies):
        assert set(proxies) <= set(self.proxies)
        self.archs += len(ops)
        self.asked.add(tuple(proxies))
        return toy_rows(ops, proxies)


def toy_fitnesses(cache: ScoreCache) -> tuple[dict, dict]:
    scorers = {name: ToyScorer(proxies) for name, proxies in experiment.FITNESSES.items()}
    fitnesses = {
        name: CachedFitness(cache, proxies, lambda name=name: scorers[name])
        for name, proxies in experiment.FITNESSES.items()
    }
    return fitnesses, scorers


def toy_truth() -> dict[str, dict[str, float]]:
    truth = {}
    for ops in nb201.all_archs():
        c = np.bincount(ops, minlength=5)
        truth[nb201.arch_string(ops)] = {
            "cifar10": 80.0 + c[3],
            "cifar100": 60.0 + c[3] - c[4],
            "imagenet16_120": 30.0 + c[2],
        }
    return truth


@pytest.fixture(scope="module")
def truth():
    return toy_truth()


def run(cache, out, truth, lines, seeds=(0, 1), budget=12):
    fitnesses, scorers = toy_fitnesses(cache)
    warm, _ = toy_fitnesses(cache)
    experiment.run_all(
        fitnesses,
        sorted(experiment.ALGORITHMS),
        list(seeds),
        budget,
        out,
        truth,
        warm_fitnesses=warm,
        log=lines.append,
    )
    return scorers


def test_small_budgets_cap_population_and_warmup():
    assert experiment.algo_options("evolution", 1000) == {
        "population_size": 64,
        "tournament_size": 10,
    }
    assert experiment.algo_options("reinforce", 1000) == {"warmup": 100}
    assert experiment.algo_options("evolution", 8) == {"population_size": 4, "tournament_size": 4}
    assert experiment.algo_options("reinforce", 8) == {"warmup": 4}
    assert experiment.algo_options("reinforce", 1) == {"warmup": 1}
    assert experiment.algo_options("random", 8) == {}


def test_runs_share_one_cache_and_resume(tmp_path, truth):
    cache_dir, out, lines = tmp_path / "cache", tmp_path / "out", []
    scorers = run(ScoreCache({"k": 1}, cache_dir), out, truth, lines)
    assert len(lines) == 2 * 12  # 3 algos x 2 fitnesses x 2 seeds, cold then warm
    assert not any("skipped" in line for line in lines)
    names = {p.name for p in out.iterdir()} - {"warm"}
    assert names == {f"{a}_{f}_{s}" for a in experiment.ALGORITHMS for f in ("wrcor", "vote")
                     for s in (0, 1)}  # fmt: skip
    # One WRCor table for both fitnesses.
    assert sorted(p.name for p in cache_dir.rglob("*.csv")) == [
        "jacob_cov.csv",
        "synflow.csv",
        "wrcor.csv",
    ]
    records = experiment.collect(out, ["wrcor", "vote"], sorted(experiment.ALGORITHMS), [0, 1])
    assert len(records) == 12
    scored = sum(r["stats"]["scored"] for r in records)
    assert scored == scorers["wrcor"].archs + scorers["vote"].archs
    # The vote searches met the WRCor searches' architectures: WRCor was not computed again.
    assert ("synflow", "jacob_cov") in scorers["vote"].asked
    for r in records:
        assert r["evaluations"] == 12
        assert r["stats"]["scored"] + r["stats"]["hits"] == 12
        assert r["warm_stats"] == {"scored": 0, "hits": 12}  # the warm pass only hits
        assert set(r["best_test_accuracy"]) == {"cifar10", "cifar100", "imagenet16_120"}

    # Everything finished: a re-run skips it all, scores nothing and leaves the files alone.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    lines.clear()
    scorers = run(ScoreCache({"k": 1}, cache_dir), out, truth, lines)
    assert len(lines) == 24 and all(line.endswith("skipped") for line in lines)
    assert scorers["wrcor"].archs == scorers["vote"].archs == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}

    # An unfinished search resumes from its history; an unfinished warm run is redone.
    folder = out / "evolution_vote_1"
    whole = (folder / "history.csv").read_text().splitlines()
    (folder / "history.csv").write_text("\n".join(whole[:6]) + "\n")
    (folder / "result.json").unlink()
    (out / "warm" / "random_wrcor_0" / "result.json").unlink()
    lines.clear()
    run(ScoreCache({"k": 1}, tmp_path / "cache"), out, truth, lines)
    ran = [line for line in lines if not line.endswith("skipped")]
    assert len(ran) == 2
    assert ran[0].startswith("[cold") and "evolution vote seed 1" in ran[0]
    assert "(0 scored, 7 from the cache)" in ran[0]  # 5 replayed from the history
    assert ran[1].startswith("[warm") and "random wrcor seed 0" in ran[1]
    assert "(0 scored, 12 from the cache)" in ran[1]
    assert [r.split(",")[:2] for r in (folder / "history.csv").read_text().splitlines()] == [
        r.split(",")[:2] for r in whole
    ]


def write_result(out: Path, algo, fitness, seed, cifar10, seconds, warm_seconds=None):
    result = {
        "algo": algo,
        "seed": seed,
        "budget": 100,
        "proxies": list(experiment.FITNESSES[fitness]),
        "vote": "hard",
        "best_arch": f"arch{seed}",
        "evaluations": 100,
        "seconds": seconds,
        "best_test_accuracy": {"cifar10": cifar10, "cifar100": 70.0, "imagenet16_120": 40.0},
    }
    folder = out / experiment.search_name(algo, fitness, seed)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "stats.json").write_text(json.dumps({"scored": 90 - seed, "hits": 10 + seed}))
    if warm_seconds is not None:
        (out / "warm" / folder.name).mkdir(parents=True)
        warm = result | {"seconds": warm_seconds}
        (out / "warm" / folder.name / "result.json").write_text(json.dumps(warm))


def test_aggregate_and_markdown_table(tmp_path):
    for seed, (acc, cold, warm) in enumerate([(93.0, 200.0, 1.0), (94.0, 100.0, 3.0)]):
        write_result(tmp_path, "evolution", "vote", seed, acc, cold, warm)
    write_result(tmp_path, "random", "wrcor", 0, 91.5, 50.0)  # no warm run yet
    records = experiment.collect(tmp_path, ["wrcor", "vote"], ["random", "evolution"], [0, 1, 2])
    rows = experiment.aggregate(records)
    assert [(r["algo"], r["fitness"]) for r in rows] == [("random", "wrcor"), ("evolution", "vote")]
    evo = rows[1]
    assert evo["seeds"] == [0, 1]
    assert evo["accuracy"]["cifar10"]["mean"] == pytest.approx(93.5)
    assert evo["accuracy"]["cifar10"]["std"] == pytest.approx(math.sqrt(0.5))  # n - 1
    assert evo["accuracy"]["cifar100"] == {"mean": 70.0, "std": 0.0, "n": 2}
    assert evo["cold_seconds"]["mean"] == 150 and evo["warm_seconds"]["mean"] == 2
    assert evo["scored_per_search"]["mean"] == 89.5
    assert rows[0]["warm_seconds"] == {"mean": None, "std": None, "n": 0}
    assert rows[0]["accuracy"]["cifar10"]["std"] == 0.0

    table = experiment.markdown_table(rows).splitlines()
    assert table[0].startswith("| Algorithm | Fitness | CIFAR-10 (%) | CIFAR-100 (%) |")
    assert len({line.count("|") for line in table}) == 1
    assert table[1] == "|---|---|" + "---:|" * 8
    assert table[2] == (
        "| random | WRCor | 91.50 ± 0.00 | 70.00 ± 0.00 | 40.00 ± 0.00 | 50.0 | – | 100 | 90 | 1 |"
    )
    assert table[3] == (
        "| evolution | vote(synflow, jacob_cov, wrcor) | 93.50 ± 0.71 | 70.00 ± 0.00 | "
        "40.00 ± 0.00 | 150 | 2.0 | 100 | 90 | 2 |"
    )

    report = {"full_scale": False, "budget": 100, "seeds": [0, 1], "batch_size": 16}
    report |= {"score_seed": 42, "machine": "a CPU", "searches_finished": 12}
    report |= {"searches_planned": 12}
    assert experiment.caption(report).startswith("**Reduced scale.** NAS-Bench-201, budget 100")
    assert experiment.caption(report | {"full_scale": True}).startswith("NAS-Bench-201")
    partial = experiment.caption(report | {"full_scale": True, "searches_finished": 7})
    assert partial.startswith("**7 of 12 searches finished.** NAS-Bench-201")


def test_main_from_a_preloaded_cache(tmp_path, truth, capsys):
    """The whole script without scoring: the cache is preloaded with every architecture."""
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros(3))  # only hashed: no scorer is ever built
    everything = nb201.all_archs()
    scores = tmp_path / "scores.csv"
    proxies = ["wrcor", "synflow", "jacob_cov"]
    ResultsFile(scores, proxies, ["vote(synflow,jacob_cov,wrcor)"]).append(
        zip(map(nb201.arch_string, everything), toy_rows(everything, proxies), strict=True)
    )
    with scores.open("a") as f:
        f.write("|nor_conv_3x3~0|+|no")  # a row cut by a writer still running
    write_meta(scores, {"dataset": "cifar10", "seed": 42, "batch_size": 16, "data": str(data)})
    ground_truth = tmp_path / "truth.csv"
    with ground_truth.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "arch", "cifar10", "cifar100", "imagenet16_120", "unique_str"])
        for i, (arch, acc) in enumerate(truth.items()):
            writer.writerow([i, arch, *acc.values(), arch])
    args = ["--data", str(data), "--ground-truth", str(ground_truth), "--batch-size", "16"]
    args += ["--budget", "10", "--seeds", "1", "--out", str(tmp_path / "out"), "--quiet"]
    twice = ["--cache-preload", str(scores), "--cache-preload", str(scores)]
    report = experiment.main([*args, *twice])
    out = capsys.readouterr().out
    assert report["preloaded_scores"] == 3 * nb201.NUM_ARCHS  # the second adds nothing
    assert not report["full_scale"] and report["budget"] == 10 and report["seeds"] == [0]
    assert report["algo_options"]["evolution"] == {"population_size": 5, "tournament_size": 5}
    assert "--budget 10" in report["command"] and report["machine"]
    assert len(report["results"]) == 6
    for row in report["results"]:
        assert row["scored_per_search"]["mean"] == 0 and row["warm_scored_total"] == 0
        assert row["accuracy"]["cifar10"]["n"] == 1
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 6 and out.startswith("**Reduced scale.**")
    # The random searches' draws, a uniform sample, give each proxy's rank correlation.
    drawn = report["drawn_correlations"]
    assert set(drawn) == {"wrcor", "synflow", "jacob_cov"}
    with (tmp_path / "out" / "random_wrcor_0" / "history.csv").open(newline="") as f:
        archs = {row["arch"] for row in csv.DictReader(f)}
    assert drawn["wrcor"]["n"] == len(archs) and drawn["wrcor"]["spearman_ci"][0] <= 1
    assert "the random searches drew (a uniform sample)" in out

    # --report-only runs nothing; over more seeds than finished it says so.
    (tmp_path / "out" / "report.json").unlink()
    only = experiment.main([*args, "--seeds", "2", "--report-only"])  # the last --seeds wins
    assert (only["searches_finished"], only["searches_planned"]) == (6, 12)
    assert only["results"] == report["results"] and only["preloaded_scores"] is None
    assert not (tmp_path / "out" / "random_wrcor_1").exists()
    assert capsys.readouterr().out.startswith("**Reduced scale.** **6 of 12 searches finished.**")

    write_meta(scores, {"dataset": "cifar10", "seed": 0, "batch_size": 16, "data": str(data)})
    with pytest.raises(ValueError, match="another seed"):
        experiment.main([*args, "--cache-preload", str(scores)])


def test_machine_names_the_accelerator_jax_scores_on(monkeypatch):
    import types

    import jax

    assert "JAX on" not in experiment.machine(with_load=False)  # the CPU: nothing to add
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    h200 = types.SimpleNamespace(device_kind="NVIDIA H200")
    monkeypatch.setattr(jax, "devices", lambda: [h200])
    assert experiment.machine(with_load=False).endswith(", JAX on 1 x NVIDIA H200")
