"""Compilations of the MobileNetV2-space engine as architectures accumulate (issue #12).

Samples architectures from the reference ranges under the FLOPs limit and computes WRCor's
site sums for each with `MBV2Engine`, reporting after 20, 40, 100 and 200 architectures (or
whatever `--checkpoints` says) the compilations so far, their seconds, the wall time and the
median seconds per architecture of the last stretch. One JSON line per checkpoint on stdout
and in `--out`. Compilations are counted as in `compilation.CompileCounter` (every backend
compile, eager ops included). XLA:CPU keeps every executable in memory, so, as `score`
does, the run releases them when it outgrows `--memory-budget-mb` and reads them back from
a persistent cache that starts empty (`loads`, `releases`): every compilation is real.

`--trace-only` compiles nothing: it counts the distinct (piece, direction, shapes, static
arguments) keys the engine's jitted pieces meet -- each is one compilation -- tracing each
new key once with `jax.eval_shape`, so the 100 and 200 rows take minutes, not hours.

    python experiments/mbv2_compiles.py --archs 200 --batch-size 64 --out compiles.jsonl
    python experiments/mbv2_compiles.py --archs 200 --trace-only --out keys.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax import allocator
from wrcor_jax.compilation import CompileCounter, ExecutableBudget, use_persistent_cache
from wrcor_jax.data import load_batch
from wrcor_jax.proxies.wrcor import mbv2_wrcor
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.engine import PIECES, SE_KINDS, MBV2Engine
from wrcor_jax.spaces.mbv2.network import init_params

SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "cifar10_sample.npz"


class PieceKeys:
    """Stands in for the pieces' jitted forward and backward: records each call's jit key
    and returns zeros of the output shapes (traced once per key), compiling nothing."""

    def __init__(self):
        self.keys: Counter = Counter()  # (piece, direction) -> distinct keys met
        self._outputs: dict = {}
        for name, piece in PIECES.items():
            piece.forward = self._stand_in(name, "forward", piece.forward)
            piece.backward = self._stand_in(name, "backward", piece.backward)

    def _stand_in(self, name: str, direction: str, jitted: Callable) -> Callable:
        def call(*args, **static):
            shapes = tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(args))
            structure = jax.tree.structure(args)
            key = (name, direction, shapes, str(structure), tuple(sorted(static.items())))
            if key not in self._outputs:
                self.keys[name, direction] += 1
                self._outputs[key] = jax.eval_shape(lambda *a: jitted(*a, **static), *args)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._outputs[key])

        return call

    def row(self) -> dict:
        return {
            "piece_compiles": sum(self.keys.values()),
            "by_piece": {f"{name}/{direction}": n for (name, direction), n in self.keys.items()},
        }


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

    use_persistent_cache(tempfile.mkdtemp(prefix="mbv2-compiles-"))
    budget = ExecutableBudget(args.memory_budget_mb)
    CompileCounter.install()
    keys = PieceKeys() if args.trace_only else None
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
                row = {k: v for k, v in row.items() if "compile" not in k} | keys.row()
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            seconds = []


if __name__ == "__main__":
    allocator.reexec_tuned()  # as the command line does: docs/timing.md
    main()
