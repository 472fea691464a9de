"""The depthwise conv of `depthwise_cpu.cc` as an XLA:CPU custom call, built on first use.

XLA:CPU runs the engine's sum of row-shifted taps at 5-20 GMAC/s and, on small images,
mostly over padding (a 7 x 7 kernel on a 7 x 7 image: 13x slower than torch's NHWC
depthwise); the kernel sums only the taps inside each image. Its kernel's cotangent
(`kernel_cotangent`) reads the input and the output's cotangent once, where the taps read
them once per tap. Built as `native_calls` says; where it is not, `available()` is False and
the engine keeps its XLA taps (the same maths: float32 sums in another order)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.spaces.mbv2 import native_calls

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "wrcor_mbv2_depthwise"
KERNEL_TARGET = "wrcor_mbv2_depthwise_kernel"


def available() -> bool:
    """Whether the custom calls are built and registered for XLA:CPU (once per process)."""
    handlers = ((TARGET, "WrcorDepthwise"), (KERNEL_TARGET, "WrcorDepthwiseKernel"))
    return native_calls.register(SOURCE, handlers)


def _require() -> None:
    if not available():
        raise RuntimeError("the native depthwise conv is not available on this machine")


def depthwise(
    sources: Sequence[jax.Array],
    kernel: jax.Array,
    side: jax.Array,
    masks: Sequence[jax.Array],
    rows_out: int,
    tiles_out: int,
    stride: int,
    transposed: bool,
    statistics: bool = False,
) -> tuple[jax.Array, ...]:
    """The custom call (where `available()`) on (N, P, C) rows given as tiles of consecutive
    rows (one tile: the whole), returning its (N, rows_out, C) output as `tiles_out` tiles.
    Forward: relu(sources) of images of side `side` conv `kernel` (k, k, 1, C) with zero
    padding k // 2 and `stride`, rows of side ceil(side / stride); no `masks`; with
    `statistics`, then (2, C): the output's sum over its real rows and its sum of squares
    about their mean (summed in float64). Transposed: the cotangent of relu(masks) at the
    forward's input (`masks`: its tiles), from the output's cotangent `sources` (its padded
    rows are not read). Padded output rows are 0."""
    _require()
    n, _, c = sources[0].shape
    dtype = sources[0].dtype
    tile = jax.ShapeDtypeStruct((n, rows_out // tiles_out, c), dtype)
    moments = [jax.ShapeDtypeStruct((2, c), dtype)] if statistics else []
    call = jax.ffi.ffi_call(TARGET, [tile] * tiles_out + moments)
    outputs = call(
        kernel.astype(dtype),
        jnp.asarray(side, np.int32).reshape(1),
        *sources,
        *masks,
        stride=np.int64(stride),
        transposed=transposed,
        sources=np.int64(len(sources)),
        statistics=statistics,
    )
    return tuple(outputs)


def kernel_cotangent(
    sources: Sequence[jax.Array],
    cotangents: Sequence[jax.Array],
    kernel: jax.Array,
    side: jax.Array,
    stride: int,
) -> jax.Array:
    """The cotangent at `kernel` (k, k, 1, C) of the forward `depthwise(sources, kernel, ...)`
    from its output's cotangent (`cotangents`: its tiles, their padded rows not read):
    each tap's ReLU(input) times the cotangent, summed over images and output pixels
    (in float64, merged in a fixed order)."""
    _require()
    call = jax.ffi.ffi_call(KERNEL_TARGET, jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
    return call(
        kernel,
        jnp.asarray(side, np.int32).reshape(1),
        *sources,
        *cotangents,
        stride=np.int64(stride),
        sources=np.int64(len(sources)),
    )
