"""Time zero-shot scoring in PyTorch, in the paper's own code and in JAX, side by side.

Every implementation scores the same seeded random architectures on the same batch with the
same weights (NB201: `init_params(42, classes)`), each in its own subprocess so that its
peak RSS is its own; they run one after another. Per implementation: the first call
(compilation included), compilations, steady seconds per architecture (median and p90,
first call excluded), architectures per second, peak RSS, the speed ratios against PyTorch
eager and the paper's code, per-proxy largest relative differences from PyTorch eager, and
the FLOP floor.

    python experiments/timing_vs_pytorch.py --num-archs 100 --batch-size 64 --json t.json

`--proxies` (default wrcor; any of wrcor, act_cor, act_grad_cor, synflow, snip, grad_norm,
jacob_cov, naswot: the proxies the paper's code has too) are scored per architecture.
Implementations (`--only` picks some, `--limit NAME=N` scores only the first N archs):
- paper_code (needs `--reference-code`, a kunjing96/ZSNAS-WRCor checkout, run unmodified
  through `torch_ref.paper_code`): its `get_nasbench201_model` network with our weights
  loaded, its `find_measures` (act_grad_cor_weighted is WRCor, act_hamming naswot,
  jacob_cor jacob_cov), `--torch-threads` threads;
- paper_code_2proc: the same as two processes at once, each on its half of the archs with
  one torch thread (the paper's code on all cores); per-arch seconds at their aggregate
  rate (a part's per-arch time / 2);
- torch_eager: our PyTorch twin (`torch_ref`), the reference's hooks, one pass per proxy,
  `--torch-threads` threads; torch_eager_1thread: the same with one thread;
- jax_composed: the `score` command's path (`NB201Scorer`, the composed engine), one arch
  per call; jax_2workers: the same with `workers=2`, chunks of 8 archs scored two at a time
  from threads as `score --workers 2` does (an arch's time: its chunk's / 8);
- WRCor alone (dropped when `--proxies` is anything else): torch_compile (the twin after
  `nn.Module.compile()`, hooks kept, one thread); jax_static_jit (`NB201Engine(
  static_per_arch=True)`: one jit per architecture; per-arch time is compile + run, each
  arch is run twice and the second call gives the run alone); jax_vmap (`vmapped_site_sums`
  over chunks of `--vmap-chunk` archs; skip with --skip-vmap).
`--profile` adds where the composed engine's time goes (see `_profile`).
The jax rows run with `wrcor_jax.allocator`'s tuned glibc malloc and its large-block
allocator preloaded, as the command line does (`WRCOR_JAX_MALLOC=default` keeps glibc's
defaults and preloads nothing); the torch rows keep the defaults unless `--torch-malloc
tuned` (torch asks for its tensors through `posix_memalign` too). Each row's
`extra.malloc_tuned` and `extra.malloc_mode` say which it had. The rows of the
`score` path (jax, jax_2workers) keep compiled programs on disk as `score` does
(`--compile-cache DIR`, `--no-compile-cache`): when `ExecutableBudget` releases the
executables between an architecture's untimed and timed calls, they are read back rather
than compiled again. Give a fresh directory for compile counts from nothing.

The FLOP floor (`floor_median_s`, the median over a row's timed archs; `x_floor`, the row's
median over it): per arch, the FLOPs its proxies' measurements need (`FLOOR_COUNTS`; proxies
that share one count it once), over rates measured here (`benchmarks.machine`). NB201,
`_nb201_flops`: convolutions (stem, the conv ops present, reduction cells, classifier; 2
FLOPs a multiply-add) once forward and once backward for the data gradient (WRCor does not
need the stem's), at the batch, each stage at the float32 conv3x3 rate at its width and
resolution; the N x N Gram matrix of every distinct response WRCor reads (2 N^2 D FLOPs, D
its features) at the rate of a 64 x 16,384 Gram; jacob_cov a forward and a data backward
to the images and one Gram of the input gradients; synflow a forward and a backward of data
and weight gradients of one image; snip, grad_norm that at the batch; naswot a forward and
the Grams of the forward responses.

`--space mbv2` times the MobileNetV2 space instead (`--proxies` of wrcor, synflow,
jacob_cov): seeded random architectures within 600M FLOPs (1000 classes,
`spaces.mbv2.sampling.sample`), the 10-class network, weights `init_params(arch, 42, 10)`
drawn per arch before the clock starts; rows paper_code (its PlainNet), torch_eager (our
twin, `torch_ref.mbv2`) and jax (`MBV2Scorer` through the `score` path, one arch per call).
Its floor counts the same passes over all convolutions and the classifier (`cost.describe`
at 10 classes) at the float32 matmul rate, its Gram matrices (small) not counted.

`--archs FILE` times the architectures of a file instead of a seeded sample (one text form
of `--space` per line, `#` lines skipped), e.g. those a search evaluated: on 32 of the
MobileNetV2 search's the paper's code took 19.2 s median on an Intel Xeon and 21.6 s on an
AMD EPYC (2 cores each), and 29.7 s on 6 random ones (the Xeon).

On a machine with an accelerator the jax rows use the device JAX sees (its float32 matmul
rate sets the floor), and `--torch-device cuda` runs the paper_code rows on the GPU (its
`find_measures` moves network and batch there itself); the machine record names both.

    python experiments/timing_vs_pytorch.py --proxies synflow,jacob_cov,wrcor \
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
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import numpy as np

from wrcor_jax import allocator
from wrcor_jax.cli import add_compile_cache_options, read_arch_file, use_compile_cache
from wrcor_jax.jsonio import write_json
from wrcor_jax.spaces.nb201 import (
    BEST_CIFAR10,
    CELL_PLAN,
    CONV_KERNEL,
    EDGES,
    MEDIAN_CIFAR10,
    STEM_CHANNELS,
    arch_string,
    block_macs,
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
NB201_PROXIES = (
    "wrcor", "act_cor", "act_grad_cor", "synflow", "snip", "grad_norm", "jacob_cov", "naswot",
)  # fmt: skip
"""The proxies the paper's code has too (`torch_ref.paper_code.PAPER_MEASURES`)."""


