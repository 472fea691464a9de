"""Time WRCor scoring in PyTorch and in the JAX engines, side by side on one machine.

Every implementation scores the same seeded random architectures on the same batch with the
same weights (`init_params(42, classes)`), each in its own subprocess so that its peak RSS is
its own; they run one after another. Per implementation: the first call (compilation
included), compilations, steady seconds per architecture (median and p90, first call
excluded), architectures per second, peak RSS, and the speed ratio against PyTorch eager.

    python experiments/timing_vs_pytorch.py --num-archs 100 --batch-size 64 --json t.json

Implementations (`--only` picks some, `--limit NAME=N` scores only the first N archs):
- torch_eager: the torch_ref WRCor, reference hooks, one pass, `--torch-threads` threads;
- torch_eager_1thread: the same with one torch thread;
- torch_compile: the same network after `nn.Module.compile()` (hooks stay), one thread;
- jax_composed: `NB201Engine()`, compiled pieces composed per architecture;
- jax_static_jit: `NB201Engine(static_per_arch=True)`: one jit per architecture. Its
  per-arch time is compile + run (every new architecture compiles); each arch is run twice
  and the second call gives the run alone;
- jax_vmap: `vmapped_site_sums` over chunks of `--vmap-chunk` archs (skip with --skip-vmap).
`--profile` adds where the composed engine's time goes (see `_profile`).

`--space mbv2` times the MobileNetV2 space instead (`--proxies`, default wrcor, any of
wrcor, synflow, jacob_cov): seeded random architectures within 600M FLOPs (1000 classes,
`spaces.mbv2.sampling.sample`), the 10-class network, weights `init_params(arch, 42, 10)`:
- paper_code: the paper's own code (`--reference-code` checkout, `torch_ref.paper_code`):
  its `find_measures` on its own PlainNet with those weights loaded;
- torch_eager: our PyTorch twin (`torch_ref.mbv2`), the reference's hooks, eager;
- jax: `MBV2Scorer` (the compile-bounded engine where it applies).
Both torch rows use `--torch-threads`. Rows add `ratio_vs_paper_code` and the FLOP floor:
per arch, 2 x the forward multiply-adds (`cost.describe` at 10 classes: convolutions and
the classifier per image) x (3 x batch for each of wrcor and jacob_cov, one forward and a
backward of input and weight gradients, + 3 for synflow's one image), over the float32
matmul rate measured here (`benchmarks.machine.matmul_flops_per_s`); `floor_median_s` is
its median over the row's timed archs and `x_floor` the row's median over it.

    python experiments/timing_vs_pytorch.py --space mbv2 --proxies synflow,jacob_cov,wrcor \
        --reference-code /path/to/ZSNAS-WRCor --torch-threads 2 --num-archs 20 --json t.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from wrcor_jax.jsonio import write_json
from wrcor_jax.spaces.nb201 import (
    BEST_CIFAR10,
    MEDIAN_CIFAR10,
    arch_string,
    parse_arch,
    sample_archs,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_sample.npz"
BEST, MEDIAN = BEST_CIFAR10, MEDIAN_CIFAR10
NUM_CLASSES = 10
WEIGHT_SEED = BATCH_SEED = 42
TORCH_EAGER = ("torch_eager", "torch_eager_1thread")
MBV2_FLOPS_LIMIT = 600_000_000
MBV2_PROXIES = ("wrcor", "synflow", "jacob_cov")


# --------------------------------------------------------------------------- workers


def _batch(args: argparse.Namespace, batch_size: int | None = None):
    from wrcor_jax.data import load_batch

    return load_batch("cifar10", batch_size or args.batch_size, BATCH_SEED, data=args.data)


def _archs(args: argparse.Namespace, name: str | None) -> list:
    """The first `--limit name=N` (default all) of the seeded architectures of `--space`:
    NB201 strings, or `MBV2Arch`s within 600M FLOPs (1000 classes)."""
    rng = np.random.default_rng(args.seed)
    if args.space == "mbv2":
        from wrcor_jax.spaces.mbv2.sampling import sample

        archs = sample(rng, args.num_archs, flops_limit=MBV2_FLOPS_LIMIT)
    else:
        archs = [arch_string(o) for o in sample_archs(rng, args.num_archs)]
    return archs[: args.limits.get(name, len(archs))]


def _torch_batch(args: argparse.Namespace):
    """The batch as torch NCHW images and int64 labels."""
    import torch

    images, labels = _batch(args)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def _torch_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """Build each architecture's network, load the weights, one hooked pass (as the reference)."""
    import torch

    from wrcor_jax.spaces.nb201 import init_params
    from wrcor_jax.torch_ref import build_network, wrcor

    threads = args.torch_threads if name == "torch_eager" else 1
    torch.set_num_threads(threads)
    x, y = _torch_batch(args)
    params = init_params(WEIGHT_SEED, NUM_CLASSES)
    result["extra"] = {"torch_threads": threads}
    compiled = name == "torch_compile"
    if compiled:
        from torch._dynamo.utils import counters

    for arch in _archs(args, name):
        start = time.perf_counter()
        net = build_network(arch, NUM_CLASSES, params)
        if compiled:
            net.compile()
        score = wrcor(net, x, y, "reference").score
        _record(result, time.perf_counter() - start, [[score]])
        if compiled:
            result["compiles"] = counters["stats"]["unique_graphs"]
            result["extra"]["graph_breaks"] = sum(counters["graph_break"].values())


