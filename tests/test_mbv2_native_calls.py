"""The native calls' shared header builds for this CPU's own registers."""

import os
import shutil
import subprocess

import jax
import pytest

from wrcor_jax.spaces.mbv2 import native_calls, stem_cpu


def test_native_vectors_fit_the_cpus_registers():
    """A GCC vector wider than the CPU's registers (64 bytes on an AVX2 CPU) is passed through
    the stack, and GCC says so (-Wpsabi): the products ran ~30x slower there."""
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    flags = [f for f in native_calls.FLAGS if f not in ("-w", "-shared", "-fPIC")]
    includes = [f"-I{jax.ffi.include_dir()}", f"-I{native_calls.HEADER.parent}"]
    command = [compiler, *flags, "-Wpsabi", *includes, "-S", str(stem_cpu.SOURCE)]
    result = subprocess.run([*command, "-o", os.devnull], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ABI" not in result.stderr, result.stderr
