"""glibc's malloc tuned for XLA:CPU's per-call buffers, and an allocator of our own for
the large ones.

Every call of a compiled program allocates its outputs and one temporary buffer, up to GBs
each at batch 64 in the MobileNetV2 space. glibc hands any block over 32 MB to a fresh
`mmap` and unmaps it on free, so each call touches its buffers page by page anew: on this
machine a MobileNetV2 architecture took 24 s that way and 7.2-7.6 s with glibc tuned
(docs/mbv2_engine.md): freed memory kept in the heap (no `mmap` below 256 MB, one arena, no
trimming), in 2 MB pages where the kernel allows, so that the next call reuses it without a
fault. Blocks of 256 MB and more still get their own mapping: kept in one heap, a few
GB-sized arrays of many sizes fragmented it by a third of the peak.

XLA asks for its buffers aligned (`posix_memalign`). A tuned process also preloads
`large_blocks.c` (built once with the machine's C compiler, `large_blocks_library`), which
serves those of 1 MB and more from one reserved range, best fit, and never unmaps them: it
marks freed memory MADV_FREE, so a later call or architecture reuses it without a fault
unless the kernel needed the memory meanwhile. glibc can only hand memory back, and taking
it again can cost far more than it first did: on a virtual machine whose balloon device
reports free pages to the host, a GB freed more than two seconds before took 1.3-1.5 s to
touch again, against 0.1 s for one the guest still held. On 32 of a search's MobileNetV2
architectures the preload took 6.4 s median against 10.0 s with glibc alone and 7.8 s in
`heap` mode, with 32 s of system time against 217 s and 86 s, at a peak of 10.6 GB against
11.1 and 15.3 GB (docs/mbv2_engine.md). Requests larger than the machine's memory go to
glibc, whose refusal is a clean error.

glibc reads `GLIBC_TUNABLES` and `LD_PRELOAD` only when a process starts, so the command
line re-executes itself once with them (`reexec_tuned`); `WRCOR_JAX_MALLOC` picks them:
`tuned` (the default), `heap` (every block glibc serves from its heap, for machines with
memory to spare and no C compiler), or `default` (glibc's own allocator, nothing preloaded).
glibc's heap never shrinks by itself, so long runs call `release_free(keep_mb)` between units
of work to hand it back once it exceeds `keep_mb` (`kept_mb`: more in `heap` mode, or the
share of the machine's memory `WRCOR_JAX_HEAP_KEPT` gives).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from wrcor_jax import native

_MAP_APART = f"glibc.malloc.mmap_threshold={256 << 20}"  # blocks under 256 MB from the heap
TUNABLES = (
    "glibc.malloc.hugetlb=1",  # madvise 2 MB pages: 512x fewer faults where memory grows
    _MAP_APART,
    "glibc.malloc.arena_max=1",  # other threads' arenas would still mmap large blocks
    f"glibc.malloc.trim_threshold={1 << 40}",  # keep freed memory until release_free
)
# the same, but every block from the heap, the largest too
HEAP_TUNABLES = tuple("glibc.malloc.mmap_max=0" if s == _MAP_APART else s for s in TUNABLES)
MODES = {"tuned": TUNABLES, "heap": HEAP_TUNABLES}
"""`WRCOR_JAX_MALLOC`'s values but `default` (glibc's own allocator), and their settings."""
OPT_OUT = "WRCOR_JAX_MALLOC"
KEPT_SHARE = "WRCOR_JAX_HEAP_KEPT"
"""The share of the machine's memory the freed heap keeps between units of work, 0 to 1."""
LARGE_BLOCKS = Path(__file__).with_name("large_blocks.c")
"""The allocator of XLA's large buffers that tuned processes preload (its header says why)."""