def _jax_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """Score with one of the JAX engines; compilations counted by `CompileCounter`."""
    import jax
    import jax.numpy as jnp

    from wrcor_jax.compilation import CompileCounter
    from wrcor_jax.proxies import RESPONSE_PROXIES
    from wrcor_jax.responses import SiteSums
    from wrcor_jax.spaces.nb201 import init_params
    from wrcor_jax.spaces.nb201_capture import vmapped_site_sums
    from wrcor_jax.spaces.nb201_engine import NB201Engine

    CompileCounter.install()
    images, labels = _batch(args)
    x, y = jnp.asarray(images), jnp.asarray(labels)
    params = jax.device_put(init_params(WEIGHT_SEED, NUM_CLASSES))
    ops = [parse_arch(a) for a in _archs(args, name)]
    wrcor = RESPONSE_PROXIES["wrcor"]
    compiles = CompileCounter.count

    if name == "jax_vmap":
        size = args.vmap_chunk
        fn = vmapped_site_sums(NUM_CLASSES)
        result["extra"] = {"chunk": size}
        for begin in range(0, len(ops), size):
            chunk = ops[begin : begin + size]
            padded = np.stack(chunk + [chunk[-1]] * (size - len(chunk)))
            start = time.perf_counter()
            sums, counts = jax.device_get(fn(params, padded, x, y))
            scores = [[wrcor(SiteSums.from_stacked(sums[i], counts[i]))] for i in range(len(chunk))]
            _record(result, time.perf_counter() - start, scores)
            result["compiles"] = CompileCounter.count - compiles
        return

    engine = NB201Engine(static_per_arch=name == "jax_static_jit")
    runs = []
    for o in ops:
        start = time.perf_counter()
        score = wrcor(engine.site_sums(o, params, x, y))
        _record(result, time.perf_counter() - start, [[score]])
        if engine.static_per_arch:  # the same arch again: the run without its compile
            start = time.perf_counter()
            wrcor(engine.site_sums(o, params, x, y))
            runs.append(time.perf_counter() - start)
        result["compiles"] = CompileCounter.count - compiles
    if len(runs) > 1:
        compile_s = [total - run for total, run in zip(result["steady_s"], runs[1:], strict=True)]
        result["extra"] = {
            "run_only_median_s": statistics.median(runs[1:]),
            "compile_median_s": statistics.median(compile_s),
            "compiles_per_arch": result["compiles"] / len(ops),
        }


def _mbv2_torch_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """Per arch: build the network (the paper's PlainNet for paper_code, else our twin) with
    the arch's weights (drawn before the clock starts) and score `--proxies` with it."""
    import torch

    from wrcor_jax.spaces.mbv2.network import init_params

    torch.set_num_threads(args.torch_threads)
    result["extra"] = {"torch_threads": args.torch_threads}
    if name == "paper_code":
        from wrcor_jax.torch_ref.paper_code import import_paper_code, paper_network, paper_scores

        code = import_paper_code(args.reference_code)
        images, labels = _batch(args)

        def score(arch, params: dict) -> list[float]:
            net = paper_network(code, arch, NUM_CLASSES, params)
            values = paper_scores(code, net, images, labels, NUM_CLASSES, args.proxies)
            return [values[proxy] for proxy in args.proxies]

    else:
        from wrcor_jax.torch_ref import mbv2
        from wrcor_jax.torch_ref.proxies import jacob_cov, synflow
        from wrcor_jax.torch_ref.wrcor import wrcor

        x, y = _torch_batch(args)
        compute = {
            "wrcor": lambda net: wrcor(net, x, y, "reference").score,
            "synflow": lambda net: synflow(net, tuple(x.shape[1:])),
            "jacob_cov": lambda net: jacob_cov(net, x),
        }

        def score(arch, params: dict) -> list[float]:
            net = mbv2.build_network(arch, NUM_CLASSES, params)
            return [compute[proxy](net) for proxy in args.proxies]

    for arch in _archs(args, name):
        params = init_params(arch, WEIGHT_SEED, NUM_CLASSES)
        start = time.perf_counter()
        row = score(arch, params)
        _record(result, time.perf_counter() - start, [row])