# --------------------------------------------------------------------------- workers


def _batch(args: argparse.Namespace, batch_size: int | None = None):
    from wrcor_jax.data import load_batch

    return load_batch("cifar10", batch_size or args.batch_size, BATCH_SEED, data=args.data)


def _shard_bounds(count: int, shard: tuple[int, int]) -> tuple[int, int]:
    """[start, stop) of part `shard` = (index, parts) of `count` archs: contiguous, so the
    parts' scores concatenate in the sample's order."""
    index, parts = shard
    return count * index // parts, count * (index + 1) // parts


def _read_archs(args: argparse.Namespace) -> list:
    """`--archs`' lines in `--space`'s text form: `MBV2Arch`s, or NB201 strings."""
    texts = read_arch_file(args.archs)
    if args.space == "mbv2":
        from wrcor_jax.spaces.mbv2.arch import parse

        return [parse(text) for text in texts]
    return [arch_string(parse_arch(text)) for text in texts]


def _sample(args: argparse.Namespace, name: str | None) -> list:
    """The first `--limit name=N` (default all) of the architectures: `--archs`' (e.g. a
    search's own), else the seeded sample of `--space`: NB201 strings, or `MBV2Arch`s within
    600M FLOPs (1000 classes)."""
    rng = np.random.default_rng(args.seed)
    if args.archs:
        archs = _read_archs(args)
    elif args.space == "mbv2":
        from wrcor_jax.spaces.mbv2.sampling import sample

        archs = sample(rng, args.num_archs, flops_limit=MBV2_FLOPS_LIMIT)
    else:
        archs = [arch_string(o) for o in sample_archs(rng, args.num_archs)]
    return archs[: args.limits.get(name, len(archs))]


def _archs(args: argparse.Namespace, name: str | None) -> list:
    """What worker `name` scores: its `_sample`, or the worker's `--shard` of it."""
    archs = _sample(args, name)
    return archs[slice(*_shard_bounds(len(archs), args.shard))] if args.shard else archs


