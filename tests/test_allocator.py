"""The tuned glibc allocator: the command restarts itself with it, once, same pid; freed
memory stays resident for reuse until `release_free` hands it back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wrcor_jax import allocator

pytestmark = pytest.mark.skipif(not allocator.glibc(), reason="glibc tunables only")

REEXEC = """
import json, os, sys
from wrcor_jax import allocator
print(json.dumps([os.getpid(), allocator.tuned()]), flush=True)
allocator.reexec_tuned()
print(json.dumps([os.getpid(), allocator.tuned(), sys.argv[1:]]), flush=True)
"""


def _run(script: str, *args: str, env: dict[str, str]) -> list:
    run = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_environment_adds_and_removes_only_its_settings() -> None:
    env = allocator.environment(True, {"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "A": "1"})
    assert env["A"] == "1"
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.pthread.rseq=0", *allocator.TUNABLES]
    assert allocator.environment(True, env) == env  # idempotent
    assert allocator.environment(False, env)["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0"
    assert "GLIBC_TUNABLES" not in allocator.environment(False, {"A": "1"})


def _untuned() -> dict[str, str]:
    env = allocator.environment(False)
    env.pop(allocator.OPT_OUT, None)
    return env


def test_reexec_restarts_once_in_place_with_the_tunables() -> None:
    lines = _run(REEXEC, "score", "--x", env=_untuned())
    # the new image runs the script again from the top: its first line is printed twice
    assert lines[0][1:] == [False] and lines[1][1:] == [True]
    assert lines[2] == [lines[0][0], True, ["score", "--x"]]  # same process, same argv


def test_opting_out_keeps_the_default_allocator() -> None:
    lines = _run(REEXEC, env={**_untuned(), allocator.OPT_OUT: "default"})
    assert [line[1] for line in lines] == [False, False]


def test_the_command_restarts_itself_tuned() -> None:
    probe = (
        "import sys; from wrcor_jax import allocator, cli; print(allocator.tuned(), flush=True);"
        " sys.argv[1:] = ['--help']; cli.main()"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], env=_untuned(), capture_output=True, text=True, check=True
    )
    assert run.stdout.splitlines()[:2] == ["False", "True"] and "usage" in run.stdout


FREED = """
import json
import numpy as np
from wrcor_jax import allocator
from wrcor_jax.compilation import ExecutableBudget
block = np.ones({size}, np.uint8)  # written
in_use, resident = allocator.in_use_mb(), allocator.resident_mb()
del block
kept = allocator.resident_mb()
released = allocator.release_free(64)
print(json.dumps([in_use - allocator.in_use_mb(), resident - kept, kept - allocator.resident_mb(),
                  released]))
"""


MIB_128, MIB_300 = FREED.format(size=2**27), FREED.format(size=300 * 2**20)


def test_freed_memory_stays_for_reuse_until_released() -> None:
    freed, dropped_on_free, dropped_on_release, released = _run(
        MIB_128, env=allocator.environment()
    )[0]
    assert freed > 120
    assert dropped_on_free < 10  # the heap keeps it
    assert released and dropped_on_release > 100  # handed back


def test_default_allocator_hands_large_blocks_back_at_once() -> None:
    freed, dropped_on_free, _, _ = _run(MIB_128, env=allocator.environment(False))[0]
    assert freed > 120 and dropped_on_free > 120  # why the tuning: an munmap per free


def test_tuned_allocator_maps_the_largest_blocks_apart() -> None:
    freed, dropped_on_free, _, _ = _run(MIB_300, env=allocator.environment())[0]
    assert freed > 290 and dropped_on_free > 290  # kept, they fragmented the heap


def test_heap_mode_keeps_the_largest_blocks_too() -> None:
    heap = allocator.environment(environ={**_untuned(), allocator.OPT_OUT: "heap"})
    assert set(allocator.HEAP_TUNABLES) <= set(heap["GLIBC_TUNABLES"].split(":"))
    assert f"glibc.malloc.mmap_threshold={256 << 20}" not in heap["GLIBC_TUNABLES"]
    freed, dropped_on_free, _, _ = _run(MIB_300, env=heap)[0]
    assert freed > 290 and dropped_on_free < 10


def test_heap_mode_restarts_with_its_own_tunables() -> None:
    lines = _run(REEXEC, env={**_untuned(), allocator.OPT_OUT: "heap"})
    assert [line[1] for line in lines] == [False, True, True]


def test_an_unknown_mode_is_a_one_line_error() -> None:
    run = subprocess.run(
        [sys.executable, "-c", REEXEC],
        env={**_untuned(), allocator.OPT_OUT: "fast"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip() == "WRCOR_JAX_MALLOC must be one of tuned, heap, default, not 'fast'"


def test_budget_keeps_free_memory_within_its_allowance() -> None:
    script = MIB_128.replace(
        "released = allocator.release_free(64)",
        "released = ExecutableBudget(limit_mb=10**9, keep_mb=10**9).check()",
    )
    _, dropped_on_free, dropped_on_check, released = _run(script, env=allocator.environment())[0]
    assert not released and dropped_on_free < 10 and dropped_on_check < 10
    script = script.replace("keep_mb=10**9", "keep_mb=64")
    _, _, dropped_on_check, released = _run(script, env=allocator.environment())[0]
    assert not released and dropped_on_check > 100  # trimmed, executables kept


KEPT = """
import json
from wrcor_jax import allocator
from wrcor_jax.compilation import ExecutableBudget
print(json.dumps([allocator.kept_mb() / allocator.physical_mb(), ExecutableBudget().keep_mb]))
"""


@pytest.mark.parametrize(("mode", "share"), [("tuned", 1 / 8), ("heap", 1 / 2), ("default", 1 / 8)])
def test_the_heap_mode_keeps_more_freed_memory_between_units(mode: str, share: float) -> None:
    env = {**_untuned(), allocator.OPT_OUT: mode}
    env = allocator.environment(mode != "default", env)
    kept, budget = _run(KEPT, env=env)[0]
    assert kept == pytest.approx(share) and budget == pytest.approx(kept * allocator.physical_mb())


@pytest.mark.parametrize("share", ["1", "0.25", "0"])
def test_the_kept_share_can_be_set(share: str) -> None:
    env = allocator.environment(environ={**_untuned(), allocator.OPT_OUT: "heap"})
    kept, budget = _run(KEPT, env={**env, allocator.KEPT_SHARE: share})[0]
    assert kept == pytest.approx(float(share))
    assert budget == pytest.approx(kept * allocator.physical_mb())


@pytest.mark.parametrize("share", ["all", "2", "-0.5", "nan"])
def test_a_kept_share_outside_0_to_1_is_a_one_line_error(share: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", KEPT],
        env={**_untuned(), allocator.KEPT_SHARE: share},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    message = f"WRCOR_JAX_HEAP_KEPT must be a share of memory from 0 to 1, not {share!r}"
    assert run.stderr.strip() == message


def test_heap_settings_without_the_restart_keep_an_eighth() -> None:
    """`WRCOR_JAX_MALLOC=heap` in a process that did not start with its tunables: the big
    blocks are mapped apart as glibc does by default, so keeping more would not serve."""
    kept, _ = _run(KEPT, env={**_untuned(), allocator.OPT_OUT: "heap"})[0]
    assert kept == pytest.approx(1 / 8)


def test_usage_doc_gives_the_settings_in_force() -> None:
    usage = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    assert f"GLIBC_TUNABLES={':'.join(allocator.TUNABLES)}" in usage
    code = re.search(r"LD_PRELOAD=\$\(python -c '([^']+)'\)", usage).group(1)
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert printed.stdout.strip() == str(allocator.large_blocks_library())


LARGE_BLOCKS = """
import ctypes, json, random
from wrcor_jax import allocator
process = ctypes.CDLL(None)
process.malloc_usable_size.restype = ctypes.c_size_t
process.realloc.restype = ctypes.c_void_p

