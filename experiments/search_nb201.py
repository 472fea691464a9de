"""Benchmark: random, evolution and REINFORCE searches of NB201 with WRCor and a hard vote.

Runs every algorithm x fitness x seed at one budget on the CIFAR-10 proxy batch, each search
in OUT/<algo>_<fitness>_<seed>/ (history.csv, result.json), then reports the found
architectures' NB201 test accuracies (mean and std over seeds) on CIFAR-10, CIFAR-100 and
ImageNet16-120, and the search wall time with a cold and with a warm score cache. Below the
table: each proxy's rank correlation over the distinct architectures the random searches
drew, a uniform sample of the space that was scored anyway.

- fitness `wrcor`: WRCor alone; `vote`: the hard vote of synflow, jacob_cov and wrcor.
- One score cache (OUT/cache unless --cache-dir), keyed by the scoring configuration, serves
  all searches. It stores each proxy in its own file, so the vote searches and the WRCor
  searches share one table of WRCor values, and an architecture is scored only for the
  proxies the cache lacks: a vote search computes just synflow and jacob_cov for what the
  WRCor searches (run first) met. --cache-preload fills the cache from a `wrcor-jax score`
  file of this configuration (several files: repeat the option).
- Cold = the first pass: each search's time as recorded in its result.json (scorer set-up
  and compilation included for the first search of each fitness that scores anything;
  later searches find what earlier ones scored). Warm = the same searches run again into
  OUT/warm/ once the cache holds every architecture they meet: search overhead only.
  stats.json beside each result.json says how many evaluations were scored and how many
  came from the cache. The three algorithms draw their first random architectures from the
  same seeded generator, so with one seed evolution's initial population and REINFORCE's
  warm-up are the first draws of random search: cache hits in the first pass.
- Resumable: a finished search (result.json at this budget) is skipped, an unfinished one
  continues from its history.csv; a warm run that did not finish is redone from scratch.
  --report-only runs nothing and tabulates the searches finished so far (a run still
  going, or runs made into one OUT with different --fitnesses or --seeds); the caption
  says how many of the planned searches that is.
- Small budgets: evolution's population (64) and REINFORCE's warm-up (100) are capped at
  half the budget, and the tournament (10) at the population, so every search spends at
  least half its budget on evolution steps or policy updates; the settings used are in the
  report.

    python experiments/search_nb201.py --data ../shared/data/cifar10_sample.npz \\
        --ground-truth ../shared/data/nb201_test_accuracy.csv --budget 1000 --seeds 5 \\
        --out results/search_nb201 [--cache-preload full_space.csv]

The markdown table goes to stdout (and OUT/table.md), the report to OUT/report.json;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wrcor_jax import allocator
from wrcor_jax.benchmarks.machine import cpu_model, jax_devices
from wrcor_jax.benchmarks.nb201 import DATASETS, evaluate_table
from wrcor_jax.jsonio import write_json
from wrcor_jax.search import ALGORITHMS, CachedFitness, Fitness, ScoreCache
from wrcor_jax.search.core import History
from wrcor_jax.spaces import Space

FITNESSES = {"wrcor": ("wrcor",), "vote": ("synflow", "jacob_cov", "wrcor")}
FITNESS_LABELS = {"wrcor": "WRCor", "vote": "vote(synflow, jacob_cov, wrcor)"}
DATASET_LABELS = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "imagenet16_120": "ImageNet16-120",
}
FULL_SCALE = {"budget": 1000, "seeds": 5, "batch_size": 64}
POPULATION, TOURNAMENT, WARMUP = 64, 10, 100  # SPEC 7


def search_name(algo: str, fitness: str, seed: int) -> str:
    return f"{algo}_{fitness}_{seed}"


def algo_options(
    algo: str,
    budget: int,
    population: int = POPULATION,
    tournament: int = TOURNAMENT,
    warmup: int = WARMUP,
) -> dict[str, int]:
    """The algorithm's settings at this budget: population and warm-up capped at half the
    budget (at least 1), the tournament at the population."""
    half = max(1, budget // 2)
    if algo == "evolution":
        population = min(population, half)
        return {"population_size": population, "tournament_size": min(tournament, population)}
    if algo == "reinforce":
        return {"warmup": min(warmup, half)}
    return {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(
    out_dir: Path,
    budget: int,
    fitness: Fitness,
    options: Mapping[str, Any],
    space: Space | None = None,
) -> bool:
    """Whether `out_dir` holds this search finished at `budget` (in `space`, when given;
    anything else is run, and the search API resumes it or refuses a folder of another
    search)."""
    result = _read_json(out_dir / "result.json")
    identity = _read_json(out_dir / "search.json")
    if result is None or identity is None or result.get("budget") != budget:
        return False
    if space is not None and identity.get("space") != {"name": space.name, **space.options()}:
        return False
    short = {"population_size": "population", "tournament_size": "tournament"}
    recorded = identity.get("options", {})
    return (
        identity.get("fitness") == fitness.identity
        and identity.get("proxies") == list(fitness.proxies)
        and all(recorded.get(short.get(k, k)) == v for k, v in options.items())
    )


def _counts(fitness: Fitness) -> tuple[int, int]:
    return getattr(fitness, "scored", 0), getattr(fitness, "hits", 0)


def run_one(
    algo: str,
    fitness: Fitness,
    budget: int,
    seed: int,
    out_dir: Path,
    options: Mapping[str, Any],
    truth: Mapping[str, Any] | None,
    *,
    fresh: bool = False,
    progress: bool = False,
    space: Space | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Run (or resume) one search unless it is finished; returns (ran, result.json).

    stats.json accumulates the evaluations scored and those served by the cache, over all
    the runs that made the search (`fresh` removes the folder first). `space` is the one
    searched (by default the fitness's, as the search API decides)."""
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    if is_finished(out_dir, budget, fitness, options, space):
        return False, json.loads((out_dir / "result.json").read_text())
    scored, hits = _counts(fitness)
    try:
        result = ALGORITHMS[algo](
            fitness,
            budget,
            seed,
            out_dir,
            vote="hard",
            ground_truth=truth,
            progress=progress,
            space=space,
            **options,
        )
    finally:
        if out_dir.exists():
            stats = _read_json(out_dir / "stats.json") or {"scored": 0, "hits": 0}
            now_scored, now_hits = _counts(fitness)
            stats["scored"] += now_scored - scored
            stats["hits"] += now_hits - hits
            write_json(out_dir / "stats.json", stats)
    return True, result.as_dict()


