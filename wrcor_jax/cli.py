"""`wrcor-jax`: score, search, describe and train architectures; evaluate scores on NB201.

    wrcor-jax score --space nb201 --dataset cifar10 --data PATH.npz --sample 1000 \\
        --proxies 'wrcor,act_cor,vote(wrcor,act_cor,act_grad_cor)' --seed 42 \\
        --batch-size 64 --out results.csv \\
        [--coordinator HOST:PORT --num-processes N --process-id I | --distributed auto]
    wrcor-jax merge results.csv.part-0-of-2 results.csv.part-1-of-2 --out results.csv \\
        [--proxies 'wrcor,act_cor,vote(wrcor,act_cor)']
    wrcor-jax evaluate results.csv --ground-truth nb201.csv --dataset cifar10 [--json] \\
        [--bootstrap 1000] [--plot ranks.png] [--scored-on cifar10]
    wrcor-jax search --space nb201 --algo evolution --proxies wrcor,act_cor --vote hard \
        --budget 1000 --seed 0 --dataset cifar10 --data PATH.npz --out DIR \
        [--ground-truth nb201.csv] [--cache-dir DIR] [--cache-preload results.csv]
    wrcor-jax describe --space mbv2 --arch 'SuperConvK3BNRELU(3,32,2,1)...@224' \
        [--num-classes 1000] [--json] [--check-ranges] [--flops-limit 600M]
    wrcor-jax train --space mbv2 --arch 'S@R' --dataset cifar10 --data PATH.npz --workdir DIR
        (and evaluate-checkpoint: see `wrcor_jax.train.cli`)

Errors are one line on stderr with a non-zero exit code; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from wrcor_jax import allocator, jsonio
from wrcor_jax.proxies import PROXIES, parse_proxies

# scoring.ENGINES, spelled out so that building the parser does not import the scoring stack
ENGINE_CHOICES = ("auto", "composed", "chunked", "vmap")

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def read_arch_file(path: str) -> list[str]:
    """The architecture texts of an `--archs` file: one per line, blank and `#` lines skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read --archs file {path}: {exc.strerror}") from None
    archs = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not archs:
        raise ValueError(f"--archs file {path} holds no architecture")
    return archs


