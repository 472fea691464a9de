"""The engine's XLA:CPU custom calls: C++ sources built on first use and registered.

Each source is compiled with the machine's own C++ compiler (`$CXX`, else g++) for its own
CPU, into the user's cache, once per source, shared header, compiler, JAX and CPU. Where
that fails, or `WRCOR_JAX_NATIVE=0`, `register` returns False and the engine keeps XLA's
own form of the same maths."""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import jax

from wrcor_jax import native
from wrcor_jax.compilation import cpu_model

HEADER = Path(__file__).with_name("native_cpu.h")
# -fno-trapping-math lets GCC vectorize the loops that select or mask (`x > 0 ? a : b`, a ReLU's
# mask): it may then compute both sides, which changes no value.
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w")


@functools.cache
def register(source: Path, handlers: tuple[tuple[str, str], ...]) -> bool:
    """Build `source` and register each (target, handler symbol) of `handlers` for XLA:CPU;
    False, with a warning where the build failed, if it cannot be."""
    if os.environ.get("WRCOR_JAX_NATIVE", "1") == "0":
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        return False
    try:
        flags = (*FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HEADER.parent}")
        key = (HEADER.read_text(), jax.__version__, cpu_model())
        library = ctypes.cdll.LoadLibrary(str(native.build(source, compiler, flags, key)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = str(getattr(error, "stderr", "") or error)[-2000:]
        warnings.warn(f"{source.name} did not build, XLA's own form serves: {detail}", stacklevel=2)
        return False
    for target, symbol in handlers:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    return True
