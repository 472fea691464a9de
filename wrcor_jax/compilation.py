"""Compiled programs: counting them, keeping them across processes, bounding their memory.

XLA:CPU keeps every loaded executable in memory (about 2-5 MB each here, measured in
docs/mbv2_engine.md) until `jax.clear_caches()`, and a MobileNetV2-space search meets
thousands of them; so long runs release them when the process grows past a budget, and the
persistent compilation cache turns the recompilations that follow into disk reads.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from wrcor_jax import allocator

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Counts XLA backend compilations in this process (every jit, eager op included).

    `count`/`seconds` are real compilations; `loads`/`load_seconds` are executables read
    back from the persistent cache (JAX reports both as the same compile event, a cache
    hit is announced just before its event)."""

    _lock = threading.Lock()
    _hit = threading.local()
    count = 0
    seconds = 0.0
    loads = 0
    load_seconds = 0.0

    @classmethod
    def install(cls) -> None:
        """Register the listeners once per process."""
        if getattr(cls, "_installed", False):
            return
        cls._installed = True

        def on_event(event: str, **_: object) -> None:
            if event == CACHE_HIT_EVENT:
                cls._hit.pending = True

        def on_duration(event: str, duration: float, **_: object) -> None:
            if event != COMPILE_EVENT:
                return
            with cls._lock:
                if getattr(cls._hit, "pending", False):
                    cls._hit.pending = False
                    cls.loads += 1
                    cls.load_seconds += duration
                else:
                    cls.count += 1
                    cls.seconds += duration

        jax.monitoring.register_event_listener(on_event)
        jax.monitoring.register_event_duration_secs_listener(on_duration)


def user_cache_dir() -> Path:
    """`wrcor_jax` in the user's cache dir (`$XDG_CACHE_HOME`, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wrcor_jax"


def default_cache_dir() -> Path:
    """`$JAX_COMPILATION_CACHE_DIR` if set, else `wrcor_jax/xla` in the user's cache dir."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return user_cache_dir() / "xla"


def use_persistent_cache(directory: str | Path | None) -> Path | None:
    """Keep every compiled program in `directory` (None: keep none) for later processes and
    for reloads after `ExecutableBudget` releases them; returns the directory in use."""
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The engines' pieces compile in 0.05-0.5 s each: cache them all, not only slow ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def mappings() -> int:
    """How many memory mappings this process holds (Linux /proc; 0 where unavailable).

    Every loaded XLA:CPU executable maps its code in pieces: a MobileNetV2 search at batch 64
    held 21,000 mappings two minutes after start, and once it reached the kernel's cap it
    failed with "LLVM compilation error: Cannot allocate memory" while most of the machine's
    memory was free."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


def mapping_limit() -> int | None:
    """The kernel's cap on one process's mappings (vm.max_map_count, 65530 by default);
    None where unknown."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


ROOMY_MAPPINGS = 262_144


def mapping_note() -> str | None:
    """What to do where the kernel's mapping cap is the default's size: past half of it
    `ExecutableBudget` releases programs, and reloading them cost a MobileNetV2 search 10.6%
    of its time on 2 cores (docs/mbv2_engine.md). None where the cap is roomy or unknown."""
    cap = mapping_limit()
    if cap is None or cap >= ROOMY_MAPPINGS:
        return None
    return (
        f"the kernel lets this process hold {cap} memory mappings (vm.max_map_count), so "
        "compiled programs are released now and reloaded when needed, every few architectures "
        f"in a long search; `sudo sysctl -w vm.max_map_count={ROOMY_MAPPINGS}` avoids most of "
        "that (docs/usage.md)"
    )


@functools.cache
def _warn_of_mappings() -> None:
    """`mapping_note` as a warning, once per process: at the first release the cap forces."""
    note = mapping_note()
    if note:
        warnings.warn(note, RuntimeWarning, stacklevel=3)