_SI = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_count(text: str) -> int:
    """'600M', '1.5G', '600e6' or '600000000' -> an integer count (FLOPs, parameters)."""
    body = text.strip().upper()
    unit = body[-1] if body and body[-1] in _SI else ""
    try:
        value = float(body.removesuffix(unit)) * _SI[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a count (e.g. 600M, 1.5G, 600000000)") from None
    if value <= 0:
        raise ValueError(f"{text!r} must be positive")
    return round(value)


def _space(args: argparse.Namespace):
    """The --space of a command, with its --flops-limit when given."""
    from wrcor_jax.spaces import get_space

    limit = getattr(args, "flops_limit", None)
    return get_space(args.space, **({} if limit is None else {"flops_limit": parse_count(limit)}))


def _select_archs(args: argparse.Namespace) -> list[str]:
    space = _space(args)
    if args.archs:
        return read_arch_file(args.archs)
    if args.all:
        return space.enumerate()
    return space.draw(args.sample, args.sample_seed)


def _score_config(args: argparse.Namespace, proxies: Sequence[str], seed: int, **extra):
    """The ScoreConfig of `score` and `search`, from their shared options."""
    from wrcor_jax.scoring import ScoreConfig

    return ScoreConfig(
        space=args.space,
        dataset=args.dataset,
        proxies=tuple(proxies),
        seed=seed,
        batch_size=args.batch_size,
        data=args.data,
        data_dir=args.data_dir,
        engine=args.engine,
        workers=args.workers,
        **extra,
    )


def _score(args: argparse.Namespace) -> None:
    from wrcor_jax.scoring import score_archs
    from wrcor_jax.vote import parse_columns

    proxies, votes = parse_columns(args.proxies, PROXIES)
    config = _score_config(args, proxies, args.seed, chunk_size=args.chunk_size)
    use_compile_cache(args)
    cluster = join_job(args)
    if cluster is None:
        summary = score_archs(
            _select_archs(args), config, args.out, progress=not args.quiet, votes=votes
        )
        print(summary.line(), file=sys.stderr)
        return
    from wrcor_jax import distributed

    summary, outcome = distributed.score_share(
        _select_archs(args), config, args.out, cluster, not args.quiet, votes, args.wait_timeout
    )
    where = f"process {cluster.process_id} of {cluster.num_processes}"
    print(f"{where}: {summary.line()}\n{where}: {outcome}", file=sys.stderr)


def _merge(args: argparse.Namespace) -> None:
    from wrcor_jax.distributed import Part, merge_parts
    from wrcor_jax.vote import parse_columns

    proxies, votes = parse_columns(args.proxies, PROXIES) if args.proxies else (None, ())
    header = None if proxies is None else ["arch", *proxies]
    parts = [Part.read(path, header) for path in args.parts]
    rows = merge_parts(parts, args.out, votes)
    print(f"merged {rows} rows from {len(parts)} part(s) into {args.out}", file=sys.stderr)


def _batch_note(args: argparse.Namespace) -> str:
    """Which batch the scores were computed on, from --scored-on or the file's sidecar."""
    from wrcor_jax.benchmarks.nb201 import BenchmarkError, dataset_column
    from wrcor_jax.results import meta_path, read_meta

    def canonical(name: str) -> str:
        try:
            return dataset_column(name)
        except BenchmarkError:
            return name.strip().lower()

    meta = read_meta(args.results) or {}
    scored_on = args.scored_on or meta.get("dataset")
    if scored_on is None:
        return (
            f"the batch the scores were computed on is not recorded (no "
            f"{meta_path(args.results).name}); pass --scored-on DATASET"
        )
    batch = f"scores computed on the {canonical(scored_on)} batch"
    if not args.scored_on and "seed" in meta and "batch_size" in meta:
        batch += f" (seed {meta['seed']}, {meta['batch_size']} images)"
    if canonical(scored_on) != canonical(args.dataset):
        batch += f", evaluated against {canonical(args.dataset)} accuracy"
    return batch


def _evaluate(args: argparse.Namespace) -> None:
    from wrcor_jax.benchmarks.nb201 import evaluate_table, load_ground_truth, score_table

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    try:
        with open(args.results, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except OSError as exc:
        raise ValueError(f"cannot read results {args.results}: {exc.strerror}") from None
    columns = [c for c in reader.fieldnames or [] if c != "arch"]
    if not rows:
        raise ValueError(f"{args.results} holds no scored architecture")
    truth = load_ground_truth(args.ground_truth)
    accuracies, scores = score_table(rows, truth, args.dataset, columns)
    report = evaluate_table(accuracies, scores, args.bootstrap, args.bootstrap_seed)
    note = _batch_note(args)
    unfilled = [c for c, r in report.items() if r["n"] == 0 and "(" in c]
    if unfilled:
        note += f"; {', '.join(unfilled)} not filled yet (votes are, when a score run completes)"
    if args.plot:
        from wrcor_jax.plots import rank_scatter_grid

        title = f"{Path(args.results).name} vs {args.dataset} test accuracy\n{note}"
        rank_scatter_grid(accuracies, scores, report, args.plot, title=title)
    if args.json:
        print(note, file=sys.stderr)
        print(jsonio.dumps(report))
        return
    print(f"{args.dataset} test accuracy; {note}")
    if args.bootstrap:
        print(f"95% CIs: percentile bootstrap over architectures, {args.bootstrap} resamples")
    width = max(20, *map(len, report))
    print(
        f"{'column':<{width}} {'kendall':>8} {'95% CI':<16} {'spearman':>9} {'95% CI':<16} {'n':>6}"
    )
    for name, r in report.items():
        kendall_ci = _interval(r.get("kendall_ci"))
        spearman_ci = _interval(r.get("spearman_ci"))
        print(
            f"{name:<{width}} {r['kendall']:>8.3f} {kendall_ci:<16} "
            f"{r['spearman']:>9.3f} {spearman_ci:<16} {r['n']:>6d}"
        )


def _interval(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _search(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from wrcor_jax.benchmarks.nb201 import load_ground_truth
    from wrcor_jax.scoring import resolve_engine
    from wrcor_jax.search import cached_fitness

    cluster = join_job(args)
    space = _space(args)
    config = _score_config(args, parse_proxies(args.proxies), args.score_seed)
    if args.ground_truth and args.space != "nb201":
        raise ValueError(f"--ground-truth is NAS-Bench-201's; the {args.space} space has none")
    truth = load_ground_truth(args.ground_truth) if args.ground_truth else None
    use_compile_cache(args)
    # resolved here: the spaces' scorers take composed or vmap (search has no progress line)
    config = replace(config, engine=resolve_engine(config.engine))
    options = {}
    for flag, key, algo in _ALGO_OPTIONS:
        value = getattr(args, flag)
        if value is not None:
            if args.algo != algo:
                raise ValueError(f"--{flag} applies to --algo {algo} only")
            options[key] = value
    cache_dir, out = args.cache_dir, args.out
    if cluster is not None:  # process I > 0 writes below OUT (and CACHE_DIR), never beside 0
        from wrcor_jax.distributed import search_dir

        where = (cluster.process_id, cluster.num_processes)
        out = search_dir(args.out, *where)
        cache_dir = cache_dir and search_dir(cache_dir, *where)
    fitness = cached_fitness(config, cache_dir)
    if args.cache_preload:
        added = fitness.cache.preload(args.cache_preload)
        print(f"preloaded {added} scores from {args.cache_preload}", file=sys.stderr)
    result = _run_search(args, fitness, cluster, out, space, truth, options)
    print(
        f"best {result.best_arch} after {result.evaluations} evaluations in "
        f"{result.seconds:.1f} s ({fitness.scored} scored, {fitness.hits} from the cache)",
        file=sys.stderr,
    )
    print(jsonio.dumps(result.as_dict()))


_ALGO_OPTIONS = (  # search flag, the algorithm's keyword, the algorithm
    ("population", "population_size", "evolution"),
    ("children", "children", "evolution"),
    ("draws", "draws", "reinforce"),
)


def _run_search(args, fitness, cluster, out, space, truth, options):
    """The search of `args`, its batches shared among the processes of `cluster` if any."""
    from wrcor_jax.search import ALGORITHMS

    if cluster is not None:
        from wrcor_jax.distributed import SharedFitness

        fitness = SharedFitness(fitness, cluster, args.wait_timeout)
    try:
        return ALGORITHMS[args.algo](
            fitness,
            args.budget,
            args.seed,
            out,
            vote=args.vote,
            ground_truth=truth,
            progress=not args.quiet,
            space=space,
            **options,
        )
    finally:
        if cluster is not None:
            from wrcor_jax.distributed import leave

            leave()


def _describe(args: argparse.Namespace) -> None:
    space = _space(args)
    arch = space.read(args.arch)
    if args.check_ranges:
        problems = space.search_problems(arch)
        if problems:
            raise ValueError(f"outside the {space.name} search space: {'; '.join(problems)}")
    num_classes = space.default_num_classes if args.num_classes is None else args.num_classes
    if num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {num_classes}")
    description = space.describe(arch, num_classes)
    if args.json:
        print(jsonio.dumps(description))
        return
    print(_table(description["blocks"]))
    print(
        f"{description['arch']}\nresolution {description['resolution']}, "
        f"{description['num_classes']} classes: {description['flops'] / 1e6:.1f}M FLOPs "
        f"({description['flops']:,}), {description['params'] / 1e6:.3f}M parameters "
        f"({description['params']:,})"
    )


_HEADINGS = {
    "in_channels": "in",
    "out_channels": "out",
    "output_resolution": "res",
    "bottleneck": "btl",
    "dw_channels": "dw",
}


def _table(rows: Sequence[dict]) -> str:
    """Rows of equal keys as an aligned text table, numbered, None as '-'."""
    columns = list(rows[0])
    headings = ["#", *(_HEADINGS.get(c, c) for c in columns)]
    cells = [
        [str(i), *("-" if row[c] is None else str(row[c]) for c in columns)]
        for i, row in enumerate(rows)
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headings)]
    lines = [headings, *cells]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def add_compile_cache_options(command: argparse.ArgumentParser) -> None:
    """`--compile-cache DIR` / `--no-compile-cache`: where compiled programs are kept on
    disk, so that a restarted run (or one after `ExecutableBudget` released them) reloads
    them instead of compiling again."""
    cache = command.add_mutually_exclusive_group()
    cache.add_argument(
        "--compile-cache",
        help="keep compiled programs here for later runs "
        "(default: $JAX_COMPILATION_CACHE_DIR or ~/.cache/wrcor_jax/xla)",
    )
    cache.add_argument("--no-compile-cache", action="store_true", help="keep none on disk")


def use_compile_cache(args: argparse.Namespace) -> None:
    """Turn on the persistent compilation cache `add_compile_cache_options` asked for."""
    from wrcor_jax.compilation import default_cache_dir, use_persistent_cache

    directory = None if args.no_compile_cache else args.compile_cache or default_cache_dir()
    use_persistent_cache(directory)


def add_hosts_options(
    command: argparse.ArgumentParser, what: str, waits_for: str | None = None
) -> None:
    """The `jax.distributed` options of a command that can run on many hosts (`--wait-timeout`
    when it waits for `waits_for` of another process)."""
    hosts = command.add_argument_group(f"many hosts (jax.distributed; {what})")
    hosts.add_argument(
        "--distributed",
        default="off",
        choices=["off", "auto"],
        help="auto: join a job from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
        "$JAX_PROCESS_ID or JAX's cluster detection (Cloud TPU, SLURM); implied by the options "
        "below",
    )
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0")
    hosts.add_argument("--num-processes", type=int)
    hosts.add_argument("--process-id", type=int)
    hosts.add_argument(
        "--init-timeout", type=int, default=300, help="seconds to reach the coordinator"
    )
    if waits_for is not None:
        hosts.add_argument(
            "--wait-timeout", type=float, default=86400.0, help=f"seconds to wait for {waits_for}"
        )


def join_job(args: argparse.Namespace):
    """The command's place in a `jax.distributed` job, or None when it runs alone; must run
    before anything starts a JAX backend."""
    hosts = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed == "off" and hosts == (None, None, None):
        return None
    from wrcor_jax import distributed

    return distributed.connect(*hosts, args.init_timeout)


def build_parser() -> argparse.ArgumentParser:
    """The `wrcor-jax` argument parser."""
    from wrcor_jax.spaces import SPACES

    parser = argparse.ArgumentParser(prog="wrcor-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score architectures with zero-shot proxies")
    score.add_argument("--space", default="nb201", choices=list(SPACES))
    score.add_argument("--dataset", default="cifar10")
    score.add_argument("--data", help="local .npz of training images (default: tfds)")
    score.add_argument("--data-dir", help="tfds data_dir")
    which = score.add_mutually_exclusive_group(required=True)
    which.add_argument("--archs", help="file with one architecture string per line")
    which.add_argument("--sample", type=int, help="score N distinct random architectures")
    which.add_argument("--all", action="store_true", help="score all 15,625 architectures")
    score.add_argument("--sample-seed", type=int, default=0)
    score.add_argument("--flops-limit", help="--sample under this many FLOPs, e.g. 600M (mbv2)")
    score.add_argument(
        "--proxies",
        default="wrcor",
        help="comma-separated proxy names and votes, e.g. wrcor,act_cor,vote(a,b,c),softvote(a,b)",
    )
    score.add_argument("--seed", type=int, default=42, help="init and batch seed")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument(
        "--engine",
        default="auto",
        choices=ENGINE_CHOICES,
        help="auto: composed on CPU, chunked (over every local device) on GPU/TPU",
    )
    score.add_argument("--chunk-size", type=int, default=8, help="archs per appended chunk")
    score.add_argument("--workers", type=int, default=2, help="archs in flight (composed)")
    score.add_argument("--out", required=True, help="results CSV (appended, resumable)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_cache_options(score)
    add_hosts_options(
        score,
        "each process scores its share into OUT.part-I-of-N, process 0 merges them into OUT",
        "another process's part or the merge",
    )
    score.set_defaults(run=_score)

    merge = commands.add_parser("merge", help="merge the part files of a multi-process score")
    merge.add_argument("parts", nargs="+", help="OUT.part-I-of-N files, all N of them")
    merge.add_argument("--out", required=True, help="merged results CSV")
    merge.add_argument(
        "--proxies", help="the score run's --proxies, for its vote columns (default: no votes)"
    )
    merge.set_defaults(run=_merge)

    evaluate = commands.add_parser("evaluate", help="rank correlations against ground truth")
    evaluate.add_argument("results")
    evaluate.add_argument("--ground-truth", required=True, help="NAS-Bench-201 accuracy CSV")
    evaluate.add_argument("--dataset", default="cifar10")
    evaluate.add_argument("--json", action="store_true", help="one JSON object on stdout")
    evaluate.add_argument(
        "--bootstrap", type=int, default=1000, help="resamples for the 95%% CIs (0: none)"
    )
    evaluate.add_argument("--bootstrap-seed", type=int, default=0)
    evaluate.add_argument("--plot", help="write rank-vs-rank scatter plots here (.png)")
    evaluate.add_argument(
        "--scored-on", help="dataset whose batch the scores were computed on (default: sidecar)"
    )
    evaluate.set_defaults(run=_evaluate)

    search = commands.add_parser("search", help="search the space with a proxy or a vote")
    search.add_argument("--space", default="nb201", choices=list(SPACES))
    search.add_argument("--algo", required=True, choices=["random", "evolution", "reinforce"])
    search.add_argument("--proxies", default="wrcor", help="comma-separated proxy names")
    search.add_argument("--vote", default="hard", choices=["hard", "soft"])
    search.add_argument("--budget", type=int, required=True, help="evaluations, all counted")
    search.add_argument("--seed", type=int, default=0, help="search seed")
    search.add_argument("--score-seed", type=int, default=42, help="init and batch seed")
    search.add_argument("--dataset", default="cifar10")
    search.add_argument("--data", help="local .npz of training images (default: tfds)")
    search.add_argument("--data-dir", help="tfds data_dir")
    search.add_argument("--batch-size", type=int, default=64)
    search.add_argument(
        "--engine",
        default="auto",
        choices=ENGINE_CHOICES,
        help="auto: composed on CPU, chunked on GPU/TPU",
    )
    search.add_argument("--workers", type=int, default=2, help="archs in flight (composed)")
    search.add_argument("--population", type=int, help="evolution: population size (64)")
    search.add_argument("--children", type=int, help="evolution: mutants per generation (1)")
    search.add_argument("--draws", type=int, help="reinforce: architectures per policy round (1)")
    search.add_argument("--flops-limit", help="search under this many FLOPs, e.g. 600M (mbv2)")
    search.add_argument("--out", required=True, help="folder: history.csv, result.json")
    search.add_argument("--ground-truth", help="NAS-Bench-201 accuracy CSV")
    search.add_argument("--cache-dir", help="score cache shared between searches")
    search.add_argument("--cache-preload", help="a `wrcor-jax score` file of this config")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_cache_options(search)
    add_hosts_options(
        search,
        "every process runs the search and scores its share of each batch; process I > 0 "
        "writes OUT/process-I-of-N",
        "another process's scores",
    )
    search.set_defaults(run=_search)

    describe = commands.add_parser("describe", help="block table, FLOPs and parameters")
    describe.add_argument("--space", default="nb201", choices=list(SPACES))
    describe.add_argument("--arch", required=True, help="the architecture's text form")
    describe.add_argument(
        "--num-classes", type=int, help="classifier width (default: nb201 10, mbv2 1000)"
    )
    describe.add_argument("--json", action="store_true", help="one JSON object on stdout")
    describe.add_argument(
        "--check-ranges",
        action="store_true",
        help="fail unless the arch lies in the search space's ranges (and --flops-limit)",
    )
    describe.add_argument("--flops-limit", help="with --check-ranges: the FLOPs limit")
    describe.set_defaults(run=_describe)

    from wrcor_jax.train.cli import register as register_training

    register_training(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code. Run as a command (`argv` None), it first
    restarts itself with the tuned allocator (`allocator.reexec_tuned`)."""
    if argv is None:
        allocator.reexec_tuned()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("wrcor-jax: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, MemoryError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"wrcor-jax: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
