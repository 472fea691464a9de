"""Experiment: the paper's ImageNet search, evolution with the hard vote of synflow, jacob_cov
and WRCor in the MobileNetV2 space under 600M FLOPs (SPEC 7, 8), set beside EA_our_vote_600M.

One regularized evolution per seed (population 64, tournament 10, both capped at half the
budget for small budgets as in search_nb201.py) in OUT/evolution_vote_<seed>/ (history.csv,
result.json), on the proxy batch of --dataset (default imagenet2012 from tfds in --data-dir;
--data PATH.npz for local images), one score cache (OUT/cache unless --cache-dir) for all.
The report holds the command, the machine, the wall time, and per search the architecture
found (FLOPs and parameters of the 1000-class network), its proxy scores, the seconds per
evaluation, and the paper's EA_our_vote_600M scored on the same batch, with where the
search's vote ranks it among the architectures the search evaluated (result.json's
`landmarks`). Resumable: a finished search is skipped, an unfinished one continues, and
the compiled pieces are reloaded from the persistent compilation cache (as `wrcor-jax`'s).

    python experiments/search_mbv2.py --data-dir ~/tensorflow_datasets --budget 5000 \\
        --out results/search_mbv2

At toy size (seconds), e.g. the cost proxies on the CIFAR-10 sample:

    python experiments/search_mbv2.py --proxies params,flops --budget 20 --dataset cifar10 \\
        --data ../shared/data/cifar10_sample.npz --out /tmp/search_mbv2

The markdown table goes to stdout (and OUT/table.md), the report to OUT/report.json;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from search_nb201 import algo_options, machine, run_one, write_report

from wrcor_jax import allocator
from wrcor_jax.cli import add_compile_cache_options, parse_count, use_compile_cache
from wrcor_jax.scoring import ScoreConfig
from wrcor_jax.search import cached_fitness
from wrcor_jax.spaces import get_space
from wrcor_jax.spaces.mbv2.precompile import precompile
from wrcor_jax.spaces.mbv2.space import DEFAULT_FLOPS_LIMIT, MBV2Space

VOTE = ("synflow", "jacob_cov", "wrcor")
LANDMARK = "EA_our_vote_600M"
FULL_SCALE = {"budget": 5000, "proxies": VOTE, "dataset": "imagenet1k", "batch_size": 64}
"""The reference README's search: `--N 5000` on an ImageNet batch of 64."""


def search_name(seed: int) -> str:
    return f"evolution_vote_{seed}"


def summary(result: Mapping[str, Any], stats: Mapping[str, int]) -> dict[str, Any]:
    """What the report keeps of one search's result.json (and its stats.json)."""
    scores = dict(zip(result["proxies"], result["best_scores"], strict=True))
    return {
        "seed": result["seed"],
        "best_arch": result["best_arch"],
        "resolution": result["resolution"],
        "flops": result["flops"],
        "params": result["params"],
        "scores": scores,
        "evaluations": result["evaluations"],
        "seconds": result["seconds"],
        "seconds_per_evaluation": result["seconds"] / result["evaluations"],
        "scored": stats["scored"],
        "cache_hits": stats["hits"],
        "landmark": result["landmarks"][LANDMARK],
    }


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def _score(value: float) -> str:
    return f"{value:.4g}"