def _torch_batch(args: argparse.Namespace):
    """The batch as torch NCHW images and int64 labels."""
    import torch

    images, labels = _batch(args)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def _weights(args: argparse.Namespace) -> Callable[[object], dict]:
    """arch -> the Flax weights every implementation scores it with: NB201's supernet
    `init_params(42, 10)`, one for all archs; in mbv2 `init_params(arch, 42, 10)`."""
    if args.space == "mbv2":
        from wrcor_jax.spaces.mbv2.network import init_params

        return lambda arch: init_params(arch, WEIGHT_SEED, NUM_CLASSES)
    from wrcor_jax.spaces.nb201 import init_params

    params = init_params(WEIGHT_SEED, NUM_CLASSES)
    return lambda arch: params


def _paper_scorer(args: argparse.Namespace, result: dict) -> Callable[[object, dict], list]:
    """(arch, weights) -> `--proxies` scores from the paper's code: its network with the
    weights loaded, its `find_measures` (`torch_ref.paper_code`)."""
    from wrcor_jax.torch_ref.paper_code import import_paper_code, paper_network, paper_scores

    code = import_paper_code(args.reference_code)
    images, labels = _batch(args)

    def score(arch, params: dict) -> list[float]:
        net = paper_network(code, arch, NUM_CLASSES, params)
        values = paper_scores(
            code, net, images, labels, NUM_CLASSES, args.proxies, args.torch_device
        )
        return [values[proxy] for proxy in args.proxies]

    return score


def _twin_scorer(args: argparse.Namespace, result: dict) -> Callable[[object, dict], list]:
    """(arch, weights) -> `--proxies` scores from our PyTorch twin of the space's network
    (`torch_ref`: the reference's WRCor hooks, its proxies' conventions), compiled first
    for torch_compile (its graph count and graph breaks go into `result`)."""
    from wrcor_jax.torch_ref import mbv2, nb201
    from wrcor_jax.torch_ref.proxies import grad_norm, jacob_cov, naswot, snip, synflow
    from wrcor_jax.torch_ref.wrcor import act_cor, act_grad_cor, wrcor

    x, y = _torch_batch(args)
    compute = {
        "wrcor": lambda net: wrcor(net, x, y, "reference").score,
        "act_cor": lambda net: act_cor(net, x, y).score,
        "act_grad_cor": lambda net: act_grad_cor(net, x, y).score,
        "synflow": lambda net: synflow(net, tuple(x.shape[1:])),
        "snip": lambda net: snip(net, x, y),
        "grad_norm": lambda net: grad_norm(net, x, y),
        "jacob_cov": lambda net: jacob_cov(net, x),
        "naswot": lambda net: naswot(net, x),
    }
    build = (mbv2 if args.space == "mbv2" else nb201).build_network
    compiled = args.worker == "torch_compile"
    if compiled:
        from torch._dynamo.utils import counters

    def score(arch, params: dict) -> list[float]:
        net = build(arch, NUM_CLASSES, params)
        if compiled:
            net.compile()
        row = [compute[proxy](net) for proxy in args.proxies]
        if compiled:
            result["compiles"] = counters["stats"]["unique_graphs"]
            result["extra"]["graph_breaks"] = sum(counters["graph_break"].values())
        return row

    return score


def _torch_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """Per arch, as a search scores a new one: build the network (the paper's own for the
    paper_code rows, else our twin) with the arch's weights (drawn before the clock starts)
    and score `--proxies` with it."""
    import torch

    threads = args.torch_threads if name in ("torch_eager", "paper_code") else 1
    torch.set_num_threads(threads)
    result["extra"] = {"torch_threads": threads}
    scorer = _paper_scorer if name.startswith("paper_code") else _twin_scorer
    score, weights = scorer(args, result), _weights(args)
    for arch in _archs(args, name):
        params = weights(arch)
        start = time.perf_counter()
        row = score(arch, params)
        _record(result, time.perf_counter() - start, [row])


