"""Shared libraries built from this package's C and C++ sources by the machine's compiler.

Each is compiled once per source, compiler, flags and caller's key into the user's cache,
through a temporary file renamed into place so that concurrent builds do not collide. This
module imports no JAX: the allocator builds its library before the process restarts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def user_cache_dir() -> Path:
    """`wrcor_jax` in the user's cache dir (`$XDG_CACHE_HOME`, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wrcor_jax"


def build(source: Path, compiler: str, flags: Sequence[str], key: Sequence[str] = ()) -> Path:
    """The shared library of `source` compiled by `compiler` with `flags`, built if missing;
    `key` names what else it depends on (e.g. the headers' version). Raises OSError or
    CalledProcessError (with the compiler's output) where it cannot be built."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = [source.read_text(), compiler, version, *flags, *key]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    library = user_cache_dir() / "native" / f"{source.stem}_{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *flags, str(source), "-o", str(built)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        built.replace(library)
    return library
