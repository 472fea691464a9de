"""The stem's first convolution of `stem_cpu.cc` as an XLA:CPU custom call, built on first
use.

On the images' 3 channels XLA:CPU's convolution ran at about 15 GFLOP/s here, most of the
stem's time (118 ms of a 224-pixel, batch-64 stem); the call holds each output pixel's
channels in registers. Its backward is XLA's (the transposed convolutions), which only the
proxies that differentiate down to the images run. Built as `native_calls` says; where it is
not, `available()` is False and the engine keeps XLA's convolution."""

from __future__ import annotations

import functools
from pathlib import Path

import jax

from wrcor_jax.layers import conv2d
from wrcor_jax.spaces.mbv2 import native_calls

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "wrcor_mbv2_stem_conv"


def available() -> bool:
    """Whether the custom call is built and registered for XLA:CPU (once per process)."""
    return native_calls.register(SOURCE, ((TARGET, "WrcorStemConv"),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def stem_conv(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """`layers.conv2d(images, kernel, stride)` (NHWC, an odd k x k kernel, padding k // 2),
    its sums in another order."""
    if not available():
        raise RuntimeError("the native stem conv is not available on this machine")
    n, h, w, _ = images.shape
    shape = (n, (h - 1) // stride + 1, (w - 1) // stride + 1, kernel.shape[-1])
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, images.dtype))
    return call(images, kernel.astype(images.dtype), stride=stride)


def _stem_conv_fwd(images: jax.Array, kernel: jax.Array, stride: int) -> tuple:
    return stem_conv(images, kernel, stride), (images, kernel)


def _stem_conv_bwd(stride: int, residuals: tuple, g: jax.Array) -> tuple:
    images, kernel = residuals
    return jax.vjp(lambda x, k: conv2d(x, k, stride), images, kernel)[1](g)


stem_conv.defvjp(_stem_conv_fwd, _stem_conv_bwd)