def _scorer_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """The `score` command's path: the space's scorer of a `ScoreConfig` (its defaults but
    `workers`), its weights drawn from the seed as the torch rows' are. One arch per call
    with one worker; with 2 (jax_2workers) chunks of `chunk_size` archs, scored two at a time
    from threads as `score --workers 2` does (an arch's time: its chunk's over its size).
    Compilations counted by `CompileCounter` from the first score on. `--warm` scores each
    chunk once untimed first, so the time is the steady cost once its programs exist."""
    from wrcor_jax.compilation import CompileCounter
    from wrcor_jax.scoring import ScoreConfig
    from wrcor_jax.spaces import get_space

    CompileCounter.install()
    use_compile_cache(args)
    workers = 2 if name == "jax_2workers" else 1
    config = ScoreConfig(
        args.space, "cifar10", args.proxies, BATCH_SEED, args.batch_size, str(args.data),
        workers=workers,
    )  # fmt: skip
    space = get_space(args.space)
    scorer = space.scorer(config)
    result["extra"] = {"workers": workers}
    compiles = CompileCounter.count
    archs = [space.read(a) if isinstance(a, str) else a for a in _archs(args, name)]
    size = 1 if workers == 1 else config.chunk_size
    for chunk in [archs[:1]] + [archs[i : i + size] for i in range(1, len(archs), size)]:
        if args.warm:
            scorer.score(chunk)
        start = time.perf_counter()
        rows = scorer.score(chunk)
        _record(result, time.perf_counter() - start, rows)
        result["compiles"] = CompileCounter.count - compiles


def _jax_worker(args: argparse.Namespace, name: str, result: dict) -> None:
    """WRCor from one of the NB201 engine variants the `score` path does not use (static
    per-arch jit, vmap); compilations counted by `CompileCounter`."""
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

    engine = NB201Engine(static_per_arch=True)
    runs = []
    for o in ops:
        start = time.perf_counter()
        score = wrcor(engine.site_sums(o, params, x, y))
        _record(result, time.perf_counter() - start, [[score]])
        start = time.perf_counter()  # the same arch again: the run without its compile
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


def _record(result: dict, seconds: float, scores: list[list[float]]) -> None:
    """One timed call that scored `len(scores)` archs (a row of `--proxies` scores each):
    the first call, or steady samples (and their archs' positions, for the floor)."""
    if result["first_call_s"] is None:
        result["first_call_s"] = seconds
    else:
        done = len(result["scores"])
        result["timed"] += range(done, done + len(scores))
        result["steady_s"] += [seconds / len(scores)] * len(scores)
    result["scores"] += scores


def _run_worker(args: argparse.Namespace) -> None:
    """Subprocess entry: time one implementation, write its raw result as JSON."""
    result = {
        "name": args.worker,
        "status": "ok",
        "first_call_s": None,
        "steady_s": [],
        "timed": [],
        "scores": [],
        "compiles": None,
        "extra": {},
    }
    worker = _profile if args.worker == "profile" else SPACE_WORKERS[args.space][args.worker]
    try:
        worker(args, args.worker, result)
    except Exception as exc:  # a failed implementation is a result, not a crash
        result["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    if args.shard:  # positions in the whole sample
        offset = _shard_bounds(len(_sample(args, args.worker)), args.shard)[0]
        result["timed"] = [offset + i for i in result["timed"]]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tuned = result["extra"]["malloc_tuned"] = allocator.tuned()
    result["extra"]["malloc_mode"] = allocator.mode() if tuned else "default"
    write_json(args.worker_out, result)


WORKERS: dict[str, Callable[[argparse.Namespace, str, dict], None]] = {
    "paper_code": _torch_worker,
    "paper_code_2proc": _torch_worker,
    "torch_eager": _torch_worker,
    "torch_eager_1thread": _torch_worker,
    "torch_compile": _torch_worker,
    "jax_composed": _scorer_worker,
    "jax_2workers": _scorer_worker,
    "jax_static_jit": _jax_worker,
    "jax_vmap": _jax_worker,
}
MBV2_WORKERS: dict[str, Callable[[argparse.Namespace, str, dict], None]] = {
    "paper_code": _torch_worker,
    "torch_eager": _torch_worker,
    "jax": _scorer_worker,
}
SPACE_WORKERS = {"nb201": WORKERS, "mbv2": MBV2_WORKERS}
PROCESSES = {"paper_code_2proc": 2}
"""Rows run as that many processes at once, each on its contiguous share of the archs with
one torch thread: the paper's code on all cores, one process per core."""
WRCOR_ONLY = ("torch_compile", "jax_static_jit", "jax_vmap")
"""Rows that time WRCor alone (engine variants, or torch.compile of the hooked network)."""


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
        "torch_device": args.torch_device,
        "jax_devices": _jax_devices(),
        "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_start": os.getloadavg(),
    }


