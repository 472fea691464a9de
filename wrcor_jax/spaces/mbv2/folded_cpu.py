"""The expand's folded conv and its backward, from `folded_cpu.cc`, as XLA:CPU custom calls
built on first use.

XLA:CPU ran the expand's product over the padded widths and rows, and its backward read the
output's cotangent g for the scale's and the bias's sums and again for the product that gives
the input's; on large images g and the output are the widest arrays of a block. The calls
multiply only the kernel's nonzero block (the engine pads it with zeros) on the real rows,
and the backward sums and multiplies each chunk of rows while in cache. The same sums alone
serve the BatchNorm backwards of the depthwise conv and of the 1x1 tiles. Built as
`native_calls` says; where it is not, `available()` is False and the engine keeps XLA's
form."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.spaces.mbv2 import native_calls

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "wrcor_mbv2_folded_conv"
COTANGENT_TARGET = "wrcor_mbv2_folded_conv_cotangent"
SUMS_TARGET = "wrcor_mbv2_cotangent_sums"


def available() -> bool:
    """Whether the custom calls are built and registered for XLA:CPU (once per process)."""
    handlers = (
        (TARGET, "WrcorFoldedConv"),
        (COTANGENT_TARGET, "WrcorFoldedConvCotangent"),
        (SUMS_TARGET, "WrcorCotangentSums"),
    )
    return native_calls.register(SOURCE, handlers)


def _flags(mask: jax.Array, rows: int) -> jax.Array:
    return jnp.reshape(mask, (rows,)).astype(np.int32)


def folded_conv(
    centred: jax.Array, kernel: jax.Array, bias: jax.Array, mask: jax.Array
) -> jax.Array:
    """centred @ kernel + bias on the real rows `mask` ((R, 1) or (R,)) of (N, R, Ci) rows
    `centred` (0 on the others), 0 on the other rows: (N, R, Co). Its inputs are taken as
    constants: the engine differentiates `folded_conv_saved`, which takes this output."""
    if not available():
        raise RuntimeError("the native folded conv is not available on this machine")
    n, r, _ = centred.shape
    dtype = centred.dtype
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, r, kernel.shape[-1]), dtype))
    operands = (centred, kernel.astype(dtype), bias.astype(dtype))
    return call(*jax.lax.stop_gradient(operands), _flags(mask, r))


def folded_conv_cotangent(
    g: jax.Array, z: jax.Array, kernel: jax.Array, bias: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """For the cotangent g of z = centred @ kernel + bias ((N, R, Co) rows, `mask` (R, 1)
    or (R,): the real rows): g @ kernel^T on the real rows, 0 on the others (N, R, Ci), and
    (2, Co): the sums over the real rows of g (z - bias) and of g (in double)."""
    if not available():
        raise RuntimeError("the native folded conv backward is not available on this machine")
    n, r, _ = g.shape
    outputs = (
        jax.ShapeDtypeStruct((n, r, kernel.shape[0]), g.dtype),
        jax.ShapeDtypeStruct((2, g.shape[-1]), g.dtype),
    )
    call = jax.ffi.ffi_call(COTANGENT_TARGET, outputs)
    return tuple(call(g, z, kernel.astype(g.dtype), bias, _flags(mask, r)))


def cotangent_sums(g: jax.Array, z: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """`folded_conv_cotangent`'s sums alone, (2, Co): over the real rows `mask` ((R, 1) or
    (R,)) of (N, R, Co) rows, g (z - bias) and g, in double. The BatchNorms after the
    depthwise conv and on the 1x1 tiles read them for their backwards."""
    if not available():
        raise RuntimeError("the native cotangent sums are not available on this machine")
    call = jax.ffi.ffi_call(SUMS_TARGET, jax.ShapeDtypeStruct((2, g.shape[-1]), g.dtype))
    return call(g, z, bias.astype(g.dtype), _flags(mask, g.shape[1]))