def lazy_free_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("LazyFree:"):
            return int(line.split()[1]) / 1024

def aligned(size, alignment=64):
    block = ctypes.c_void_p()
    assert process.posix_memalign(ctypes.byref(block), alignment, size) == 0
    return block.value

live, rng, intact = {}, random.Random(0), True
for step in range(300):  # blocks of 1-40 MB, each filled with its own byte
    if live and rng.random() < 0.45:
        block = rng.choice(list(live))
        size, byte = live.pop(block)
        intact &= ctypes.string_at(block, 1)[0] == byte == ctypes.string_at(block + size - 1, 1)[0]
        process.free(ctypes.c_void_p(block))
    else:
        size, byte = rng.randrange(1 << 20, 40 << 20), step % 251
        block = aligned(size, rng.choice([16, 64, 4096]))
        ctypes.memset(block, byte, size)
        live[block] = size, byte
for block, (size, byte) in live.items():
    intact &= ctypes.string_at(block, 1)[0] == byte == ctypes.string_at(block + size - 1, 1)[0]
    process.free(ctypes.c_void_p(block))

block = aligned(64 << 20)
ctypes.memset(block, 7, 64 << 20)
in_use = allocator.large_blocks_mb()[0]
usable = process.malloc_usable_size(ctypes.c_void_p(block)) >= 64 << 20
grown = process.realloc(ctypes.c_void_p(block), 96 << 20)
kept = ctypes.string_at(grown + (64 << 20) - 1, 1)[0] == 7
process.free(ctypes.c_void_p(grown))
used, free = allocator.large_blocks_mb()
block = ctypes.c_void_p()  # more than the machine has: glibc's to refuse (or grant)
too_much = int(allocator.physical_mb() * 1.5 * 2**20)
refused = process.posix_memalign(ctypes.byref(block), 64, too_much)
process.free(block)
refused = refused != 0 and allocator.large_blocks_mb()[0] == used
print(json.dumps([intact, allocator.tuned(), in_use, used, usable, kept, free, lazy_free_mb(),
                  refused]))
"""


def test_tuned_processes_cut_large_aligned_blocks_from_one_kept_range() -> None:
    intact, tuned, in_use, after, usable, kept, free, advised, refused = _run(
        LARGE_BLOCKS, env=allocator.environment()
    )[0]
    assert refused or Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    assert tuned and intact and usable and kept  # no block overlapped another
    assert 64 <= in_use < 65 and after == 0
    assert free > 100 and advised > free - 4  # freed pages marked MADV_FREE, not unmapped


def test_the_large_block_allocator_is_preloaded_only_where_tuned() -> None:
    env = allocator.environment(True, {"LD_PRELOAD": "/lib/a.so /lib/b.so"})
    library = str(allocator.large_blocks_library())
    assert env["LD_PRELOAD"].split(":") == ["/lib/a.so", "/lib/b.so", library]
    assert allocator.environment(True, env) == env  # idempotent
    assert allocator.environment(False, env)["LD_PRELOAD"] == "/lib/a.so:/lib/b.so"
    assert "LD_PRELOAD" not in allocator.environment(False, {"LD_PRELOAD": library})