def _jax_devices() -> str:
    """What JAX scores on, asked in a child process: the parent keeps no device (on a GPU,
    JAX's allocator would hold its memory while the workers run)."""
    code = "from wrcor_jax.benchmarks.machine import jax_devices; print(jax_devices())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return run.stdout.strip() or f"unknown: {run.stderr.strip().splitlines()[-1:]}"


def _spawn(args: argparse.Namespace, name: str, extra: tuple[str, ...] = ()) -> dict:
    """Run one implementation in a fresh interpreter (its own peak RSS, its own compiles),
    `extra` arguments added to its command line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = ["--worker", name, "--worker-out", str(out)]
        command = [sys.executable, __file__, *args.argv, *extra, *worker]
        tune = allocator.wanted() if name.startswith("jax") else args.torch_malloc == "tuned"
        start, load = time.perf_counter(), os.getloadavg()[0]
        try:
            subprocess.run(
                command, check=True, timeout=args.timeout, env=allocator.environment(tune)
            )
        except subprocess.TimeoutExpired:
            return {"name": name, "status": f"failed: timed out after {args.timeout} s"}
        except subprocess.CalledProcessError as exc:
            return {"name": name, "status": f"failed: exit status {exc.returncode}"}
        result = json.loads(out.read_text())
        result["process_s"] = time.perf_counter() - start
        # The 1-minute load average around the run: the machine is shared, so say how busy.
        result["extra"]["load_1min_before_after"] = [load, os.getloadavg()[0]]
        return result


def _spawn_processes(args: argparse.Namespace, name: str, count: int) -> dict:
    """`count` processes of implementation `name` at once, process i on `--shard i/count` of
    the archs; one row at their aggregate rate (a part's per-arch seconds over `count`),
    their peak RSS summed, the slower part's first call and process time."""
    shards = [("--shard", f"{i}/{count}") for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        parts = list(pool.map(lambda shard: _spawn(args, name, shard), shards))
    failed = [part["status"] for part in parts if part["status"] != "ok"]
    if failed:
        return {"name": name, "status": failed[0]}
    return {
        "name": name,
        "status": "ok",
        "first_call_s": max(part["first_call_s"] for part in parts),
        "steady_s": [seconds / count for part in parts for seconds in part["steady_s"]],
        "timed": [i for part in parts for i in part["timed"]],
        "scores": [row for part in parts for row in part["scores"]],
        "compiles": None,
        "peak_rss_mb": sum(part["peak_rss_mb"] for part in parts),
        "process_s": max(part["process_s"] for part in parts),
        "extra": {**parts[0]["extra"], "processes": count},
    }


# --------------------------------------------------------------------------- FLOP floor


class FloorCount(NamedTuple):
    """What the floor counts for one measurement: network passes over the cells and over
    the stem (a pass: 2 x the forward multiply-adds; forward, data-gradient backward,
    weight-gradient backward), over the batch or one image, and which N x N Gram matrices
    (2 N^2 D FLOPs each): "responses" (every distinct response of WRCor's reference site
    set), "forward" (its forward ones), "images" (one of the input gradients)."""

    passes: int
    stem_passes: int
    batch: bool
    grams: str = ""


FLOOR_COUNTS = {
    "site_sums": FloorCount(2, 1, True, "responses"),  # no data gradient to the images
    "input_jacobian": FloorCount(2, 2, True, "images"),
    "synflow_grads": FloorCount(3, 2, False),
    "loss_grads": FloorCount(3, 2, True),
    "activations": FloorCount(1, 1, True, "forward"),
}
"""Per measurement (`wrcor_jax.proxies`: the WRCor family reads site_sums, jacob_cov the
input Jacobian, synflow its one-image gradients, snip and grad_norm the loss gradients,
naswot the activations); proxies that share a measurement count it once."""
NB201_IMAGE = (32, 32, 3)
NB201_STAGES = ((16, 32), (32, 16), (64, 8))  # (width, image size) of the three stages


def _nb201_responses(ops: np.ndarray) -> list[tuple[int, bool]]:
    """(features D, is forward) of each distinct response WRCor's reference site set reads
    (SPEC 3a), one per tensor as the engine correlates them: per conv op the gradients at
    its ReLU's and its BatchNorm's inputs, its input once per node however many conv ops
    read it; per reduction cell the input and those two gradients of conv_a and conv_b;
    the final ReLU's output and input gradient."""
    h, w, _ = NB201_IMAGE
    responses = []
    for c_in, c_out, reduction in CELL_PLAN:
        features = h * w * c_in
        if reduction:
            h, w = h // 2, w // 2
            out = h * w * c_out
            responses += [(features, True), (features, False), (out, False)]  # conv_a
            responses += [(out, True), (out, False), (out, False)]  # conv_b
            continue
        read = [EDGES[e][1] for e, op in enumerate(ops) if op in CONV_KERNEL]
        responses += [(features, True)] * len(set(read)) + [(features, False)] * 2 * len(read)
    features = h * w * CELL_PLAN[-1][1]
    return [*responses, (features, True), (features, False)]


def _nb201_flops(ops: np.ndarray, batch: int, measurements: Collection[str]) -> Counter:
    """FLOPs of scoring one NB201 arch, by the rate they run at: convolutions at their
    stage's width (conv_16/32/64: `block_macs`' stem, cells, classifier; `none` edges cost
    nothing), Gram matrices (gram)."""
    macs = block_macs(ops, (batch, *NB201_IMAGE), NUM_CLASSES)
    widths = [STEM_CHANNELS, *(c_out for _, c_out, _ in CELL_PLAN), CELL_PLAN[-1][1]]
    responses = _nb201_responses(ops)
    grams = {
        "": [],
        "responses": [d for d, _ in responses],
        "forward": [d for d, forward in responses if forward],
        "images": [int(np.prod(NB201_IMAGE))],
    }
    flops: Counter = Counter()
    for measurement in measurements:
        count = FLOOR_COUNTS[measurement]
        images = batch if count.batch else 1
        for block, (mac, width) in enumerate(zip(macs, widths, strict=True)):
            passes = count.stem_passes if block == 0 else count.passes
            flops[f"conv_{width}"] += 2 * mac * images * passes
        flops["gram"] += sum(2 * batch**2 * d for d in grams[count.grams])
    return flops


def _mbv2_flops(arch, batch: int, measurements: Collection[str]) -> Counter:
    """FLOPs of scoring one mbv2 arch: the passes of `FLOOR_COUNTS` over all its
    convolutions and the classifier (`cost.describe` at 10 classes), all at matmul rate; its
    Gram matrices (small: WRCor reads only the SE ReLUs) not counted."""
    from wrcor_jax.spaces.mbv2.cost import describe

    macs = describe(arch, NUM_CLASSES).flops
    passes = sum(
        FLOOR_COUNTS[m].passes * (batch if FLOOR_COUNTS[m].batch else 1) for m in measurements
    )
    return Counter(matmul=2 * macs * passes)


def _floors(args: argparse.Namespace) -> tuple[list[float], dict[str, float]]:
    """Per arch of the sample, the FLOP floor of scoring `--proxies`: its FLOPs over the
    rates measured here (the module docstring says how it counts); and those rates,
    GFLOP/s."""
    from wrcor_jax.benchmarks import machine
    from wrcor_jax.proxies import PROXIES

    measurements = {PROXIES[proxy].measurement for proxy in args.proxies}
    if args.space == "mbv2":
        rates = {"matmul": machine.matmul_flops_per_s()}
        counts = [_mbv2_flops(a, args.batch_size, measurements) for a in _sample(args, None)]
    else:
        rates = {
            f"conv_{width}": machine.conv_flops_per_s(args.batch_size, size, width)
            for width, size in NB201_STAGES
        }
        # At the first stage's responses (16 x 32 x 32 features, the largest; half of the
        # Gram FLOPs).
        width, size = NB201_STAGES[0]
        rates["gram"] = machine.gram_flops_per_s(args.batch_size, width * size**2)
        counts = [
            _nb201_flops(parse_arch(a), args.batch_size, measurements) for a in _sample(args, None)
        ]
    floors = [sum(flops / rates[kind] for kind, flops in count.items()) for count in counts]
    return floors, {f"{kind}_gflops": rate / 1e9 for kind, rate in rates.items()}


def _summarise(
    raw: dict,
    baseline: dict | None,
    proxies: tuple[str, ...],
    paper: dict | None = None,
    floors: list[float] | None = None,
) -> dict:
    """One implementation's row: ratios to the `baseline` and to `paper` (the paper_code
    result, when run), the median FLOP floor of the archs it timed (`floors`: per arch of
    the sample)."""
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
        "steady_s": steady,
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
        row["floor_median_s"] = statistics.median([floors[i] for i in raw["timed"]])
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
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--num-archs", type=int, default=100, help="seeded random archs")
    which.add_argument(
        "--archs", help="file of archs in --space's text form, one per line (instead of a sample)"
    )
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
    parser.add_argument(
        "--warm",
        action="store_true",
        help="score-path rows: time a second call per chunk (compilations done by the first)",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per implementation")
    add_compile_cache_options(parser)
    parser.add_argument(
        "--torch-malloc",
        choices=("default", "tuned"),
        default="default",
        help="allocator of the torch rows (jax rows: wrcor_jax.allocator's, as the CLI)",
    )
    parser.add_argument("--space", choices=sorted(SPACE_WORKERS), default="nb201")
    parser.add_argument(
        "--proxies",
        default=("wrcor",),
        type=lambda text: tuple(text.split(",")),
        help=f"comma-separated, of {', '.join(NB201_PROXIES)} (mbv2: {', '.join(MBV2_PROXIES)})",
    )
    parser.add_argument("--reference-code", type=Path, help="a ZSNAS-WRCor checkout")
    parser.add_argument(
        "--torch-device", default="cpu", help="torch device of the paper_code rows, e.g. cuda"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--shard", type=lambda text: tuple(map(int, text.split("/"))), help=argparse.SUPPRESS
    )
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
    allowed = MBV2_PROXIES if args.space == "mbv2" else NB201_PROXIES
    if any(proxy not in allowed for proxy in args.proxies):
        parser.error(f"--proxies in {args.space}: some of {', '.join(allowed)}")
    if args.archs:
        try:
            args.num_archs = len(_read_archs(args))
        except ValueError as error:
            parser.error(str(error))
    if args.space == "mbv2" and args.profile:
        parser.error("--profile profiles the NB201 engine only")
    # Rows a run cannot make are dropped from the default set, and an error when asked for.
    unable = {
        name: "needs --reference-code"
        for name in args.names
        if name.startswith("paper_code") and args.reference_code is None
    }
    if args.proxies != ("wrcor",):
        unable |= {name: "times WRCor alone" for name in args.names if name in WRCOR_ONLY}
    if args.only and unable:
        name, why = next(iter(unable.items()))
        parser.error(f"{name} {why}")
    args.names = [name for name in args.names if name not in unable]
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
        count = PROCESSES.get(name)
        raw[name] = _spawn_processes(args, name, count) if count else _spawn(args, name)
        print(f"[timing] {name}: {raw[name]['status']}", file=sys.stderr, flush=True)
    eager = [raw[n] for n in TORCH_EAGER if n in raw and raw[n].get("steady_s")]
    baseline = min(eager, key=lambda r: statistics.median(r["steady_s"]), default=None)
    if baseline is not None:
        baseline = {"median_s": statistics.median(baseline["steady_s"]), **baseline}
    floors, rates = _floors(args)
    paper = raw.get("paper_code")
    rows = [_summarise(raw[n], baseline, args.proxies, paper, floors) for n in args.names]
    report = {
        "machine": {**machine, "load_average_end": os.getloadavg()},
        "command": " ".join(["python", "experiments/timing_vs_pytorch.py", *args.argv]),
        "num_archs": args.num_archs,
        "batch_size": args.batch_size,
        "arch_seed": None if args.archs else args.seed,
        "archs_file": args.archs,
        "ratio_baseline": baseline["name"] if baseline else None,
        "space": args.space,
        "proxies": list(args.proxies),
        **rates,
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
