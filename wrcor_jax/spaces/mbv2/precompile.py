"""Compile a MobileNetV2 search's pieces before the search needs them.

On an accelerator a piece of `engine.MBV2Engine` compiles in seconds and runs in
milliseconds (one H200: 1.9 s median per compilation, docs/timing.md), so a search there
waits on every key it meets for the first time. The keys are padded shapes, never whole
architectures: about 1,300 for 200 sampled architectures, growing ~10% per doubling
(docs/mbv2_engine.md). This walks a scorer's measurements over architectures (a sample of
the space: a search's draws and mutations meet mostly the same keys) with every piece
replaced by a stand-in that lowers it, hands the lowering to a pool of compiler threads,
and returns zeros of its output shapes; only the small jitted glue between pieces runs. The
programs go to the persistent compilation cache (`compilation.use_persistent_cache`, which
must be on; the pieces' programs to its `ProgramStore`), from which the scorer's first call
of each key then reads them back.

The zeros are NumPy's, allocated lazily, so the walk costs no memory for the activations it
never computes. One device only: with the batch split over several, the scorer's pieces see
sharded arrays, which these stand-ins do not reproduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

from wrcor_jax.compilation import CompileCounter, RetainedJit
from wrcor_jax.spaces.mbv2.arch import MBV2Arch
from wrcor_jax.spaces.mbv2.network import init_params
from wrcor_jax.spaces.mbv2.pieces import PIECES
from wrcor_jax.spaces.mbv2.space import MBV2Scorer


@dataclasses.dataclass
class PrecompileReport:
    """What a `precompile` did: piece keys met, XLA compilations (pieces and glue) and
    executables found already in the persistent cache, and the wall time."""

    archs: int
    keys: int
    compiled: int
    loaded: int
    seconds: float


class PieceStandIn:
    """In place of one piece's forward or backward `RetainedJit`: traces each new call
    signature once (`outputs`) and returns zeros of its output shapes, running nothing; with
    a `pool`, also lowers it and compiles it there, into the program store or the persistent
    cache (`RetainedJit.compile_ahead`; the executable is then dropped)."""

    def __init__(self, retained: RetainedJit, pool: ThreadPoolExecutor | None):
        self.retained, self.pool = retained, pool
        self.outputs: dict = {}
        self.compiling: list[Future] = []

    def __call__(self, *args, **kwargs):
        key = self.retained.signature(args, kwargs)
        if key not in self.outputs:
            traced = self.retained.jitted.trace(*args, **kwargs)
            self.outputs[key] = traced.out_info
            if self.pool is not None:
                stored, lowered = self.retained.stored_at(key), traced.lower()
                compiling = self.pool.submit(self.retained.compile_ahead, stored, lowered)
                self.compiling.append(compiling)
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.outputs[key])


@contextlib.contextmanager
def piece_stand_ins(pool: ThreadPoolExecutor | None = None) -> Iterator[dict[str, PieceStandIn]]:
    """Every piece's forward and backward replaced by stand-ins (compiling on `pool` if
    given), named "piece/direction"; the pieces are restored afterwards."""
    saved = {name: (piece.forward, piece.backward) for name, piece in PIECES.items()}
    stand_ins = {}
    try:
        for name, piece in PIECES.items():
            piece.forward = stand_ins[f"{name}/forward"] = PieceStandIn(piece.forward, pool)
            piece.backward = stand_ins[f"{name}/backward"] = PieceStandIn(piece.backward, pool)
        yield stand_ins
    finally:
        for name, (forward, backward) in saved.items():
            PIECES[name].forward, PIECES[name].backward = forward, backward


def signatures_met(stand_ins: dict[str, PieceStandIn]) -> dict[str, int]:
    """How many distinct call signatures (each one compilation) each stand-in met, for those
    that met any."""
    return {name: len(stand_in.outputs) for name, stand_in in stand_ins.items() if stand_in.outputs}


def precompile(
    scorer: MBV2Scorer,
    archs: Sequence[MBV2Arch],
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrecompileReport:
    """Compile into the persistent cache every piece `scorer` would run to score `archs`
    with its proxies, on `workers` compiler threads (default: one per CPU core; on this
    2-core CPU one XLA:CPU compilation already keeps ~1.75 cores busy, docs/mbv2_engine.md).
    `progress(done, total)` is called after each architecture's walk."""
    if scorer.engine is None or not scorer.runs_network:
        raise ValueError("nothing to compile ahead: only the composed engine's pieces are")
    if not jax.config.jax_enable_compilation_cache:
        raise ValueError("precompiling needs the persistent compilation cache")
    if jax.local_device_count() > 1:
        raise ValueError("precompiling covers one device; this process sees several")
    CompileCounter.install()
    compiled, loaded, start = CompileCounter.count, CompileCounter.loads, time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    with pool, piece_stand_ins(pool) as stand_ins:
        for done, arch in enumerate(archs, start=1):
            params = init_params(arch, scorer.config.seed, scorer.num_classes)
            scorer.measure(arch, params, scorer.config.proxies)
            scorer.executables.check()  # jax's own caches keep each trace and lowering
            if progress is not None:
                progress(done, len(archs))
        for stand_in in stand_ins.values():
            for compiling in stand_in.compiling:
                compiling.result()  # re-raises a failed compilation
    return PrecompileReport(
        archs=len(archs),
        keys=sum(signatures_met(stand_ins).values()),
        compiled=CompileCounter.count - compiled,
        loaded=CompileCounter.loads - loaded,
        seconds=round(time.perf_counter() - start, 1),
    )
