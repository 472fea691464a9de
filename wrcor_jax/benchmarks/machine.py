"""What machine a benchmark ran on, for its report (figures mean little without it)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul rate through XLA: a jitted size x size product, median
    of `repeats` runs after the compile, 2 size^3 FLOPs each. Timing reports set a network's
    FLOPs against it (a floor no implementation on this machine can beat)."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    jax.block_until_ready(product(a, a))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, a))
        samples.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(samples)