def run_all(
    fitnesses: Mapping[str, Fitness],
    algos: Sequence[str],
    seeds: Sequence[int],
    budget: int,
    out: Path,
    truth: Mapping[str, Any] | None,
    *,
    warm: bool = True,
    warm_fitnesses: Mapping[str, Fitness] | None = None,
    options: Callable[[str, int], dict[str, Any]] = algo_options,
    progress: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Every search (fitness by fitness, then algorithm, then seed) in OUT/<name>/; then,
    with `warm`, each again in OUT/warm/<name>/ with `warm_fitnesses` (default: the same
    fitnesses), whose cache by then holds everything the searches meet."""
    plan = [(f, a, s) for f in fitnesses for a in algos for s in seeds]
    passes = [("cold", out, fitnesses)]
    if warm:
        passes.append(("warm", out / "warm", warm_fitnesses or fitnesses))
    for label, root, pass_fitnesses in passes:
        for i, (name, algo, seed) in enumerate(plan, 1):
            fitness = pass_fitnesses[name]
            directory = root / search_name(algo, name, seed)
            settings = options(algo, budget)
            tag = f"[{label} {i}/{len(plan)}] {algo} {name} seed {seed}"
            if label == "warm":
                cold = _read_json(out / search_name(algo, name, seed) / "result.json") or {}
                warm_result = _read_json(directory / "result.json") or {}
                same = {k: warm_result.get(k) for k in ("best_arch", "budget")} == {
                    k: cold.get(k) for k in ("best_arch", "budget")
                }
                redo = not same  # an unfinished or outdated warm run is timed afresh
            else:
                redo = False
            scored, hits = _counts(fitness)
            ran, result = run_one(
                algo,
                fitness,
                budget,
                seed,
                directory,
                settings,
                truth,
                fresh=redo,
                progress=progress,
            )
            if not ran:
                log(f"{tag}: done before, skipped")
                continue
            new_scored, new_hits = _counts(fitness)
            accuracy = result.get("best_test_accuracy") or {}
            acc = " ".join(f"{d} {accuracy[d]:.2f}" for d in DATASETS if d in accuracy)
            log(
                f"{tag}: {result['best_arch']} {acc} in {result['seconds']:.1f} s "
                f"({new_scored - scored} scored, {new_hits - hits} from the cache)"
            )


def collect(
    out: Path, fitnesses: Sequence[str], algos: Sequence[str], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """One record per finished search: its result.json with its stats and its warm run's."""
    records = []
    for name in fitnesses:
        for algo in algos:
            for seed in seeds:
                folder = search_name(algo, name, seed)
                result = _read_json(out / folder / "result.json")
                if result is None:
                    continue
                record = {"fitness": name, "dir": folder, **result}
                record["stats"] = _read_json(out / folder / "stats.json")
                warm = _read_json(out / "warm" / folder / "result.json")
                if warm is not None and warm.get("best_arch") == result["best_arch"]:
                    record["warm_seconds"] = warm["seconds"]
                    record["warm_stats"] = _read_json(out / "warm" / folder / "stats.json")
                records.append(record)
    return records


def drawn_correlations(
    out: Path,
    fitnesses: Sequence[str],
    seeds: Sequence[int],
    truth: Mapping[str, Any],
    bootstrap: int = 1000,
) -> dict[str, dict[str, Any]]:
    """Each proxy's rank correlation with CIFAR-10 test accuracy over the distinct
    architectures the finished random searches drew: a uniform sample of the space, scored
    on the way (Kendall, Spearman, n, 95% bootstrap intervals)."""
    drawn: dict[str, dict[str, float]] = {}
    for name in fitnesses:
        for seed in seeds:
            folder = out / search_name("random", name, seed)
            if _read_json(folder / "result.json") is None:
                continue
            for record in History(folder / "history.csv", FITNESSES[name]).read():
                for proxy, score in zip(FITNESSES[name], record.scores, strict=True):
                    drawn.setdefault(proxy, {})[record.arch] = score
    report = {}
    for proxy, scores in drawn.items():
        accuracies = [truth[arch]["cifar10"] for arch in scores]
        values = {proxy: np.array(list(scores.values()))}
        report |= evaluate_table(accuracies, values, bootstrap=bootstrap)
    return report


def drawn_line(correlations: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence for below the table."""
    parts = [
        f"{proxy} {r['spearman']:.3f} [{r['spearman_ci'][0]:.3f}, {r['spearman_ci'][1]:.3f}] "
        f"(n = {r['n']})"
        for proxy, r in correlations.items()
    ]
    return (
        "Spearman rho with CIFAR-10 test accuracy over the distinct architectures the random "
        "searches drew (a uniform sample), 95% bootstrap CI: " + "; ".join(parts) + "."
    )


def _mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1; 0 for one value); None when empty."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (algo, fitness), in first-seen order: accuracy mean/std per dataset over seeds,
    mean cold and warm search seconds, evaluations and cache use per search."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["algo"], record["fitness"]), []).append(record)
    rows = []
    for (algo, fitness), group in groups.items():
        accuracies = [r["best_test_accuracy"] for r in group if r.get("best_test_accuracy")]
        warm = [r["warm_seconds"] for r in group if "warm_seconds" in r]
        stats = [r["stats"] for r in group if r.get("stats")]
        warm_stats = [r["warm_stats"] for r in group if r.get("warm_stats")]
        rows.append(
            {
                "algo": algo,
                "fitness": fitness,
                "proxies": list(group[0]["proxies"]),
                "seeds": sorted(r["seed"] for r in group),
                "accuracy": {d: _mean_std([a[d] for a in accuracies]) for d in DATASETS},
                "cold_seconds": _mean_std([r["seconds"] for r in group]),
                "warm_seconds": _mean_std(warm),
                "evaluations": _mean_std([r["evaluations"] for r in group]),
                "scored_per_search": _mean_std([s["scored"] for s in stats]),
                "cache_hits_per_search": _mean_std([s["hits"] for s in stats]),
                "warm_scored_total": sum(s["scored"] for s in warm_stats),
                "best_archs": [r["best_arch"] for r in group],
            }
        )
    return rows


def _cell(stat: Mapping[str, Any], digits: int = 2, std: bool = True) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    return f"{text} ± {stat['std']:.{digits}f}" if std else text


def _seconds(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "–"
    digits = 0 if stat["mean"] >= 100 else 1 if stat["mean"] >= 1 else 2
    return _cell(stat, digits, std=False)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a markdown table (accuracy mean ± std over seeds; mean times)."""
    header = [
        "Algorithm",
        "Fitness",
        *(f"{DATASET_LABELS[d]} (%)" for d in DATASETS),
        "Search time, cold (s)",
        "Search time, warm (s)",
        "Evaluations",
        "Scored (cold)",
        "Seeds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [
            row["algo"],
            FITNESS_LABELS.get(row["fitness"], row["fitness"]),
            *(_cell(row["accuracy"][d]) for d in DATASETS),
            _seconds(row["cold_seconds"]),
            _seconds(row["warm_seconds"]),
            _cell(row["evaluations"], 0, std=False),
            _cell(row["scored_per_search"], 0, std=False),
            str(len(row["seeds"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(report: Mapping[str, Any]) -> str:
    """What the table shows and at which scale, for the line above it."""
    scale = "" if report["full_scale"] else "**Reduced scale.** "
    finished, planned = report["searches_finished"], report["searches_planned"]
    if finished < planned:
        scale += f"**{finished} of {planned} searches finished.** "
    return (
        f"{scale}NAS-Bench-201, budget {report['budget']} evaluations, seeds "
        f"{report['seeds']}, proxies on {report['batch_size']} CIFAR-10 training images "
        f"(score seed {report['score_seed']}). Test accuracy of the architecture found: "
        "mean ± std (n - 1) over seeds. Search time: mean wall seconds per search; cold = "
        "first pass (the shared cache fills as the searches go; set-up and compilation in "
        "the first search of each fitness), warm = every evaluation from the cache. "
        f"Scored = evaluations per search not found in the cache. {report['machine']}."
    )


def write_report(out: Path, report: dict[str, Any], table: str) -> dict[str, Any]:
    """report.json, and table.md with the caption over the table, also printed."""
    write_json(out / "report.json", report)
    (out / "table.md").write_text(f"{report['caption']}\n\n{table}\n")
    print(f"{report['caption']}\n\n{table}")
    print(f"report: {out / 'report.json'}", file=sys.stderr)
    return report


def machine(with_load: bool = True) -> str:
    """CPU model and core count, the accelerators JAX scores on if any (and the load when the
    experiment started)."""
    import jax

    where = f"{cpu_model()}, {os.cpu_count()} cores"
    if jax.default_backend() != "cpu":
        where += f", JAX on {jax_devices()}"
    if not with_load:
        return where
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return f"{where}, load {load:.1f} at start"


def check_preload(path: str, key: Mapping[str, Any]) -> None:
    """Refuse a score file whose sidecar says it was scored with another configuration than
    the cache `key` (dataset, seed, batch size, data content); without a sidecar, trust it."""
    from wrcor_jax.results import read_meta
    from wrcor_jax.scoring import ScoreConfig
    from wrcor_jax.search import score_key

    meta = read_meta(path)
    if meta is None:
        print(f"note: {path} has no sidecar; trusting its configuration", file=sys.stderr)
        return
    differ = [k for k in ("dataset", "seed", "batch_size") if k in meta and meta[k] != key[k]]
    if meta.get("data"):
        try:
            data = score_key(ScoreConfig(data=meta["data"]))["data"]
        except ValueError:
            print(f"note: cannot read {meta['data']} to check {path}", file=sys.stderr)
            data = key["data"]
    else:
        data = f"tfds:{meta.get('data_dir') or ''}"
    if data != key["data"]:
        differ.append("data")
    if differ:
        raise ValueError(f"{path} was scored with another {', '.join(differ)}: {meta}")


def build_fitnesses(
    args: argparse.Namespace,
) -> tuple[dict[str, CachedFitness], dict[str, CachedFitness], ScoreCache, dict[str, float]]:
    """The cached fitnesses of the first pass and of the warm pass, on one ScoreCache; the
    set-up seconds of each fitness's scorer once built."""
    from wrcor_jax.scoring import NB201Scorer, ScoreConfig
    from wrcor_jax.search import score_key

    configs = {
        name: ScoreConfig(
            dataset="cifar10",
            proxies=FITNESSES[name],
            seed=args.score_seed,
            batch_size=args.batch_size,
            data=args.data,
            data_dir=args.data_dir,
            workers=args.workers,
        )
        for name in args.fitnesses
    }
    cache = ScoreCache(score_key(next(iter(configs.values()))), args.cache_dir)
    setup: dict[str, float] = {}
    scorers: dict[str, NB201Scorer] = {}

    def maker(name: str) -> Callable[[], NB201Scorer]:
        def make() -> NB201Scorer:
            if name not in scorers:
                t0 = time.perf_counter()
                scorers[name] = NB201Scorer(configs[name])
                setup[name] = time.perf_counter() - t0
            return scorers[name]

        return make

    cold = {name: CachedFitness(cache, FITNESSES[name], maker(name)) for name in configs}
    warm = {name: CachedFitness(cache, FITNESSES[name], maker(name)) for name in configs}
    return cold, warm, cache, setup


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CIFAR-10 .npz (format of shared/data); default: tfds")
    parser.add_argument("--data-dir", help="tfds data_dir")
    parser.add_argument("--ground-truth", required=True, help="NAS-Bench-201 accuracy CSV")
    parser.add_argument("--budget", type=int, default=FULL_SCALE["budget"])
    parser.add_argument("--seeds", type=int, default=FULL_SCALE["seeds"], help="seeds 0..S-1")
    parser.add_argument("--algos", default="random,evolution,reinforce")
    parser.add_argument("--fitnesses", default="wrcor,vote", help="wrcor and/or vote")
    parser.add_argument("--batch-size", type=int, default=FULL_SCALE["batch_size"])
    parser.add_argument("--score-seed", type=int, default=42, help="init and batch seed")
    parser.add_argument("--workers", type=int, default=2, help="archs in flight (composed)")
    parser.add_argument("--population", type=int, default=POPULATION)
    parser.add_argument("--tournament", type=int, default=TOURNAMENT)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="REINFORCE warm-up")
    parser.add_argument("--cache-dir", help="score cache (default OUT/cache)")
    parser.add_argument(
        "--cache-preload",
        action="append",
        default=[],
        help="`wrcor-jax score` CSV of this configuration (repeatable)",
    )
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache pass")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: tabulate the searches of OUT finished so far",
    )
    parser.add_argument("--out", default="results/search_nb201")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    args.fitnesses = [f.strip() for f in args.fitnesses.split(",") if f.strip()]
    unknown = [a for a in args.algos if a not in ALGORITHMS] + [
        f for f in args.fitnesses if f not in FITNESSES
    ]
    if unknown or not args.algos or not args.fitnesses:
        parser.error(f"unknown or no algorithm/fitness: {unknown}")
    if args.budget < 1 or args.seeds < 1:
        parser.error("--budget and --seeds must be positive")
    args.cache_dir = args.cache_dir or str(Path(args.out) / "cache")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment; print the table; write and return the report."""
    from wrcor_jax.benchmarks.nb201 import load_ground_truth
    from wrcor_jax.compilation import CompileCounter

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/search_nb201.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    started, where = time.perf_counter(), machine(with_load=not args.report_only)
    truth = load_ground_truth(args.ground_truth)
    cold, warm, cache, setup = build_fitnesses(args)
    preloaded = None
    for path in [] if args.report_only else args.cache_preload:
        check_preload(path, cache.key)
        added = cache.preload(path)
        preloaded = (preloaded or 0) + added
        print(f"preloaded {added} scores from {path}", file=sys.stderr)
    seeds = list(range(args.seeds))

    def options(algo: str, budget: int) -> dict[str, int]:
        return algo_options(algo, budget, args.population, args.tournament, args.warmup)

    if not args.report_only:
        run_all(
            cold,
            args.algos,
            seeds,
            args.budget,
            out,
            truth,
            warm=not args.no_warm,
            warm_fitnesses=warm,
            options=options,
            progress=not args.quiet,
        )
    records = collect(out, args.fitnesses, args.algos, seeds)
    planned = len(args.fitnesses) * len(args.algos) * len(seeds)
    rows = aggregate(records)
    drawn = drawn_correlations(out, args.fitnesses, seeds, truth) if "random" in args.algos else {}
    report = {
        "command": command,
        "machine": where,
        "budget": args.budget,
        "seeds": seeds,
        "batch_size": args.batch_size,
        "score_seed": args.score_seed,
        "full_scale": {"budget": args.budget, "seeds": args.seeds, "batch_size": args.batch_size}
        == FULL_SCALE
        and len(args.algos) == len(ALGORITHMS)
        and len(args.fitnesses) == len(FITNESSES),
        "searches_finished": len(records),
        "searches_planned": planned,
        "data": args.data or f"tfds:{args.data_dir or ''}",
        "fitnesses": {name: list(FITNESSES[name]) for name in args.fitnesses},
        "vote": "hard",
        "algo_options": {a: options(a, args.budget) for a in args.algos},
        "cache": {"dir": str(cache.directory), "key": cache.key, "preload": args.cache_preload},
        "preloaded_scores": preloaded,
        "scorer_setup_s_this_run": {k: round(v, 2) for k, v in setup.items()},
        "compilations_this_run": {
            "count": CompileCounter.count,
            "seconds": round(CompileCounter.seconds, 2),
        },
        "wall_s_this_run": round(time.perf_counter() - started, 1),
        "results": rows,
        "drawn_correlations": drawn,
    }
    report["caption"] = caption(report)
    table = markdown_table(rows) + (f"\n\n{drawn_line(drawn)}" if drawn else "")
    return write_report(out, report, table)


if __name__ == "__main__":
    allocator.reexec_tuned()  # as the command line does: docs/timing.md
    main()
