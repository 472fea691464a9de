"""Benchmark: WRCor (reference and clean site sets) on random NB201 architectures.

Scores N random architectures (seed 0, distinct, NATS-Bench order) on the CIFAR-10 proxy
batch, then reports Kendall tau and Spearman rho against CIFAR-10 test accuracy, the per-
architecture time (median, p90), compile count and time, peak RSS, and the extrapolated time
for all 15,625. Scores go to a resumable CSV, so a killed run continues where it stopped.
With --static K, K architectures are also timed side by side with a static-structure jit.

    python experiments/nb201_correlation.py --data ../shared/data/cifar10_sample.npz \\
        --ground-truth ../shared/data/nb201_test_accuracy.csv --num-archs 1000 --static 20
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import jax
import numpy as np

from wrcor_jax import jsonio
from wrcor_jax.benchmarks.machine import cpu_model
from wrcor_jax.benchmarks.nb201 import evaluate_scores, load_ground_truth
from wrcor_jax.compilation import CompileCounter
from wrcor_jax.results import ResultsFile
from wrcor_jax.scoring import NB201Scorer, ScoreConfig
from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_engine import NB201Engine

PROXIES = ("wrcor", "wrcor_clean", "act_cor", "act_grad_cor")


def machine() -> str:
    """CPU model and core count, for the report."""
    model = cpu_model()
    return f"{model}, {jax.local_device_count()} JAX device(s), {len(jax.devices('cpu'))} cpu"


def time_side_by_side(scorer: NB201Scorer, archs: np.ndarray) -> dict:
    """Steady per-arch seconds of the composed engine and of a static jit, same archs, then
    the composed engine's throughput with the scorer's worker threads."""
    static, composed_s, static_s, static_compile_s = NB201Engine(static_per_arch=True), [], [], []
    args = (scorer.params, scorer.images, scorer.labels)
    for ops in archs:
        t0 = time.perf_counter()
        static.site_sums(ops, *args)
        t1 = time.perf_counter()
        static.site_sums(ops, *args)
        t2 = time.perf_counter()
        scorer.engine.site_sums(ops, *args)
        t3 = time.perf_counter()
        static_compile_s.append((t1 - t0) - (t2 - t1))
        static_s.append(t2 - t1)
        composed_s.append(t3 - t2)
    t0 = time.perf_counter()
    scorer.site_sums(archs)  # the scorer's threads: `workers` architectures in flight
    threaded_s = (time.perf_counter() - t0) / len(archs)
    return {
        "archs": len(archs),
        "workers": scorer.config.workers,
        "threaded_s_per_arch": threaded_s,
        "threaded_speedup_vs_sequential": float(np.mean(composed_s) / threaded_s),
        "composed_median_s": float(np.median(composed_s)),
        "static_median_s": float(np.median(static_s)),
        "ratio_composed_over_static": float(np.median(composed_s) / np.median(static_s)),
        "static_compile_median_s": float(np.median(static_compile_s)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 .npz (format of shared/data)")
    parser.add_argument("--ground-truth", required=True)
    parser.add_argument("--num-archs", type=int, default=1000)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--static", type=int, default=0, help="archs timed vs a static jit")
    parser.add_argument("--out", default="results/nb201_correlation")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.sample_seed)
    chosen = nb201.all_archs()[rng.choice(nb201.NUM_ARCHS, args.num_archs, replace=False)]
    config = ScoreConfig(
        proxies=PROXIES, seed=args.seed, batch_size=args.batch_size, data=args.data, chunk_size=1
    )
    results = ResultsFile(out / "scores.csv", PROXIES)
    done = results.done()
    todo = [ops for ops in chosen if nb201.arch_string(ops) not in done]

    t_start = time.perf_counter()
    scorer = NB201Scorer(config)
    per_arch, first_call_s = [], None
    for i, ops in enumerate(todo):
        t0 = time.perf_counter()
        row = scorer.score(ops[None])[0]
        seconds = time.perf_counter() - t0
        if first_call_s is None:
            first_call_s = seconds
        else:
            per_arch.append(seconds)
        results.append([(nb201.arch_string(ops), row)])
        if i % 50 == 0:
            print(f"{i}/{len(todo)} archs, last {seconds:.2f} s", flush=True)
    wall_s = time.perf_counter() - t_start
    compiles, compile_s = CompileCounter.count, CompileCounter.seconds

    import csv

    with (out / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = {nb201.arch_string(ops) for ops in chosen}
    rows = [r for r in rows if r["arch"] in wanted]
    truth = load_ground_truth(args.ground_truth)
    correlations = evaluate_scores(rows, truth, "cifar10", PROXIES)

    report = {
        "machine": machine(),
        "jax": jax.__version__,
        "command": "python experiments/nb201_correlation.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "archs": len(rows),
        "scored_this_run": len(todo),
        "wall_s": wall_s,
        "first_call_s": first_call_s,
        "median_s": float(np.median(per_arch)) if per_arch else None,
        "p90_s": float(np.percentile(per_arch, 90)) if per_arch else None,
        "mean_s": float(np.mean(per_arch)) if per_arch else None,
        "extrapolated_all_15625_h": float(np.mean(per_arch)) * nb201.NUM_ARCHS / 3600
        if per_arch
        else None,
        "compilations": compiles,
        "compile_s": compile_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "correlations_cifar10": correlations,
    }
    if args.static:
        report["side_by_side"] = time_side_by_side(scorer, chosen[: args.static])
    jsonio.write_json(out / "report.json", report, indent=2)
    print(jsonio.dumps(report, indent=2))
    print("\n| proxy | Kendall tau | Spearman rho | n |\n| --- | --- | --- | --- |")
    for name, r in correlations.items():
        print(f"| {name} | {r['kendall']:.3f} | {r['spearman']:.3f} | {r['n']} |")


if __name__ == "__main__":
    main()
