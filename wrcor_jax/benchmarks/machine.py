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


def jax_devices() -> str:
    """The devices JAX computes on, e.g. "1 x NVIDIA H200" (initialises its backend)."""
    import jax

    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind}"


def _flops_per_s(fn, operands: tuple, flops: float, repeats: int) -> float:
    """`flops` over the median seconds of the jitted `fn(*operands)`, after its compile."""
    import statistics
    import time

    import jax

    compiled = jax.jit(fn)
    jax.block_until_ready(compiled(*operands))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*operands))
        samples.append(time.perf_counter() - start)
    return flops / statistics.median(samples)


def _normal(*shape: int):
    import jax
    import jax.numpy as jnp

    return jax.random.normal(jax.random.key(0), shape, jnp.float32)


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul rate through XLA: a jitted size x size product, median
    of `repeats` runs after the compile, 2 size^3 FLOPs each. Timing reports set a network's
    FLOPs against it (a floor no implementation on this machine can beat)."""
    import jax.numpy as jnp

    a = _normal(size, size)
    return _flops_per_s(jnp.matmul, (a, a), 2 * size**3, repeats)


def conv_flops_per_s(
    batch: int, size: int, channels: int, kernel: int = 3, repeats: int = 5
) -> float:
    """The float32 rate of a jitted `kernel` x `kernel` convolution, stride 1, "same"
    padding, `channels` in and out, on a batch x size x size x channels NHWC input: 2
    multiply-adds' FLOPs per output element and tap. Narrow convolutions (NB201's 16 to 64
    channels) run far below matmul rate, so a network's convolution floor is set by this."""
    import jax

    x, w = _normal(batch, size, size, channels), _normal(kernel, kernel, channels, channels)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return _flops_per_s(conv, (x, w), 2 * batch * size**2 * channels**2 * kernel**2, repeats)


def gram_flops_per_s(rows: int, features: int, repeats: int = 5) -> float:
    """The float32 rate of a rows x rows Gram matrix X X^T of a rows x features X (2 rows^2
    features FLOPs): the shape of a correlation term, a batch of responses."""
    import jax.numpy as jnp

    x = _normal(rows, features)
    return _flops_per_s(lambda a: jnp.matmul(a, a.T), (x,), 2 * rows**2 * features, repeats)