class ExecutableBudget:
    """Releases loaded executables once this process's allocations hold more than
    `limit_mb` or it holds more than `map_limit` memory mappings (default: half the kernel's
    cap, `mappings`), and hands back freed heap memory once it exceeds `keep_mb` (default
    `allocator.kept_mb()`: the tuned allocator keeps it for reuse); call `check()` between
    units of work, never inside one.

    A release frees the least recently used `RELEASED_SHARE` of `RetainedJit`'s executables
    and every other jit's, and the rest too if that is not enough: a MobileNetV2 search
    reaches the mapping cap every 15-20 architectures, and reloading everything the next
    ones use cost it 10.6% of its time (docs/mbv2_engine.md)."""

    RELEASED_SHARE = 0.5

    def __init__(
        self,
        limit_mb: float | None = None,
        keep_mb: float | None = None,
        map_limit: int | None = None,
    ):
        # A fifth and (tuned) an eighth: with a third each, the batch-64 mbv2 search was
        # OOM-killed at 24.4 GB on a 24 GB machine, one architecture's activations on top of
        # both (in `tuned` mode the largest blocks are mapped apart, so the kept heap cannot
        # hold them).
        self.limit_mb = allocator.physical_mb() / 5 if limit_mb is None else limit_mb
        self.keep_mb = allocator.kept_mb() if keep_mb is None else keep_mb
        cap = mapping_limit()
        self.map_limit = map_limit if map_limit is not None or cap is None else cap // 2
        self.releases = 0

    def maps_within(self) -> bool:
        """Whether this process's memory mappings are within the budget."""
        return self.map_limit is None or mappings() <= self.map_limit

    def within(self) -> bool:
        """Whether this process's allocations and mappings are within the budget."""
        return allocator.in_use_mb() <= self.limit_mb and self.maps_within()

    def check(self) -> bool:
        """Release executables if over the budget; whether it did."""
        if self.within():
            allocator.release_free(self.keep_mb)
            return False
        if not self.maps_within():
            _warn_of_mappings()
        release_executables(self.RELEASED_SHARE)
        if not self.within():
            release_executables()
        allocator.release_free(self.keep_mb)
        self.releases += 1
        return True


class RetainedJit:
    """`jax.jit` whose traces outlive the release of its executables.

    `jax.clear_caches()` frees the executables but drops every trace and lowering with
    them, and a MobileNetV2 search releases every few architectures: most of its Python
    time went to tracing and lowering again the pieces it had met before (py-spy, 85% of
    its busy samples). This keeps each argument signature's lowering (the most recently
    used `KEPT_LOWERINGS` of all instances), compiles it ahead of time
    (`compiler_options={}` keeps the executable off the lowering, so dropping it frees
    it), and after `release_executables` reloads it from the persistent cache without
    tracing. Inside another transformation (tracer arguments) it is plain `jax.jit`. Its
    executables join one use order with every other instance's (`_LOADED`), so that a
    release can free the least recently used."""

    def __init__(self, fn: Callable, static_argnames: Sequence[str] = ()):
        self.jitted = jax.jit(fn, static_argnames=tuple(static_argnames))
        self._static = frozenset(static_argnames)
        self._compiled: dict = {}

    def signature(self, args: tuple, kwargs: dict) -> tuple | None:
        """What one compiled program serves: the arguments' structure, static values and
        abstract values (None inside another transformation)."""
        dynamic = {k: v for k, v in kwargs.items() if k not in self._static}
        leaves, structure = jax.tree.flatten((args, dynamic))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return None
        static = tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static))
        return (self, structure, static, tuple(jax.typeof(leaf) for leaf in leaves))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.signature(args, kwargs)
        if key is None:
            return self.jitted(*args, **kwargs)
        dynamic = {k: v for k, v in kwargs.items() if k not in self._static}
        compiled = self._compiled.get(key)
        if compiled is None:
            lowered = _LOWERINGS.pop(key, None) or self.jitted.lower(*args, **kwargs)
            _LOWERINGS[key] = lowered
            while len(_LOWERINGS) > KEPT_LOWERINGS:
                _LOWERINGS.popitem(last=False)
            compiled = self._compiled[key] = lowered.compile(compiler_options={})
        _LOADED.pop(key, None)  # to the end of the use order (a KeyError-free move_to_end)
        _LOADED[key] = None
        return compiled(*args, **dynamic)

    def drop(self, key: tuple) -> None:
        """Drop the executable of signature `key` (freed at the next `jax.clear_caches()`)."""
        self._compiled.pop(key, None)


KEPT_LOWERINGS = 1024
"""A MobileNetV2 piece's lowering held 1.4 MB on average (183 of them, 260 MB): at most
about 1.4 GB, which counts toward `ExecutableBudget`'s limit like the executables."""
_LOWERINGS: OrderedDict = OrderedDict()  # (instance, signature) -> Lowered, oldest use first
_LOADED: OrderedDict = OrderedDict()  # RetainedJit signatures with an executable, oldest use first


def release_executables(share: float = 1.0) -> None:
    """Free the least recently used `share` of `RetainedJit`'s loaded executables (all by
    default) and every other jit's; the kept lowerings stay."""
    for _ in range(math.ceil(len(_LOADED) * share)):
        key, _ = _LOADED.popitem(last=False)
        key[0].drop(key)
    jax.clear_caches()
    gc.collect()
