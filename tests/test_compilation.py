"""Compile counting, the persistent compilation cache and the executable memory budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from wrcor_jax import compilation
from wrcor_jax.allocator import resident_mb
from wrcor_jax.compilation import (
    CompileCounter,
    ExecutableBudget,
    RetainedJit,
    default_cache_dir,
    mapping_limit,
    mappings,
    release_executables,
)

# Run apart: the persistent cache is process-wide configuration.
RELOAD = """
import json, sys
import jax, jax.numpy as jnp
from wrcor_jax.compilation import CompileCounter, use_persistent_cache
use_persistent_cache(sys.argv[1])
CompileCounter.install()
f = jax.jit(lambda x: jnp.tanh(x) * 3.0)
f(jnp.ones(17)).block_until_ready()
first = (CompileCounter.count, CompileCounter.loads)
jax.clear_caches()
f(jnp.ones(17)).block_until_ready()
print(json.dumps([first, (CompileCounter.count, CompileCounter.loads)]))
"""


def _run_apart(script: str, cache: Path, *args: str, hash_seed: int = 0, **env: str) -> list:
    """The JSON that `script` prints last, run in a fresh process with `cache` (and `args`)
    as arguments, `hash_seed` as PYTHONHASHSEED and `env` added to the environment."""
    run = subprocess.run(
        [sys.executable, "-c", script, str(cache), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": str(hash_seed), **env},
    )
    return json.loads(run.stdout.splitlines()[-1])


def test_released_programs_reload_from_the_persistent_cache(tmp_path: Path) -> None:
    (compiles, loads), (compiles_after, loads_after) = _run_apart(RELOAD, tmp_path / "xla")
    assert compiles >= 1 and loads == 0
    assert compiles_after == compiles  # nothing compiled again
    assert loads_after >= 1  # read back instead
    assert any((tmp_path / "xla").iterdir())


def test_budget_releases_only_when_over_it() -> None:
    f = jax.jit(lambda x: x + 1.0)
    assert float(f(jnp.ones(()))) == 2.0
    assert resident_mb() > 0
    # mappings out of the way: a test worker that ran other files may hold past half the cap
    generous = ExecutableBudget(limit_mb=10**9, map_limit=10**9)
    assert not generous.check() and generous.releases == 0
    tight = ExecutableBudget(limit_mb=0)
    assert tight.check() and tight.releases == 1
    assert float(f(jnp.ones(()))) == 2.0  # recompiled on demand


def test_budget_releases_executables_past_its_mapping_limit() -> None:
    """Loaded executables hold memory mappings, which the kernel caps per process: past the
    budget's limit they are released, and their mappings go with them."""
    functions = [jax.jit(lambda x, k=k: jnp.tanh(x * k) + k) for k in range(30)]
    for f in functions:
        f(jnp.ones(8)).block_until_ready()
    held = mappings()
    assert held > 0 and (mapping_limit() or 0) > held
    assert not ExecutableBudget(limit_mb=10**9, map_limit=10**9).check()
    budget = ExecutableBudget(limit_mb=10**9, map_limit=held - 1)
    assert budget.check() and budget.releases == 1
    assert mappings() < held - 30  # ~3 mappings each for these small programs


RETAINED = """
import json, sys
import jax, jax.numpy as jnp
from wrcor_jax.compilation import (
    CompileCounter, RetainedJit, mappings, release_executables, use_persistent_cache,
)
use_persistent_cache(sys.argv[1])
CompileCounter.install()
traces = []
def f(x, scale):
    traces.append(x.shape)
    return jnp.tanh(x) * scale
functions = [RetainedJit(lambda x, k=k: f(x, k)) for k in range(20)]
def run():
    return [float(g(jnp.ones(17)).sum()) for g in functions]
first = run()
held = mappings()
release_executables()
freed = held - mappings()
again = run()
print(json.dumps([first == again, len(traces), freed, CompileCounter.count, CompileCounter.loads]))
"""


def test_retained_jit_reloads_released_programs_without_tracing(tmp_path: Path) -> None:
    """After a release, the executables' mappings are gone and calling again reads them
    back from the persistent cache: nothing traced or compiled twice."""
    same, traces, freed, compiles, loads = _run_apart(RETAINED, tmp_path / "xla")
    assert same
    assert traces == 20  # one trace per function, none after the release
    assert freed >= 20  # at least one mapping per released executable
    assert compiles >= 20 and loads >= 20


