"""The scoring engine: many architectures, one compilation, results that survive a crash.

`NB201Scorer` holds what every architecture shares (the batch, the supernet weights, the
compiled pieces) and turns chunks of architectures into proxy scores. Engines:
- `composed` (default): compiled pieces composed per architecture in Python; the fast path
  on CPU, where a program over many architectures runs them in lockstep;
- `chunked`: many architectures in one program that runs each conv op only for those that
  use it (`nb201_chunked`; chunk size from device memory, one chunk per local device at a
  time); the path for GPUs and TPUs;
- `vmap`: the traced-architecture Flax network (`capture_intermediates`/`perturb`) vmapped
  over a chunk of architectures, every candidate op of every edge run for each (fixed chunk
  size, last chunk padded, so one compilation), its architecture axis sharded over a mesh
  of every local device; an independent check of the other two;
- `auto`: composed on CPU, chunked on GPU and TPU (`resolve_engine`, when scoring starts).
On CPU the composed engine keeps about one core busy per architecture, so `workers`
architectures are scored concurrently from threads (XLA releases the GIL while it runs).
`score_archs` drives a run: validation first, then chunks appended to the results file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from wrcor_jax.compilation import CompileCounter
from wrcor_jax.data import get_dataset_info, load_batch
from wrcor_jax.proxies import PROXIES
from wrcor_jax.proxies.zen import zen_inputs, zen_params
from wrcor_jax.responses import SiteSums
from wrcor_jax.results import ResultsError, ResultsFile, meta_path, read_meta, write_meta
from wrcor_jax.spaces import SPACES, get_space, nb201
from wrcor_jax.spaces.nb201_capture import vmapped_site_sums
from wrcor_jax.spaces.nb201_chunked import ChunkedEngine, chunk_shape_for
from wrcor_jax.spaces.nb201_engine import NB201Engine
from wrcor_jax.spaces.nb201_measures import MEASUREMENTS, NB201Measurer
from wrcor_jax.vote import VoteColumn, vote_scores

ENGINES = ("auto", "composed", "chunked", "vmap")
GRADIENT_MEASUREMENTS = frozenset({"loss_grads", "half_batch_grads", "synflow_grads"})


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Everything that determines a score besides the architecture."""

    space: str = "nb201"
    dataset: str = "cifar10"
    proxies: tuple[str, ...] = ("wrcor",)
    seed: int = 42
    batch_size: int = 64
    data: str | None = None
    data_dir: str | None = None
    engine: str = "composed"
    chunk_size: int = 8
    workers: int = 2

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"unknown search space {self.space!r}; known: {', '.join(SPACES)}")
        unknown = [p for p in self.proxies if p not in PROXIES]
        if unknown:
            raise ValueError(f"unknown proxy {unknown[0]!r}; known: {', '.join(PROXIES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.batch_size < 2 or self.chunk_size < 1 or self.workers < 1:
            raise ValueError("batch size must be >= 2, chunk size and workers >= 1")


def resolve_engine(engine: str) -> str:
    """`auto` -> the engine this backend runs fastest: composed on CPU (the chunked engine's
    gathers, selects and scatters are memory traffic XLA:CPU pays ~4x for), chunked
    elsewhere. Touches the backend, so it runs only once scoring starts (after
    `jax.distributed.initialize`, when there is one)."""
    if engine != "auto":
        return engine
    return "composed" if jax.default_backend() == "cpu" else "chunked"


class NB201Scorer:
    """Scores NB201 architectures on one batch with one set of (seeded) supernet weights.

    Per architecture, each measurement the requested proxies read is taken once and shared
    (`wrcor_jax.proxies`); the WRCor family comes from the chosen engine's site sums.
    """

    def __init__(self, config: ScoreConfig):
        CompileCounter.install()
        self.config = config = dataclasses.replace(config, engine=resolve_engine(config.engine))
        info = get_dataset_info(config.dataset)
        images, labels = load_batch(
            config.dataset, config.batch_size, config.seed, config.data, config.data_dir
        )
        self.num_classes = info.num_classes
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
        self.host_params = nb201.init_params(config.seed, info.num_classes)
        self.params = jax.device_put(self.host_params)
        self.measurements = {PROXIES[name].measurement for name in config.proxies}
        self.engine = NB201Engine()
        if config.engine == "chunked":
            devices = jax.local_devices()
            shape = chunk_shape_for(devices[0], config.batch_size)
            self.chunked = ChunkedEngine(shape, devices=devices)
            self._chunked_shared = self.chunked.place((self.params, self.images, self.labels))
        self.measurer = NB201Measurer(
            self.params,
            self.images,
            self.labels,
            *self._zen_setup(images.shape) if "zen" in self.measurements else (),
        )
        self._pool = ThreadPoolExecutor(config.workers) if config.workers > 1 else None

    def _zen_setup(self, images_shape: tuple[int, ...]) -> tuple[dict, tuple]:
        params = jax.device_put(zen_params(self.config.seed, self.num_classes))
        return params, tuple(map(jnp.asarray, zen_inputs(self.config.seed, images_shape)))

    @property
    def archs_per_call(self) -> int:
        """How many architectures a `score` call should get: the chunked engine's chunks on
        every device (fewer would leave places empty), else the configured chunk size."""
        if self.config.engine == "chunked":
            return max(self.config.chunk_size, self.chunked.archs_per_call)
        return self.config.chunk_size

    def _map(self, fn, items) -> list:
        return list(self._pool.map(fn, items) if self._pool else map(fn, items))

    def site_sums(self, ops: np.ndarray) -> list[SiteSums]:
        """Reduced responses of a chunk of architectures, ops of shape (k, 6)."""
        ops = nb201.validate_ops(np.atleast_2d(ops))
        if self.config.engine == "composed":
            return [measured["site_sums"] for measured in self._engine_measure(ops, False)]
        if self.config.engine == "chunked":
            return self.chunked.site_sums(ops, *self._chunked_shared)
        fn, archs, shared = self._sharded
        devices = archs.mesh.size
        size = -(-self.config.chunk_size // devices) * devices
        out = []
        for start in range(0, len(ops), size):
            chunk = ops[start : start + size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            sums, counts = jax.device_get(fn(shared[0], jax.device_put(padded, archs), *shared[1:]))
            out += [SiteSums.from_stacked(sums[i], counts[i]) for i in range(len(chunk))]
        return out

    def _engine_measure(self, ops: np.ndarray, input_jacobian: bool) -> list[dict]:
        """The composed engine's site sums (and input Jacobians) of a chunk, per arch."""
        one = functools.partial(
            self.engine.measure,
            params=self.params,
            images=self.images,
            labels=self.labels,
            input_jacobian=input_jacobian,
        )
        return self._map(one, ops)

    @functools.cached_property
    def _sharded(self) -> tuple:
        """The vmapped site sums with the architecture axis sharded over a mesh of every
        local device (each process of a multi-host run scores its own share), the sharding
        of the architectures, and the weights and batch replicated on every device."""
        mesh = Mesh(np.array(jax.local_devices()), ("archs",))
        archs, replicated = NamedSharding(mesh, P("archs")), NamedSharding(mesh, P())
        fn = jax.jit(
            vmapped_site_sums(self.num_classes),
            in_shardings=(replicated, archs, replicated, replicated),
            out_shardings=archs,
        )
        shared = jax.device_put((self.params, self.images, self.labels), replicated)
        return fn, archs, shared

    def measure(self, ops: np.ndarray, measurements: Collection[str | None]) -> dict:
        """The non-engine `measurements` of one architecture (gradient trees cut to its
        used weights)."""
        names = set(measurements) & set(MEASUREMENTS)
        measured = self.measurer.measure_many(sorted(names), ops)
        for name in names & GRADIENT_MEASUREMENTS:
            measured[name] = nb201.used_params(measured[name], ops)
        if "macs" in measurements:
            measured["macs"] = nb201.count_macs(ops, tuple(self.images.shape), self.num_classes)
        return measured

    def score(
        self, ops: Sequence[np.ndarray], proxies: Sequence[str] | None = None
    ) -> list[list[float]]:
        """One row of proxy scores per architecture, in the order of `proxies`: the
        configuration's by default, or a subset of them (what a score cache lacks), for
        which only the measurements they read are taken."""
        proxies = self.config.proxies if proxies is None else tuple(proxies)
        foreign = [name for name in proxies if name not in self.config.proxies]
        if foreign:
            raise ValueError(
                f"proxy {foreign[0]!r} is not one this scorer was configured for "
                f"({', '.join(self.config.proxies)})"
            )
        reads = {PROXIES[name].measurement for name in proxies}
        ops = nb201.validate_ops(np.atleast_2d(ops))
        if "site_sums" in reads and self.config.engine == "composed":
            # jacob_cov's Jacobian rides along WRCor's backward pass (one forward for both)
            from_engine = self._engine_measure(ops, "input_jacobian" in reads)
            reads -= {"site_sums", "input_jacobian"}
        elif "site_sums" in reads:
            from_engine = [{"site_sums": sums} for sums in self.site_sums(ops)]
            reads -= {"site_sums"}
        else:
            from_engine = [{}] * len(ops)

        def row(item: tuple[np.ndarray, dict]) -> list[float]:
            arch, engine_measured = item
            measured = self.measure(arch, reads) | engine_measured
            used = nb201.used_params(self.host_params, arch)
            scores = []
            for name in proxies:
                proxy = PROXIES[name]
                reading = None if proxy.measurement is None else measured[proxy.measurement]
                scores.append(proxy.score(reading, used))
            return scores

        return self._map(row, list(zip(ops, from_engine, strict=True)))


@dataclasses.dataclass
class RunSummary:
    """What a scoring run did."""

    archs: int
    skipped: int
    seconds: float
    compilations: int
    compile_seconds: float
    votes: tuple[str, ...] = ()  # vote columns filled at the end, over `rows` rows
    rows: int = 0
    engine: str = ""  # the engine that scored, e.g. "vmap engine on 4 devices"; "": none
    loads: int = 0  # compiled programs read back from the persistent cache instead

    @property
    def archs_per_second(self) -> float:
        return self.archs / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        text = (
            f"scored {self.archs} archs ({self.skipped} already in the file) in "
            f"{self.seconds:.1f} s, {self.archs_per_second:.2f} archs/s, "
            + (f"{self.engine}, " if self.engine else "")
            + f"{self.compilations} compilations ({self.compile_seconds:.1f} s)"
            + (f", {self.loads} programs from the compile cache" if self.loads else "")
        )
        if self.votes:
            text += f"; {len(self.votes)} vote column(s) filled over {self.rows} rows"
        return text


# What a resumed run must share with the file's sidecar: scores of another batch do not mix.
SAME_BATCH = ("space", "dataset", "seed", "batch_size")


def batch_meta(config: ScoreConfig) -> dict:
    """The sidecar of a results file: the batch its scores were computed on."""
    return {
        "space": config.space,
        "dataset": config.dataset,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "data": None if config.data is None else str(config.data),
        "data_dir": None if config.data_dir is None else str(config.data_dir),
        "proxies": list(config.proxies),
    }


def check_meta(out: str | Path, config: ScoreConfig, has_rows: bool) -> None:
    """Refuse `out` when its sidecar records another batch: scores of two batches do not mix."""
    meta = read_meta(out)
    if not has_rows or meta is None:
        return
    ours = batch_meta(config)
    differs = [k for k in SAME_BATCH if k in meta and meta[k] != ours[k]]
    if differs:
        theirs = ", ".join(f"{k} {meta[k]}" for k in differs)
        raise ResultsError(
            f"{out} was scored with {theirs} ({meta_path(out).name}), this run uses "
            + ", ".join(f"{k} {ours[k]}" for k in differs)
            + ": choose another --out"
        )


def check_votes(votes: Sequence[VoteColumn], proxies: Sequence[str]) -> None:
    """Refuse a vote over a proxy that is not scored: its column could never be filled."""
    missing = [p for v in votes for p in v.proxies if p not in proxies]
    if missing:
        raise ValueError(f"vote needs proxy {missing[0]!r}; add it to the proxies scored")


def _devices_used(config: ScoreConfig, engine: str) -> int:
    """NB201's vmap engine splits its chunks of architectures over the local devices, the
    MobileNetV2 scorer its batch (when they divide it); NB201's composed engine uses one."""
    if config.space == "mbv2":
        from wrcor_jax.spaces.mbv2.space import batch_sharding

        return jax.local_device_count() if batch_sharding(config.batch_size) else 1
    return jax.local_device_count() if engine in ("chunked", "vmap") else 1


def _engine_label(config: ScoreConfig, engine: str, scorer: object) -> str:
    """The engine as the progress and summary lines say it: with the devices the work spreads
    over and whether the scorer runs native CPU calls (MobileNetV2's pieces)."""
    devices = _devices_used(config, engine)
    label = f"{engine} engine on {devices} device(s)" if devices > 1 else f"{engine} engine"
    return label + (", native CPU calls" if getattr(scorer, "native_calls", False) else "")


class OutOfMemory(MemoryError):
    """The device ran out of memory while scoring: which architectures, and what to try (a
    MemoryError, so that the command line reports it in one line without importing this)."""


@contextlib.contextmanager
def out_of_memory_named(texts: Sequence[str]) -> Iterator[None]:
    """Re-raise XLA's RESOURCE_EXHAUSTED, a traceback deep in a piece's call, as
    `OutOfMemory` naming the architectures being scored (`texts`, one call's worth)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        which = texts[0] if len(texts) == 1 else f"{len(texts)} architectures from {texts[0]}"
        detail = str(error).strip().splitlines()[0]
        raise OutOfMemory(
            f"out of memory scoring {which} ({detail}); the rows scored before it are kept; "
            "a smaller --batch-size or fewer --proxies needs less"
        ) from error


def score_archs(
    archs: Sequence[str],
    config: ScoreConfig,
    out: str | Path,
    progress: bool = True,
    votes: Sequence[VoteColumn] = (),
    meta: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Score architectures (text forms of `config.space`) into `out`, resuming whatever the
    file already holds.

    Everything is validated (architectures, file header, data) before the first row is
    written; rows are appended one chunk at a time. Vote columns rank an architecture
    against all the others, so they are computed only once every row is scored, over all
    rows of the file, and written by one atomic rewrite; until then their cells are empty.
    Their proxies must be among `config.proxies`. `meta` adds entries to the sidecar (a
    part file's share of a multi-process run).
    """
    CompileCounter.install()  # for every space's scorer: the summary reports its counts
    space = get_space(config.space)
    parsed = [space.read(a) for a in archs]
    unique = dict(zip(map(space.format, parsed), parsed, strict=True))
    check_votes(votes, config.proxies)
    results = ResultsFile(out, config.proxies, [v.name for v in votes])
    done = results.done()
    check_meta(out, config, bool(done))
    todo = [(text, arch) for text, arch in unique.items() if text not in done]
    start, compiles, compile_s = time.perf_counter(), CompileCounter.count, CompileCounter.seconds
    loads = CompileCounter.loads
    engine = resolve_engine(config.engine) if todo else ""
    scorer = space.scorer(dataclasses.replace(config, engine=engine)) if todo else None
    if todo:
        write_meta(out, batch_meta(config) | dict(meta or {}))
    if engine:
        engine = _engine_label(config, engine, scorer)
    bar = tqdm(total=len(todo), desc=engine, unit="arch", file=sys.stderr, disable=not progress)
    step = scorer.archs_per_call if scorer else config.chunk_size
    for begin in range(0, len(todo), step):
        chunk = todo[begin : begin + step]
        with out_of_memory_named([text for text, _ in chunk]):
            scores = scorer.score([arch for _, arch in chunk])
        results.append(zip([text for text, _ in chunk], scores, strict=True))
        bar.update(len(chunk))
    bar.close()
    rows = 0
    if votes:
        rows = results.fill_derived(lambda table: vote_scores(votes, config.proxies, table))
    return RunSummary(
        archs=len(todo),
        skipped=len(unique) - len(todo),
        seconds=time.perf_counter() - start,
        compilations=CompileCounter.count - compiles,
        compile_seconds=CompileCounter.seconds - compile_s,
        votes=tuple(v.name for v in votes),
        rows=rows,
        engine=engine,
        loads=CompileCounter.loads - loads,
    )