def markdown_table(searches: Sequence[Mapping[str, Any]], proxies: Sequence[str]) -> str:
    """One row per search's architecture, then EA_our_vote_600M on the same batch."""
    header = ["Architecture", "Res.", "FLOPs", "Params", *proxies, "Vote rank", "Search (s)"]
    header.append("s / eval")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for s in searches:
        cells = [f"found, seed {s['seed']}", str(s["resolution"]), _millions(s["flops"])]
        cells += [_millions(s["params"]), *(_score(s["scores"][p]) for p in proxies), "best"]
        cells += [f"{s['seconds']:.1f}", f"{s['seconds_per_evaluation']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for s in searches:
        landmark = s["landmark"]
        name = f"{LANDMARK} (seed {s['seed']}'s batch)" if len(searches) > 1 else LANDMARK
        cells = [name, str(landmark["resolution"]), _millions(landmark["flops"])]
        cells.append(_millions(landmark["params"]))
        if "rank" in landmark:
            cells += [_score(v) for v in landmark["scores"]]
            rank = f"{landmark['rank']} of {landmark['of'] + 1}"
            cells.append(rank + (", beats found" if landmark["beats_found"] else ""))
        else:
            cells += ["–"] * len(proxies) + [f"outside: {landmark['outside']}"]
        lines.append("| " + " | ".join([*cells, "–", "–"]) + " |")
    lines.append("")
    lines += [f"- found, seed {s['seed']}: `{s['best_arch']}`" for s in searches]
    lines.append(f"- {LANDMARK}: `{searches[0]['landmark']['arch']}`")
    return "\n".join(lines)


def caption(report: Mapping[str, Any]) -> str:
    """What the table shows and at which scale, for the line above it."""
    scale = "" if report["full_scale"] else "**Reduced scale.** "
    options = report["algo_options"]
    return (
        f"{scale}MobileNetV2 space, FLOPs <= {_millions(report['flops_limit'])} (1000 "
        f"classes), regularized evolution (population {options['population_size']}, "
        f"tournament {options['tournament_size']}), hard vote of "
        f"{', '.join(report['proxies'])}, budget {report['budget']} evaluations, seeds "
        f"{report['seeds']}; proxies on {report['batch_size']} {report['dataset']} training "
        f"images (score seed {report['score_seed']}). Vote rank: where the search's "
        "comparison puts the architecture among the distinct ones the search evaluated and "
        "itself (1 + how many of them beat it by the pairwise majority). Search: wall "
        f"seconds (set-up and compilation included). {report['machine']}."
    )


def run_precompile(space: MBV2Space, config: ScoreConfig, args: argparse.Namespace) -> dict:
    """Compile the pieces of `--precompile` architectures sampled from the space (seeded by
    the score seed) into the compilation cache; what `precompile` reports."""
    archs = space.sample(np.random.default_rng(args.score_seed), args.precompile)

    def progress(done: int, total: int) -> None:
        if not args.quiet and (done % 10 == 0 or done == total):
            print(f"precompile: {done}/{total} architectures walked", file=sys.stderr)

    report = precompile(space.scorer(config), archs, args.compile_workers, progress)
    print(f"precompile: {report}", file=sys.stderr)
    return dataclasses.asdict(report)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, required=True, help="evaluations per search")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..S-1")
    parser.add_argument("--proxies", default=",".join(VOTE), help="the vote's proxies")
    parser.add_argument("--flops-limit", default=str(DEFAULT_FLOPS_LIMIT), help="e.g. 600M")
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--tournament", type=int, default=10)
    parser.add_argument("--dataset", default="imagenet2012")
    parser.add_argument("--data", help="local .npz of training images (default: tfds)")
    parser.add_argument("--data-dir", help="tfds data_dir")
    parser.add_argument("--batch-size", type=int, default=FULL_SCALE["batch_size"])
    parser.add_argument("--score-seed", type=int, default=42, help="init and batch seed")
    parser.add_argument("--cache-dir", help="score cache (default OUT/cache)")
    parser.add_argument("--out", default="results/search_mbv2")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--precompile",
        type=int,
        default=0,
        metavar="N",
        help="first compile into the compilation cache the pieces N sampled architectures "
        "run (on an accelerator a search otherwise waits on every new piece's compilation)",
    )
    parser.add_argument("--compile-workers", type=int, help="compiler threads (default: cores)")
    add_compile_cache_options(parser)
    args = parser.parse_args(argv)
    args.proxies = tuple(p.strip() for p in args.proxies.split(",") if p.strip())
    if args.budget < 1 or args.seeds < 1 or not args.proxies:
        parser.error("--budget and --seeds must be positive, --proxies not empty")
    if args.precompile < 0 or (args.precompile and args.no_compile_cache):
        parser.error("--precompile takes a count >= 0 and needs the compilation cache")
    args.cache_dir = args.cache_dir or str(Path(args.out) / "cache")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the searches; print the table; write and return the report."""
    from wrcor_jax.data import get_dataset_info

    args = parse_args(argv)
    command = "python experiments/search_mbv2.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    use_compile_cache(args)
    started, where = time.perf_counter(), machine()
    space = get_space("mbv2", flops_limit=parse_count(args.flops_limit))
    config = ScoreConfig(
        space="mbv2",
        dataset=args.dataset,
        proxies=args.proxies,
        seed=args.score_seed,
        batch_size=args.batch_size,
        data=args.data,
        data_dir=args.data_dir,
    )
    compiled_ahead = run_precompile(space, config, args) if args.precompile else None
    fitness = cached_fitness(config, args.cache_dir)
    settings = algo_options("evolution", args.budget, args.population, args.tournament)
    out, searches = Path(args.out), []
    for seed in range(args.seeds):
        folder = out / search_name(seed)
        ran, result = run_one(
            "evolution",
            fitness,
            args.budget,
            seed,
            folder,
            settings,
            None,
            progress=not args.quiet,
            space=space,
        )
        stats = json.loads((folder / "stats.json").read_text())
        searches.append(summary(result, stats) | {"dir": folder.name, "ran": ran})
        print(f"seed {seed}: {result['best_arch']} in {result['seconds']:.1f} s", file=sys.stderr)
    dataset = get_dataset_info(args.dataset).name
    report = {
        "command": command,
        "machine": where,
        "wall_s_this_run": round(time.perf_counter() - started, 1),
        "budget": args.budget,
        "seeds": list(range(args.seeds)),
        "proxies": list(args.proxies),
        "vote": "hard",
        "flops_limit": space.flops_limit,
        "algo_options": settings,
        "dataset": dataset,
        "data": args.data or f"tfds:{args.data_dir or ''}",
        "batch_size": args.batch_size,
        "score_seed": args.score_seed,
        "full_scale": {
            "budget": args.budget,
            "proxies": args.proxies,
            "dataset": dataset,
            "batch_size": args.batch_size,
        }
        == FULL_SCALE
        and space.flops_limit == DEFAULT_FLOPS_LIMIT,
        "cache": {"dir": str(fitness.cache.directory), "key": fitness.cache.key},
        "precompile": compiled_ahead,
        "searches": searches,
    }
    report["caption"] = caption(report)
    return write_report(out, report, markdown_table(searches, args.proxies))


if __name__ == "__main__":
    allocator.reexec_tuned()  # as the command line does: docs/timing.md
    main()