def test_retained_jit_keys_on_shapes_and_static_arguments() -> None:
    traces: list = []

    def scaled(x: jax.Array, power: int) -> jax.Array:
        traces.append((x.shape, power))
        return x**power

    g = RetainedJit(scaled, static_argnames=("power",))
    assert float(g(jnp.full(3, 2.0), power=2).sum()) == 12.0
    assert float(g(jnp.full(3, 2.0), power=3).sum()) == 24.0
    assert float(g(jnp.full(4, 2.0), power=2).sum()) == 16.0
    assert float(g(jnp.full(3, 1.0), power=2).sum()) == 3.0  # same signature: no trace
    assert traces == [((3,), 2), ((3,), 3), ((4,), 2)]
    # under a transformation it is plain jit
    assert float(jax.grad(lambda x: g(x, power=2).sum())(jnp.ones(3))[0]) == 2.0


def test_retained_jit_keeps_the_most_recently_used_lowerings(monkeypatch) -> None:
    monkeypatch.setattr(compilation, "KEPT_LOWERINGS", 2)
    traces: list = []

    def double(x: jax.Array) -> jax.Array:
        traces.append(x.shape)
        return 2 * x

    g = RetainedJit(double)
    for n in (1, 2, 3):
        g(jnp.ones(n))
    release_executables()
    g(jnp.ones(3))  # kept
    g(jnp.ones(1))  # the oldest: traced again
    assert traces == [(1,), (2,), (3,), (1,)]


def test_release_frees_the_least_recently_used_executables_first() -> None:
    """A partial release keeps the executables used last: calling them again compiles or
    loads nothing, while the others are compiled (or read back) anew."""
    release_executables()
    g, x = RetainedJit(lambda x: 3 * x), {n: jnp.ones(n) for n in range(1, 5)}
    for n in (1, 2, 3, 4, 1):  # 1 used last, then 4
        g(x[n])

    def built() -> int:
        return CompileCounter.count + CompileCounter.loads

    CompileCounter.install()
    release_executables(0.5)  # of 4 loaded: 2 and 3 go
    before = built()
    g(x[1]), g(x[4])
    assert built() == before
    g(x[2])
    assert built() == before + 1


def test_budget_releases_the_rest_when_half_is_not_enough() -> None:
    g, x = RetainedJit(lambda x: x - 1), (jnp.ones(1), jnp.ones(2))
    for value in x:
        g(value)
    CompileCounter.install()
    budget = ExecutableBudget(limit_mb=0)  # never within: both releases run
    assert budget.check() and budget.releases == 1
    before = CompileCounter.count + CompileCounter.loads
    g(x[0]), g(x[1])
    assert CompileCounter.count + CompileCounter.loads == before + 2


def test_mapping_note_only_where_the_cap_is_small(monkeypatch) -> None:
    """The first release the mapping cap forces says how to raise it, once per process."""
    monkeypatch.setattr(compilation, "mapping_limit", lambda: 65530)
    note = compilation.mapping_note()
    assert "65530" in note and "sysctl -w vm.max_map_count=262144" in note
    compilation._warn_of_mappings.cache_clear()
    budget = ExecutableBudget(limit_mb=10**9, map_limit=0)
    with pytest.warns(RuntimeWarning, match="vm.max_map_count"):
        assert budget.check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert budget.check()  # said once
    for roomy in (262_144, 1 << 31, None):
        monkeypatch.setattr(compilation, "mapping_limit", lambda roomy=roomy: roomy)
        assert compilation.mapping_note() is None


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/jax")
    assert default_cache_dir() == Path("/somewhere/jax")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/u/.cache2")
    assert default_cache_dir() == Path("/home/u/.cache2/wrcor_jax/xla")


STORED = """
import json, sys, warnings
import jax, jax.numpy as jnp
from wrcor_jax.compilation import CompileCounter, RetainedJit, use_persistent_cache
use_persistent_cache(sys.argv[1])
CompileCounter.install()
traces = []
def f(x, kinds):
    traces.append(x.shape)
    return jnp.tanh(x) * len(kinds)
if sys.argv[2] == "jit":  # the same program compiled by plain jit, into JAX's cache alone
    g = lambda x, kinds: jax.jit(f, static_argnames="kinds")(x, kinds=kinds)
else:
    g = RetainedJit(f, static_argnames=("kinds",), name="tests/f")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = float(g(jnp.ones(17), kinds=frozenset({"a", "b", "c", "d"})).sum())
damaged = any("did not load" in str(w.message) for w in caught)
print(json.dumps([y, len(traces), CompileCounter.count, CompileCounter.loads, damaged]))
"""


