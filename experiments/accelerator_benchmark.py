"""NB201 WRCor with the chunked engine on whatever device JAX sees (issue #15 item 5).

Scores `--num-archs` architectures drawn without replacement from the 15,625 (all of them
with `--num-archs 15625`) with `ChunkedEngine` on one CIFAR-10 batch and the seeded supernet
weights, WRCor taken on the host, and reports:

- the device, the chunk shape (from the device's free memory unless `--chunk` says) and
  how full the planner packed the chunks;
- lowering and compile seconds of the one program (`lower(...).compile()`);
- the first chunk's seconds, then archs/s over all architectures (steady: compiled and
  warm) and the projected seconds for all 15,625;
- peak device memory (`memory_stats()['peak_bytes_in_use']`; on CPU, which has none, the
  process's peak RSS);
- executed FLOPs per architecture (the padding of part-filled chunks included; also per
  place of a full chunk) from XLA's cost analysis of the program with its stage scans
  unrolled (the analysis counts a loop body once, so the compiled program's own
  figure undercounts), against the floor: the mean cost analysis of `NB201Engine`'s
  per-architecture static program over the first `--floor-archs` architectures (its
  standard error beside it);
- achieved FLOP/s (executed FLOPs x archs/s) and its share of the device's float32 matmul
  rate measured in the same run (`benchmarks.machine.matmul_flops_per_s`);
- the largest relative WRCor difference from `NB201Engine` on the same device over the
  first `--check` architectures.

The MobileNetV2 space has no chunked engine yet, so only NB201 is measured. Everything it
reads is local (`--data`), so it runs unattended on a machine without network access:

    python experiments/accelerator_benchmark.py --num-archs 15625 --json h200.json
    python experiments/accelerator_benchmark.py --num-archs 32 --chunk 8 --json cpu.json
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax import allocator
from wrcor_jax.benchmarks.machine import cpu_model, matmul_flops_per_s
from wrcor_jax.data import load_batch
from wrcor_jax.jsonio import write_json
from wrcor_jax.proxies import RESPONSE_PROXIES
from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_chunked import (
    ChunkedEngine,
    ChunkShape,
    chunk_inputs,
    chunk_shape_for,
    chunk_site_sums,
    plan_chunks,
)
from wrcor_jax.spaces.nb201_engine import NB201Engine

SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "cifar10_sample.npz"


def xla_flops(program, *args, **static) -> float | None:
    """XLA's FLOP count of a jitted `program`, lowered (not compiled) for the CPU, whose
    count is the program's whatever the device; None where the backend has no cost analysis
    of lowered programs (a PJRT plugin's, as the GPU's: jax 0.10 raises, 0.11.2 on the H200
    returned None)."""
    lowered = program.trace(*args, **static).lower(lowering_platforms=("cpu",))
    try:
        analysis = lowered.cost_analysis()
    except NotImplementedError:
        return None
    return None if analysis is None else analysis["flops"]


def floor_flops(
    archs: np.ndarray, params: dict, images: jax.Array, labels: jax.Array
) -> list | None:
    """XLA's FLOP count of each architecture's own static program (None: no analysis)."""
    engine = NB201Engine(static_per_arch=True)
    programs = [jax.jit(functools.partial(engine._blocks, tuple(map(int, ops)))) for ops in archs]
    counts = [xla_flops(program, params, images, labels) for program in programs]
    return None if None in counts else counts


def flop_report(
    flops: tuple[float, list[float]] | None,
    places: int,
    chunks: int,
    archs: int,
    rate: float,
    peak_rate: float,
) -> dict:
    """The report's FLOP figures from (FLOPs of one full chunk's program, the floor
    architectures' FLOPs): executed per architecture (part-filled chunks' padding included)
    and per chunk place, against the floor, and the achieved rate; None where uncounted."""
    keys = (
        "executed_flops_per_arch", "executed_flops_per_chunk_place", "floor_flops_per_arch",
        "floor_flops_standard_error", "floor_archs", "executed_over_floor",
        "full_chunk_over_floor", "achieved_flops_per_s", "utilisation",
    )  # fmt: skip
    report = dict.fromkeys(keys) | {"matmul_peak_flops_per_s": peak_rate}
    if flops is None:
        return report
    chunk_flops, floors = flops
    per_place = chunk_flops / places
    executed = per_place * chunks * places / archs
    floor = statistics.mean(floors)
    return report | {
        "executed_flops_per_arch": executed,
        "executed_flops_per_chunk_place": per_place,
        "floor_flops_per_arch": floor,
        "floor_flops_standard_error": (
            statistics.stdev(floors) / len(floors) ** 0.5 if len(floors) > 1 else float("nan")
        ),
        "floor_archs": len(floors),
        "executed_over_floor": executed / floor,
        "full_chunk_over_floor": per_place / floor,
        "achieved_flops_per_s": executed * rate,
        "utilisation": executed * rate / peak_rate,
    }


def peak_memory_bytes(device: jax.Device) -> tuple[float, str]:
    """Peak device memory, or the process's peak RSS where the device keeps no statistics."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "process peak RSS"


