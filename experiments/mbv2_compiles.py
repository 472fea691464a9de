"""Compilations of the MobileNetV2-space engine as architectures accumulate (issue #12).

Samples architectures from the reference ranges under the FLOPs limit and computes WRCor's
site sums for each with `MBV2Engine`, reporting after 20, 40, 100 and 200 architectures (or
whatever `--checkpoints` says) the compilations so far, their seconds, the wall time and the
median seconds per architecture of the last stretch. One JSON line per checkpoint on stdout
and in `--out`. Compilations are counted as in `compilation.CompileCounter` (every backend
compile, eager ops included). XLA:CPU keeps every executable in memory, so, as `score`
does, the run releases them when it outgrows `--memory-budget-mb` and reads them back from
a persistent cache that starts empty (`loads`, `releases`): every compilation is real.

`--trace-only` compiles nothing: it counts the distinct call signatures (piece, direction,
shapes, static arguments) the engine's jitted pieces meet -- each is one compilation --
tracing each new one once with precompile's stand-ins, so the 100 and 200 rows take
minutes, not hours.

    python experiments/mbv2_compiles.py --archs 200 --batch-size 64 --out compiles.jsonl
    python experiments/mbv2_compiles.py --archs 200 --trace-only --out keys.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from wrcor_jax import allocator
from wrcor_jax.compilation import CompileCounter, ExecutableBudget, use_persistent_cache
from wrcor_jax.data import load_batch
from wrcor_jax.proxies.wrcor import mbv2_wrcor
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.engine import SE_KINDS, MBV2Engine
from wrcor_jax.spaces.mbv2.network import init_params
from wrcor_jax.spaces.mbv2.precompile import PieceStandIn, piece_stand_ins, signatures_met

SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "cifar10_sample.npz"


def key_counts(stand_ins: dict[str, PieceStandIn]) -> dict:
    """The distinct keys (each one compilation) the stand-ins met, in all and per piece."""
    by_piece = signatures_met(stand_ins)
    return {"piece_compiles": sum(by_piece.values()), "by_piece": by_piece}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=200)
    parser.add_argument("--checkpoints", default="20,40,100,200")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flops-limit", type=int, default=600_000_000)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-budget-mb", type=float, help="default: a third of the RAM")
    parser.add_argument("--trace-only", action="store_true", help="count keys, compile none")
    args = parser.parse_args()
    with piece_stand_ins() if args.trace_only else contextlib.nullcontext() as keys:
        measure(args, keys)


def measure(args: argparse.Namespace, keys: dict[str, PieceStandIn] | None) -> None:
    """Score `args.archs` sampled architectures, a JSON row at each checkpoint (with the
    stand-ins' key counts in place of the compilations when `keys` is given)."""
    use_persistent_cache(tempfile.mkdtemp(prefix="mbv2-compiles-"))
    budget = ExecutableBudget(args.memory_budget_mb)
    CompileCounter.install()
    checkpoints = {int(c) for c in args.checkpoints.split(",")}
    archs = sampling.sample(
        np.random.default_rng(args.sample_seed), args.archs, flops_limit=args.flops_limit
    )
    images, labels = load_batch("cifar10", args.batch_size, 42, args.data, None)
    engine = MBV2Engine(SE_KINDS)
    start, seconds = time.perf_counter(), []
    out = args.out.open("a") if args.out else None
    for count, arch in enumerate(archs, start=1):
        tick = time.perf_counter()
        score = mbv2_wrcor(engine.site_sums(arch, init_params(arch, 42, 10), images, labels, 10))
        seconds.append(time.perf_counter() - tick)
        budget.check()
        shown = "(traced)" if keys else f"wrcor {score:.4f}"
        print(f"{count:4d} {arch.resolution} {seconds[-1]:6.2f}s {shown}", flush=True)
        if count in checkpoints:
            row = {
                "archs": count,
                "compiles": CompileCounter.count,
                "compile_s": round(CompileCounter.seconds, 1),
                "loads": CompileCounter.loads,
                "load_s": round(CompileCounter.load_seconds, 1),
                "releases": budget.releases,
                "rss_mb": round(allocator.resident_mb()),
                "wall_s": round(time.perf_counter() - start, 1),
                "median_s_per_arch": round(statistics.median(seconds), 2),
                "batch_size": args.batch_size,
                "cpus": jax.local_device_count() and len(jax.devices()),
            }
            if keys:  # the stand-ins' zeros compile eager ops of their own: not the engine's
                row = {k: v for k, v in row.items() if "compile" not in k} | key_counts(keys)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            seconds = []


if __name__ == "__main__":
    allocator.reexec_tuned()  # as the command line does: docs/timing.md
    main()