def _stored(cache: Path) -> list[Path]:
    return sorted((cache / "programs").rglob("*.program"))


def test_named_programs_are_read_back_without_tracing(tmp_path: Path) -> None:
    """A named `RetainedJit`'s program is stored on first compilation and later processes
    run it without tracing, whatever their hash seed (its static set argument included); a
    damaged file is removed (with a warning) and the program compiled or read anew."""
    cache = tmp_path / "xla"
    y, traces, compiles, _, _ = _run_apart(STORED, cache, "retained", hash_seed=1)
    assert y == pytest.approx(4 * 17 * float(jnp.tanh(1.0))) and traces == 1 and compiles >= 1
    assert len(_stored(cache)) == 1
    for seed in (2, 3):  # no trace, no compilation (the eager ops load from JAX's cache)
        again, traces, compiles, _, damaged = _run_apart(STORED, cache, "retained", hash_seed=seed)
        assert (again, traces, compiles, damaged) == (y, 0, 0, False)
    _stored(cache)[0].write_bytes(b"damaged")
    again, traces, _, _, damaged = _run_apart(STORED, cache, "retained")
    assert (again, traces, damaged) == (y, 1, True)
    again, traces, compiles, _, damaged = _run_apart(STORED, cache, "retained")
    assert (again, traces, compiles, damaged) == (y, 0, 0, False)  # stored anew


def test_stored_programs_are_compiled_apart_from_jax_cache(tmp_path: Path) -> None:
    """XLA:CPU serializes a program read from JAX's cache without its code ("Function ...
    not found" where the copy runs), so the store compiles its programs anew, under a key
    of JAX's cache that it never writes: a program JAX's cache holds is compiled once more,
    then read from the store."""
    cache = tmp_path / "xla"
    y, _, compiles, _, _ = _run_apart(STORED, cache, "jit")
    assert compiles >= 1 and not _stored(cache)
    again, traces, compiles, _, _ = _run_apart(STORED, cache, "retained")
    assert (again, traces, compiles) == (y, 1, 1) and len(_stored(cache)) == 1
    again, traces, compiles, _, _ = _run_apart(STORED, cache, "retained")
    assert (again, traces, compiles) == (y, 0, 0)


def test_the_store_can_be_turned_off(tmp_path: Path) -> None:
    cache = tmp_path / "xla"
    for _ in range(2):
        _, traces, _, _, _ = _run_apart(STORED, cache, "retained", WRCOR_JAX_PROGRAM_STORE="0")
        assert traces == 1 and not _stored(cache)


def test_a_program_the_store_cannot_write_still_runs(tmp_path: Path) -> None:
    blocked = tmp_path / "programs"
    blocked.write_text("")  # a file where the store's folder should be
    store = compilation.ProgramStore(blocked)
    lowered = jax.jit(lambda x: x * 5.0).lower(jnp.ones(3))
    with pytest.warns(RuntimeWarning, match="not stored"):
        program = store.compile(blocked / "ab" / "cd.program", lowered)
    assert float(program(jnp.ones(3))[0]) == 5.0
    assert blocked.is_file()


def test_the_allocators_settings_leave_stored_programs_keyed_as_they_were(monkeypatch) -> None:
    """How host memory is handed out changes no program: `WRCOR_JAX_HEAP_KEPT` and
    `WRCOR_JAX_MALLOC` stay out of the program store's key, other `WRCOR_JAX_` flags not."""
    context = compilation._fixed_context.__wrapped__
    for name in ("WRCOR_JAX_HEAP_KEPT", "WRCOR_JAX_MALLOC", "WRCOR_JAX_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    plain = context()
    monkeypatch.setenv("WRCOR_JAX_HEAP_KEPT", "1")
    monkeypatch.setenv("WRCOR_JAX_MALLOC", "heap")
    assert context() == plain
    monkeypatch.setenv("WRCOR_JAX_NATIVE", "0")
    assert context() != plain


def test_stored_programs_are_keyed_by_this_processs_devices(monkeypatch) -> None:
    """A program runs on the devices it was compiled for: in a `jax.distributed` job that
    shares a store, process 1's program must not be read back by process 0."""
    context = compilation._fixed_context.__wrapped__
    own = context()
    other = [SimpleNamespace(id=device.id + 1) for device in jax.local_devices()]
    monkeypatch.setattr(jax, "local_devices", lambda: other)
    assert context() != own