def glibc() -> bool:
    """Whether this process runs on glibc (the tunables mean nothing elsewhere)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def mode(environ: dict[str, str] | None = None) -> str:
    """`WRCOR_JAX_MALLOC` of `environ` (default: this process's): tuned, heap or default."""
    value = (os.environ if environ is None else environ).get(OPT_OUT, "tuned")
    if value not in (*MODES, "default"):
        raise SystemExit(f"{OPT_OUT} must be one of {', '.join(MODES)}, default, not {value!r}")
    return value


def _settings(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The tunables of `environ`'s mode; `TUNABLES` where that is `default` and a process
    is tuned all the same (`environment(True)`)."""
    return MODES.get(mode(environ), TUNABLES)


def tuned() -> bool:
    """Whether this process started with the tunables of its mode and, where it builds, the
    large-block allocator preloaded."""
    present = os.environ.get("GLIBC_TUNABLES", "").split(":")
    preloaded = _large_blocks() is not None or large_blocks_library() is None
    return preloaded and all(setting in present for setting in _settings())


@functools.cache
def large_blocks_library() -> Path | None:
    """`large_blocks.c` built for this machine (once, into the user's cache), or None where
    there is no C compiler or it fails: then glibc serves the large blocks too."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    try:
        return native.build(LARGE_BLOCKS, compiler, ("-O2", "-shared", "-fPIC"))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = str(getattr(error, "stderr", "") or error)[-2000:]
        warnings.warn(
            f"the large-block allocator did not build, glibc serves: {detail}", stacklevel=2
        )
        return None


def _preloads(value: str) -> list[str]:
    """`LD_PRELOAD`'s entries (separated by colons or spaces) but our library."""
    return [p for p in value.replace(" ", ":").split(":") if p and not _is_large_blocks(p)]


def _is_large_blocks(path: str) -> bool:
    return Path(path).name.startswith(f"{LARGE_BLOCKS.stem}_")


def environment(tune: bool = True, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` (default: this process's) whose `GLIBC_TUNABLES` has the settings
    of its `WRCOR_JAX_MALLOC` mode added and `LD_PRELOAD` the large-block allocator (`tune`),
    or all of ours taken out (for a process that should keep glibc's defaults)."""
    env = dict(os.environ if environ is None else environ)
    ours = {*TUNABLES, *HEAP_TUNABLES}
    settings = [s for s in env.get("GLIBC_TUNABLES", "").split(":") if s and s not in ours]
    settings += list(_settings(env)) if tune else []
    preloads = _preloads(env.get("LD_PRELOAD", ""))
    library = large_blocks_library() if tune else None
    preloads += [str(library)] if library is not None else []
    for name, entries in (("GLIBC_TUNABLES", settings), ("LD_PRELOAD", preloads)):
        if entries:
            env[name] = ":".join(entries)
        else:
            env.pop(name, None)
    return env


def wanted() -> bool:
    """Whether this process should run tuned: on glibc, unless `WRCOR_JAX_MALLOC=default`."""
    return glibc() and mode() != "default"


def reexec_tuned() -> None:
    """Replace this process by itself started with its mode's tunables (same pid, argv and
    environment otherwise); returns only where that is not wanted or not possible: already
    tuned, not glibc, or `WRCOR_JAX_MALLOC=default`. Call it first thing in `main`."""
    if tuned() or not wanted():
        return
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.execve(sys.executable, argv, environment())


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _large_blocks() -> ctypes.CDLL | None:
    """The preloaded large-block allocator's functions, or None where it is not loaded."""
    process = ctypes.CDLL(None)
    return process if hasattr(process, "wrcor_large_blocks_usage") else None


def large_blocks_mb() -> tuple[float, float]:
    """MiB of the large-block allocator's blocks in use, and of those handed out once and
    free now (mapped until the kernel needs them); 0, 0 where not loaded."""
    blocks = _large_blocks()
    if blocks is None:
        return 0.0, 0.0
    used, free = ctypes.c_size_t(), ctypes.c_size_t()
    blocks.wrcor_large_blocks_usage(ctypes.byref(used), ctypes.byref(free))
    return used.value / 2**20, free.value / 2**20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not glibc():
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def resident_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def physical_mb() -> float:
    """The machine's memory in MiB."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def kept_mb() -> float:
    """How much freed memory `release_free` lets glibc's heap keep between units of work, in
    MiB: the share `WRCOR_JAX_HEAP_KEPT` gives of the machine's memory, else half where
    every block comes from the heap (a process started with `heap`'s tunables, the mode for
    plentiful memory), an eighth otherwise. Measured before the large-block allocator took
    those blocks out of glibc's heap, the next architecture reused the last one's GB-sized
    blocks without a fault only if they were kept: handing them back after each of 30
    sampled MobileNetV2 architectures cost 16% more time than keeping up to half (peak
    resident memory 10.3 against 16.3 GB on a 24 GB machine), and keeping all of it (share
    1) took 10-17% less time than half on 32 of a search's architectures, at 21.7 GB against
    13.8-14.9 GB (docs/mbv2_engine.md)."""
    share = os.environ.get(KEPT_SHARE)
    if share is not None:
        return physical_mb() * _share(share)
    heap = tuned() and mode() == "heap"
    return physical_mb() / (2 if heap else 8)


def _share(value: str) -> float:
    """`WRCOR_JAX_HEAP_KEPT` as a number from 0 to 1, or a one-line error."""
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0 <= share <= 1:
        raise SystemExit(f"{KEPT_SHARE} must be a share of memory from 0 to 1, not {value!r}")
    return share


def in_use_mb() -> float:
    """MiB of memory this process's allocations hold: glibc's in-use heap and mmapped blocks
    (`mallinfo2`) and the large-block allocator's, so freed memory either keeps does not
    count; elsewhere the resident memory."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return resident_mb()
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20 + large_blocks_mb()[0]


def release_free(keep_mb: float = 0.0) -> bool:
    """Hand glibc's freed heap back to the OS when this process holds more than `keep_mb`
    beyond what its allocations use (the large-block allocator's free memory aside: the
    kernel takes it when it needs it); whether it did. Later calls fault those pages in
    again, so keep what the next unit of work reuses."""
    libc = _libc()
    if libc is None or resident_mb() - in_use_mb() - large_blocks_mb()[1] <= keep_mb:
        return False
    libc.malloc_trim(0)
    return True