def _mbv2_jax_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """`MBV2Scorer` (its own weights from the seed, the same as the torch rows load) per arch;
    compilations counted by `CompileCounter` from its first score on."""
    from wrcor_jax.compilation import CompileCounter
    from wrcor_jax.scoring import ScoreConfig
    from wrcor_jax.spaces.mbv2.space import MBV2Scorer

    CompileCounter.install()
    config = ScoreConfig(
        "mbv2", "cifar10", args.proxies, BATCH_SEED, args.batch_size, str(args.data)
    )
    scorer = MBV2Scorer(config)
    compiles = CompileCounter.count
    for arch in _archs(args, name):
        start = time.perf_counter()
        rows = scorer.score([arch])
        _record(result, time.perf_counter() - start, rows)
        result["compiles"] = CompileCounter.count - compiles


def _record(result: dict, seconds: float, scores: list[list[float]]) -> None:
    """One timed call that scored `len(scores)` archs (a row of `--proxies` scores each):
    the first call, or steady samples."""
    if result["first_call_s"] is None:
        result["first_call_s"] = seconds
    else:
        result["steady_s"] += [seconds / len(scores)] * len(scores)
    result["scores"] += scores


def _run_worker(args: argparse.Namespace) -> None:
    """Subprocess entry: time one implementation, write its raw result as JSON."""
    result = {
        "name": args.worker,
        "status": "ok",
        "first_call_s": None,
        "steady_s": [],
        "scores": [],
        "compiles": None,
        "extra": {},
    }
    worker = _profile if args.worker == "profile" else SPACE_WORKERS[args.space][args.worker]
    try:
        worker(args, args.worker, result)
    except Exception as exc:  # a failed implementation is a result, not a crash
        result["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(args.worker_out, result)


WORKERS: dict[str, Callable[[argparse.Namespace, str, dict], None]] = {
    "torch_eager": _torch_worker,
    "torch_eager_1thread": _torch_worker,
    "torch_compile": _torch_worker,
    "jax_composed": _jax_worker,
    "jax_static_jit": _jax_worker,
    "jax_vmap": _jax_worker,
}
MBV2_WORKERS: dict[str, Callable[[argparse.Namespace, str, dict], None]] = {
    "paper_code": _mbv2_torch_worker,
    "torch_eager": _mbv2_torch_worker,
    "jax": _mbv2_jax_worker,
}
SPACE_WORKERS = {"nb201": WORKERS, "mbv2": MBV2_WORKERS}


# --------------------------------------------------------------------------- profile

# Correlation terms each engine piece adds, as (element count relative to the piece's main
# input, count): a reduction cell's terms sit half at its input and half at its output shape.
_CORR_TERMS = {
    "conv_backward": [(1.0, 2)],
    "add_act": [(1.0, 1)],
    "reduction_forward": [(1.0, 1), (0.5, 1)],
    "reduction_backward": [(1.0, 3), (2.0, 1)],  # main input: the output gradient
    "head": [(1.0, 3)],
}
# Which positional argument of each piece is its main (N, H, W, C) input.
_MAIN_ARG = {
    "stem": 1,
    "add": 0,
    "conv_forward": 1,
    "conv_backward": 1,
    "pool_forward": 0,
    "pool_backward": 0,
    "add_act": 1,
    "reduction_forward": 1,
    "reduction_backward": 2,
    "head": 1,
}


def _profile(args: argparse.Namespace, name: str, result: dict) -> None:
    """Where the composed engine's time goes, on the best and the median CIFAR-10 archs.

    1. Steady wall time at batch 4 (compute is tiny: Python and dispatch dominate) and at
       the run's batch size; the number of piece calls per architecture.
    2. At the run's batch size, every piece timed synchronously (block_until_ready) by
       wrapping the engine's jitted pieces (private attributes: a measurement, not an API),
       and each piece's correlation share estimated from a jitted `add_term` timed alone at
       the same shapes; the rest of a piece's time is its convolutions, BN, pools, ReLUs.
    """
    import jax
    import jax.numpy as jnp

    from wrcor_jax.proxies import RESPONSE_PROXIES
    from wrcor_jax.responses import SiteSums, add_term, empty_block
    from wrcor_jax.spaces.nb201 import init_params
    from wrcor_jax.spaces.nb201_engine import NB201Engine

    params = jax.device_put(init_params(WEIGHT_SEED, NUM_CLASSES))
    engine = NB201Engine()
    calls: list[tuple[str, tuple[int, ...], float]] = []
    timing = {"enabled": False}

    def wrap(piece: str, fn: Callable) -> Callable:
        def call(*call_args, **kwargs):
            if not timing["enabled"]:
                calls.append((piece, (), 0.0))
                return fn(*call_args, **kwargs)
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*call_args, **kwargs))
            calls.append((piece, call_args[_MAIN_ARG[piece]].shape, time.perf_counter() - start))
            return out

        return call

    for piece in _MAIN_ARG:
        setattr(engine, f"_{piece}", wrap(piece, getattr(engine, f"_{piece}")))

    def median_time(fn: Callable, reps: int = 5) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    out = {}
    for arch_name, arch in (("best", BEST), ("median", MEDIAN)):
        ops = parse_arch(arch)
        entry = {}
        for batch_size in (4, args.batch_size):
            images, labels = _batch(args, batch_size)
            x, y = jnp.asarray(images), jnp.asarray(labels)
            calls.clear()
            sums = engine.site_sums(ops, params, x, y)
            entry["piece_calls"] = len(calls)
            entry[f"wall_s_batch_{batch_size}"] = median_time(
                lambda o=ops, x=x, y=y: RESPONSE_PROXIES["wrcor"](engine.site_sums(o, params, x, y))
            )
        entry["host_scoring_s"] = median_time(lambda s=sums: RESPONSE_PROXIES["wrcor"](s), reps=20)
        blocks = engine._blocks(tuple(int(o) for o in ops), params, x, y)
        entry["gather_sums_s"] = median_time(lambda b=blocks: SiteSums.from_blocks(b))
        timing["enabled"] = True
        calls.clear()
        jax.block_until_ready(engine._blocks(tuple(int(o) for o in ops), params, x, y))
        timing["enabled"] = False
        entry.update(_piece_breakdown(calls, args.batch_size, add_term, empty_block))
        out[arch_name] = entry
    result["profile"] = out


