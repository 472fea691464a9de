"""Compiled programs: counting them, keeping them across processes, bounding their memory.

XLA:CPU keeps every loaded executable in memory (about 2-5 MB each here, measured in
docs/mbv2_engine.md) until `jax.clear_caches()`, and a MobileNetV2-space search meets
thousands of them; so long runs release them when the process grows past a budget, and the
persistent compilation cache turns the recompilations that follow into disk reads.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import math
import os
import pickle
import platform
import tempfile
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax._src import config as jax_config  # the thread-local form of a public option
from jax.experimental import serialize_executable

from wrcor_jax import allocator
from wrcor_jax.native import user_cache_dir

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
            cls._hit.last_loaded = getattr(cls._hit, "pending", False)
            cls._hit.pending = False
            with cls._lock:
                if cls._hit.last_loaded:
                    cls.loads += 1
                    cls.load_seconds += duration
                else:
                    cls.count += 1
                    cls.seconds += duration

        jax.monitoring.register_event_listener(on_event)
        jax.monitoring.register_event_duration_secs_listener(on_duration)

    @classmethod
    def last_was_load(cls) -> bool:
        """Whether this thread's last compilation was read from the persistent cache."""
        return getattr(cls._hit, "last_loaded", False)

    @classmethod
    def add_load(cls, seconds: float) -> None:
        """Count an executable read back by other means than JAX's cache (`ProgramStore`)."""
        with cls._lock:
            cls.loads += 1
            cls.load_seconds += seconds


def default_cache_dir() -> Path:
    """`$JAX_COMPILATION_CACHE_DIR` if set, else `wrcor_jax/xla` in the user's cache dir."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return user_cache_dir() / "xla"


def use_persistent_cache(directory: str | Path | None) -> Path | None:
    """Keep every compiled program in `directory` (None: keep none) for later processes and
    for reloads after `ExecutableBudget` releases them, named `RetainedJit`s' in its
    `ProgramStore` too (not with `WRCOR_JAX_PROGRAM_STORE=0`); returns the directory in use."""
    global _STORE
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _STORE = None
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The engines' pieces compile in 0.05-0.5 s each: cache them all, not only slow ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    stored = os.environ.get("WRCOR_JAX_PROGRAM_STORE", "1") != "0"
    _STORE = ProgramStore(path / "programs") if stored else None
    return path


def cpu_model() -> str:
    """The CPU's model and flags (what XLA:CPU and -march=native compile for)."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
            return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


_SWITCHES: list[Callable[[], object]] = []


def register_switch(switch: Callable[[], object]) -> None:
    """Make a run-time choice that traced programs depend on part of every stored program's
    key (`ProgramStore`). It is called before a stored program is looked up, so it can also
    make what such a program needs, e.g. register a custom call's target."""
    _SWITCHES.append(switch)


@functools.cache
def _fixed_context() -> str:
    """What decides a compiled program besides its trace and stays fixed in a process: this
    library's code, JAX's and XLA's versions, the devices, the CPU and the flags. The devices
    include this process's own by id: a stored program runs on the devices it was compiled
    for, and in a `jax.distributed` job sharing a store another process's device is not
    addressable here ("Expected args to execute_sharded_on_local_devices to have 1 shards")."""
    package = Path(__file__).parent
    code = hashlib.sha256()
    for source in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".cc", ".h")):
        code.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    device = jax.devices()[0]
    # the allocator's settings hand out host memory and change no program
    host_memory = (allocator.OPT_OUT, allocator.KEPT_SHARE)
    flags = sorted(
        (k, v)
        for k, v in os.environ.items()
        if k.startswith(("XLA_", "WRCOR_JAX_")) and k not in host_memory
    )
    return repr(
        (
            code.hexdigest(),
            jax.__version__,
            jaxlib.__version__,
            device.platform,
            device.client.platform_version,
            device.device_kind,
            jax.device_count(),
            jax.process_count(),
            [d.id for d in jax.local_devices()],
            cpu_model(),
            flags,
        )
    )


def _stable_repr(value: object) -> str:
    """repr with sets in sorted order (a set's order changes with the process's hash seed)."""
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(map(_stable_repr, value))) + "}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(map(_stable_repr, value)) + ")"
    return repr(value)