def run(args: argparse.Namespace) -> dict:
    """Measure; returns the report (also printed line by line as it goes)."""
    device = jax.devices()[0]
    say = lambda text: print(text, flush=True)  # noqa: E731
    say(f"device: {device.platform} {device.device_kind} ({jax.device_count()} visible)")
    images, labels = map(
        jnp.asarray, load_batch("cifar10", args.batch_size, args.seed, data=args.data)
    )
    params = jax.device_put(nb201.init_params(args.seed, 10))
    rng = np.random.default_rng(args.seed)
    archs = nb201.all_archs()[rng.permutation(nb201.NUM_ARCHS)[: args.num_archs]]
    shape = chunk_shape_for(device, args.batch_size)
    shape = ChunkShape.for_archs(args.chunk) if args.chunk else shape
    plan = plan_chunks(archs, shape)
    say(f"{shape}; {len(archs)} archs in {len(plan)} chunks")

    padded, slots = chunk_inputs(archs[plan[0]], shape)
    start = time.perf_counter()
    lowered = chunk_site_sums.lower(params, padded, slots, images, labels)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    say(f"lower {lower_s:.1f} s, compile {compile_s:.1f} s")

    start = time.perf_counter()
    jax.block_until_ready(compiled(params, padded, slots, images, labels))
    first_s = time.perf_counter() - start
    engine = ChunkedEngine(shape, compiled)
    start = time.perf_counter()
    sums = engine.site_sums(archs, params, images, labels)
    scores = [RESPONSE_PROXIES["wrcor"](s) for s in sums]
    steady_s = time.perf_counter() - start
    rate = len(archs) / steady_s
    say(f"first chunk {first_s:.2f} s; {rate:.3f} archs/s steady (WRCor on the host included)")
    peak, peak_source = peak_memory_bytes(device)

    unrolled = xla_flops(chunk_site_sums, params, padded, slots, images, labels, unroll=True)
    floors = floor_flops(archs[: args.floor_archs], params, images, labels)
    flops = None if unrolled is None or floors is None else (unrolled, floors)
    peak_rate = matmul_flops_per_s(args.matmul_size)

    reference = NB201Engine()
    diffs = []
    for ops, score in zip(archs[: args.check], scores, strict=False):
        want = RESPONSE_PROXIES["wrcor"](reference.site_sums(ops, params, images, labels))
        diffs.append(0.0 if want == score else abs(score - want) / abs(want))
    load = os.getloadavg()
    report = {
        "device_platform": device.platform,
        "device_kind": device.device_kind,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_average": load,
        "batch_size": args.batch_size,
        "num_archs": len(archs),
        "chunk": {"archs": shape.archs, "conv3x3": shape.conv3x3, "conv1x1": shape.conv1x1},
        "chunks": len(plan),
        "chunk_fill": len(archs) / (len(plan) * shape.archs),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "first_chunk_s": first_s,
        "steady_s": steady_s,
        "archs_per_s": rate,
        "projected_s_all_15625": nb201.NUM_ARCHS / rate,
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        **flop_report(flops, shape.archs, len(plan), len(archs), rate, peak_rate),
        "wrcor_checked_archs": len(diffs),
        "wrcor_max_rel_diff_vs_composed": max(diffs, default=float("nan")),
    }
    say(
        f"projected {report['projected_s_all_15625']:.0f} s for all 15,625 archs; "
        f"peak memory {peak / 2**30:.2f} GiB ({peak_source})"
    )
    if flops is None:
        say("FLOPs: this jax has no cost analysis of lowered programs; not reported")
    else:
        say(
            f"FLOPs per arch: executed {report['executed_flops_per_arch'] / 1e9:.1f} G, floor "
            f"{report['floor_flops_per_arch'] / 1e9:.1f} G (+- "
            f"{report['floor_flops_standard_error'] / 1e9:.1f}, {report['floor_archs']} archs): "
            f"ratio {report['executed_over_floor']:.2f}, {report['full_chunk_over_floor']:.2f} "
            f"in full chunks ({report['chunk_fill']:.0%} filled here)"
        )
        say(
            f"achieved {report['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s of a measured "
            f"matmul peak {peak_rate / 1e12:.3f} TFLOP/s: utilisation {report['utilisation']:.1%}"
        )
    say(
        f"WRCor vs NB201Engine over {len(diffs)} archs: max rel diff "
        f"{report['wrcor_max_rel_diff_vs_composed']:.2e}; load average {load}"
    )
    return report


def main(argv: list[str] | None = None) -> dict:
    """Parse options, run, write `--json`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-archs", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=0, help="archs per chunk; 0: from memory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", type=Path, default=SAMPLE, help="CIFAR-10 .npz")
    parser.add_argument("--floor-archs", type=int, default=8)
    parser.add_argument("--check", type=int, default=4, help="archs checked vs NB201Engine")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.num_archs <= nb201.NUM_ARCHS:
        parser.error(f"--num-archs must lie in 1..{nb201.NUM_ARCHS}")
    report = run(args)
    if args.json:
        write_json(args.json, report | {"command": sys.argv})
    return report


if __name__ == "__main__":
    allocator.reexec_tuned()  # as the command line does: docs/timing.md
    main()