def _piece_breakdown(calls: list, batch_size: int, add_term: Callable, empty_block: Callable):
    """Per-piece synchronous seconds and the correlation share of them."""
    import jax
    import jax.numpy as jnp

    term = jax.jit(lambda block, r: add_term(block, "act", r))
    block = empty_block(batch_size)
    corr_cost: dict[int, float] = {}

    def corr_seconds(elements: int) -> float:
        if elements not in corr_cost:
            r = jnp.ones((batch_size, elements // batch_size)) * jnp.arange(elements // batch_size)
            jax.block_until_ready(term(block, r))
            samples = []
            for _ in range(7):
                start = time.perf_counter()
                jax.block_until_ready(term(block, r))
                samples.append(time.perf_counter() - start)
            corr_cost[elements] = statistics.median(samples)
        return corr_cost[elements]

    per_piece: Counter = Counter()
    corr_total = 0.0
    for piece, shape, seconds in calls:
        per_piece[piece] += seconds
        elements = int(np.prod(shape))
        for scale, count in _CORR_TERMS.get(piece, []):
            corr_total += count * corr_seconds(int(elements * scale))
    return {
        "sync_piece_s": dict(per_piece),
        "sync_total_s": sum(per_piece.values()),
        "correlation_s_estimate": corr_total,
    }


# --------------------------------------------------------------------------- driver


def _machine(args: argparse.Namespace) -> dict:
    cpuinfo = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        cpuinfo.setdefault(key.strip(), value.strip())  # the first processor's entries
    return {
        "cpu": cpuinfo.get("model name", platform.processor()),
        "cpu_family_model": f"{cpuinfo.get('cpu family')}/{cpuinfo.get('model')}",
        "avx512": "avx512f" in cpuinfo.get("flags", "").split(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "numpy", "torch")},
        "torch_threads": args.torch_threads,
        "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_start": os.getloadavg(),
    }


def _spawn(args: argparse.Namespace, name: str) -> dict:
    """Run one implementation in a fresh interpreter (its own peak RSS, its own compiles)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, *args.argv, "--worker", name, "--worker-out", str(out)]
        start, load = time.perf_counter(), os.getloadavg()[0]
        try:
            subprocess.run(command, check=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"name": name, "status": f"failed: timed out after {args.timeout} s"}
        except subprocess.CalledProcessError as exc:
            return {"name": name, "status": f"failed: exit status {exc.returncode}"}
        result = json.loads(out.read_text())
        result["process_s"] = time.perf_counter() - start
        # The 1-minute load average around the run: the machine is shared, so say how busy.
        result["extra"]["load_1min_before_after"] = [load, os.getloadavg()[0]]
        return result


def _floor_seconds(args: argparse.Namespace, rate: float) -> list[float]:
    """Per mbv2 arch, the FLOP floor of scoring `--proxies` at `rate` FLOP/s (the module
    docstring says how it counts)."""
    from wrcor_jax.spaces.mbv2.cost import describe

    batch_passes = sum(proxy in ("wrcor", "jacob_cov") for proxy in args.proxies)
    passes = 3 * args.batch_size * batch_passes + 3 * ("synflow" in args.proxies)
    return [2 * describe(a, NUM_CLASSES).flops * passes / rate for a in _archs(args, None)]


def _summarise(
    raw: dict,
    baseline: dict | None,
    proxies: tuple[str, ...],
    paper: dict | None = None,
    floors: list[float] | None = None,
) -> dict:
    """One implementation's row; `paper` (the paper_code result) and `floors` (per arch)
    only in mbv2."""
    steady = raw.get("steady_s", [])
    row = {
        "name": raw["name"],
        "status": raw["status"],
        "archs": len(raw.get("scores", [])),
        "first_call_s": raw.get("first_call_s"),
        "compiles": raw.get("compiles"),
        "median_s": statistics.median(steady) if steady else None,
        "p90_s": float(np.percentile(steady, 90)) if steady else None,
        "archs_per_s": len(steady) / sum(steady) if steady else None,
        "peak_rss_mb": raw.get("peak_rss_mb"),
        **raw.get("extra", {}),
    }
    if baseline is not None and row["median_s"]:
        row["ratio_vs_torch_eager"] = baseline["median_s"] / row["median_s"]
        for i, proxy in enumerate(proxies):
            row[f"{proxy}_max_rel_diff_vs_torch_eager"] = _max_rel_diff(
                [scores[i] for scores in raw["scores"]],
                [scores[i] for scores in baseline["scores"]],
            )
    if paper is not None and paper.get("steady_s") and row["median_s"]:
        row["ratio_vs_paper_code"] = statistics.median(paper["steady_s"]) / row["median_s"]
    if floors is not None and steady:
        row["floor_median_s"] = statistics.median(floors[1 : 1 + len(steady)])
        row["x_floor"] = row["median_s"] / row["floor_median_s"]
    return row


def _max_rel_diff(ours: list[float], theirs: list[float]) -> float | str:
    """Over the archs both scored; 'disagree on -inf' (or nan) where one side alone is."""
    worst = 0.0
    for a, b in zip(ours, theirs, strict=False):
        if (np.isneginf(a) and np.isneginf(b)) or (np.isnan(a) and np.isnan(b)):
            continue
        if not (np.isfinite(a) and np.isfinite(b)):
            return f"disagree on {b if np.isfinite(a) else a}"
        worst = max(worst, abs(a - b) / abs(b))
    return worst


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: list[dict], proxies: tuple[str, ...] = ("wrcor",)) -> str:
    """The summary as a Markdown table (one row per implementation); the mbv2 columns (x
    paper code, the FLOP floor) where some row has them."""
    differences = [
        (f"{p}_max_rel_diff_vs_torch_eager", f"{'WRCor' if p == 'wrcor' else p} max rel diff")
        for p in proxies
    ]
    optional = [
        ("ratio_vs_paper_code", "x paper code"),
        ("floor_median_s", "FLOP floor s/arch"),
        ("x_floor", "x floor"),
    ]
    columns = [
        ("name", "implementation"),
        ("archs", "archs"),
        ("first_call_s", "first call s"),
        ("compiles", "compiles"),
        ("median_s", "median s/arch"),
        ("p90_s", "p90 s/arch"),
        ("archs_per_s", "archs/s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("ratio_vs_torch_eager", "x torch eager"),
        *[(key, title) for key, title in optional if any(key in row for row in rows)],
        *differences,
        ("status", "status"),
    ]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-archs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 .npz sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture sample")
    parser.add_argument("--skip-vmap", action="store_true")
    parser.add_argument("--only", help="comma-separated implementations (default: all)")
    parser.add_argument(
        "--limit", action="append", default=[], metavar="NAME=N", help="archs for one impl"
    )
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--vmap-chunk", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="also profile jax_composed")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per implementation")
    parser.add_argument("--space", choices=sorted(SPACE_WORKERS), default="nb201")
    parser.add_argument(
        "--proxies",
        default=("wrcor",),
        type=lambda text: tuple(text.split(",")),
        help=f"mbv2: comma-separated, of {', '.join(MBV2_PROXIES)}",
    )
    parser.add_argument("--reference-code", type=Path, help="mbv2: a ZSNAS-WRCor checkout")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    workers = SPACE_WORKERS[args.space]
    args.limits = {}
    for item in args.limit:
        name, _, count = item.partition("=")
        if name not in workers or not count.isdigit():
            parser.error(f"--limit wants NAME=N with NAME in {', '.join(workers)}; got {item!r}")
        args.limits[name] = int(count)
    args.names = args.only.split(",") if args.only else list(workers)
    if args.skip_vmap:
        args.names = [n for n in args.names if n != "jax_vmap"]
    unknown = [n for n in args.names if n not in workers]
    if unknown:
        parser.error(f"unknown implementation {unknown[0]!r}; known: {', '.join(workers)}")
    allowed = MBV2_PROXIES if args.space == "mbv2" else ("wrcor",)
    if any(proxy not in allowed for proxy in args.proxies):
        parser.error(f"--proxies in {args.space}: some of {', '.join(allowed)}")
    if args.space == "mbv2":
        if args.profile:
            parser.error("--profile profiles the NB201 engine only")
        if args.reference_code is None:
            if args.only and "paper_code" in args.names:
                parser.error("paper_code needs --reference-code")
            args.names = [n for n in args.names if n != "paper_code"]
    return args


def main(argv: list[str] | None = None) -> None:
    # On this shared 2-core machine, spinning thread pools fight other jobs (docs/timing.md):
    # OpenBLAS threads made each 64-row corrcoef in the torch hooks ~50x slower, and torch's
    # OpenMP pool at 2 threads ran ~3x slower than 1 thread unless its idle threads sleep.
    # Workers inherit these before they import numpy or torch.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parse_args(argv)
    if args.worker:
        _run_worker(args)
        return
    machine = _machine(args)
    raw = {}
    for name in args.names:
        print(f"[timing] {name} ...", file=sys.stderr, flush=True)
        raw[name] = _spawn(args, name)
        print(f"[timing] {name}: {raw[name]['status']}", file=sys.stderr, flush=True)
    eager = [raw[n] for n in TORCH_EAGER if n in raw and raw[n].get("steady_s")]
    baseline = min(eager, key=lambda r: statistics.median(r["steady_s"]), default=None)
    if baseline is not None:
        baseline = {"median_s": statistics.median(baseline["steady_s"]), **baseline}
    mbv2, paper, floors = {}, None, None
    if args.space == "mbv2":
        from wrcor_jax.benchmarks.machine import matmul_flops_per_s

        rate = matmul_flops_per_s()
        floors = _floor_seconds(args, rate)
        paper = raw.get("paper_code")
        mbv2 = {"space": "mbv2", "proxies": list(args.proxies), "matmul_gflops": rate / 1e9}
    rows = [_summarise(raw[n], baseline, args.proxies, paper, floors) for n in args.names]
    report = {
        "machine": {**machine, "load_average_end": os.getloadavg()},
        "command": " ".join(["python", "experiments/timing_vs_pytorch.py", *args.argv]),
        "num_archs": args.num_archs,
        "batch_size": args.batch_size,
        "arch_seed": args.seed,
        "ratio_baseline": baseline["name"] if baseline else None,
        **mbv2,
        "implementations": rows,
    }
    if args.profile:
        report["profile"] = _spawn(args, "profile").get("profile")
    write_json(args.json, report, indent=2)
    print(markdown_table(rows, args.proxies))
    if baseline:
        print(f"\nratio baseline: {baseline['name']} (the faster torch eager configuration)")
    if report.get("profile"):
        print("\nprofile of jax_composed:\n" + json.dumps(report["profile"], indent=2))


if __name__ == "__main__":
    main()