class ProgramStore:
    """Compiled programs on disk, each under the key of what it was traced from: a
    `RetainedJit`'s name and argument signature, the JAX configuration, the registered
    switches and `_fixed_context`.

    JAX's persistent cache is keyed by the lowered program, so reading a program back from
    it still traces and lowers the function: 58 ms per program, 15% of the first calls of a
    MobileNetV2 search with a warm cache; read from here, those first calls took 13-14% less
    time (docs/mbv2_engine.md). Programs are loaded as pickles: keep the directory as
    private as the persistent cache beside it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        CompileCounter.install()  # `save` asks it whether a program was compiled

    def path(self, name: str, signature: tuple) -> Path | None:
        """Where the program of `name` for `signature` (`RetainedJit.signature`) is stored;
        None where it cannot be named across processes (a value printed with its address)."""
        _, structure, static, avals = signature
        switches = [switch() for switch in _SWITCHES]
        config = sorted(jax.config.values.items())
        text = _stable_repr((name, structure, static, avals, switches, config))
        if " at 0x" in text:
            return None
        digest = hashlib.sha256((text + _fixed_context()).encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest[2:]}.program"

    def load(self, path: Path) -> jax.stages.Compiled | None:
        """The program stored at `path`, loaded; None where there is none or it does not load."""
        start = time.perf_counter()
        try:
            serialized, in_tree, out_tree = pickle.loads(zlib.decompress(path.read_bytes()))
            program = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
        except FileNotFoundError:
            return None
        except Exception as error:  # a damaged or foreign file: removed, compiled anew
            path.unlink(missing_ok=True)
            warnings.warn(
                f"compiling anew: stored program {path} did not load: {error}", stacklevel=3
            )
            return None
        CompileCounter.add_load(time.perf_counter() - start)
        return program

    def compile(self, path: Path, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        """`lowered` compiled anew, never read from JAX's cache (see `save`), and stored at
        `path`: under `STORED_OPTIONS`, which JAX's cache keys apart and is kept from
        writing."""
        with jax_config.persistent_cache_min_compile_time_secs(math.inf):
            program = lowered.compile(compiler_options=STORED_OPTIONS)
        self.save(path, program)
        return program

    def save(self, path: Path, program: jax.stages.Compiled) -> None:
        """Store `program`, just compiled in this thread, at `path` (atomically: concurrent
        writers leave one whole file). Skipped where it cannot be serialized (closed-over
        constants) or was read from JAX's cache: XLA:CPU serializes such a program without
        its code ("Function ... not found" when the copy runs)."""
        if CompileCounter.last_was_load():
            return
        try:
            # zlib's fastest level keeps 22% of the bytes; 0.26 ms per program to decompress
            blob = zlib.compress(pickle.dumps(serialize_executable.serialize(program)), 1)
        except (ValueError, NotImplementedError):
            return
        scratch = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as scratch:
                scratch.write(blob)
            os.replace(scratch.name, path)
        except OSError as error:  # a full or read-only disk: the program still runs here
            if scratch is not None:
                Path(scratch.name).unlink(missing_ok=True)
            reason = error.strerror or type(error).__name__
            warnings.warn(f"compiled programs are not stored: {reason}", RuntimeWarning, 3)


_STORE: ProgramStore | None = None
STORED_OPTIONS = {"xla_dump_large_constants": False}
"""XLA's default for an option of its dumps (which are off): no change to the program, but
a key of JAX's cache apart from the plainly compiled program's."""


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
    release can free the least recently used.

    With a `name` (unique, the same in every process) and the persistent cache on, each
    program is also kept in the `ProgramStore`, and read from there in this process and
    later ones without tracing at all."""

    def __init__(self, fn: Callable, static_argnames: Sequence[str] = (), name: str | None = None):
        self.jitted = jax.jit(fn, static_argnames=tuple(static_argnames))
        self.name = name
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
            compiled = self._compiled[key] = self._load(key, args, kwargs)
        _LOADED.pop(key, None)  # to the end of the use order (a KeyError-free move_to_end)
        _LOADED[key] = None
        return compiled(*args, **dynamic)

    def stored_at(self, key: tuple) -> Path | None:
        """Where the `ProgramStore` keeps the program of signature `key` (None: nowhere)."""
        if _STORE is None or self.name is None:
            return None
        return _STORE.path(self.name, key)

    @staticmethod
    def compile_ahead(stored: Path | None, lowered: jax.stages.Lowered) -> None:
        """Compile `lowered` where a call will read it from: at `stored` (`stored_at`, taken
        in the calling thread: the key holds its JAX configuration, float64 or not), else
        into JAX's cache; nothing stays loaded, and nothing is done where it is stored."""
        if stored is None:
            lowered.compile(compiler_options={})
        elif not stored.exists():
            _STORE.compile(stored, lowered)

    def _load(self, key: tuple, args: tuple, kwargs: dict) -> jax.stages.Compiled:
        """The program of `key`: from the store, else compiled from a kept or new lowering
        (and stored)."""
        stored = self.stored_at(key)
        if stored is not None:
            program = _STORE.load(stored)
            return program or _STORE.compile(stored, self.jitted.lower(*args, **kwargs))
        lowered = _LOWERINGS.pop(key, None) or self.jitted.lower(*args, **kwargs)
        _LOWERINGS[key] = lowered
        while len(_LOWERINGS) > KEPT_LOWERINGS:
            _LOWERINGS.popitem(last=False)
        return lowered.compile(compiler_options={})

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
