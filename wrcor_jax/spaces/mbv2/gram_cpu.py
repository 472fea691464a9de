"""The centred Gram matrix of `gram_cpu.cc` as XLA:CPU custom calls, built on first use.

The expand piece's BatchNorm statistics come from its input's centred product over the
real rows. XLA:CPU wrote the centred tile out before the product and ran the transposed
product at half its usual rate; the call centres each chunk of rows in cache, sums the
upper triangle only and adds in double (2.5-4.5x faster per tile, measured in
docs/mbv2_engine.md). Built as `native_calls` says; where it is not, `available()` is False
and the engine keeps its XLA product."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.spaces.mbv2 import native_calls

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "wrcor_mbv2_centred_gram"
COTANGENT_TARGET = "wrcor_mbv2_centred_gram_cotangent"


def available() -> bool:
    """Whether the custom calls are built and registered for XLA:CPU (once per process)."""
    handlers = ((TARGET, "WrcorCentredGram"), (COTANGENT_TARGET, "WrcorCentredGramCotangent"))
    return native_calls.register(SOURCE, handlers)


def _where(rows: jax.Array, tile: jax.Array) -> jax.Array:
    return jnp.stack([jnp.asarray(rows, np.int32), jnp.asarray(tile, np.int32)])


@jax.custom_vjp
def centred_gram(x: jax.Array, mean: jax.Array, rows: jax.Array, tile: jax.Array) -> jax.Array:
    """sum (x - mean)(x - mean)^T over the real rows of tile `tile` of (N, R, C) rows (the
    first `rows` of each image's padded rows are real): (C, C), summed in double."""
    if not available():
        raise RuntimeError("the native centred gram is not available on this machine")
    c = x.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((c, c), x.dtype))
    return call(x, mean.astype(x.dtype), _where(rows, tile))


def _centred_gram_fwd(x, mean, rows, tile) -> tuple:
    return centred_gram(x, mean, rows, tile), (x, mean, rows, tile)


def _centred_gram_bwd(residuals: tuple, g: jax.Array) -> tuple:
    x, mean, rows, tile = residuals
    h = (g + g.T).astype(x.dtype)
    call = jax.ffi.ffi_call(
        COTANGENT_TARGET,
        (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(mean.shape, x.dtype)),
    )
    d_x, sums = call(x, mean.astype(x.dtype), _where(rows, tile), h)
    return d_x, -(sums @ h).astype(mean.dtype), None, None


centred_gram.defvjp(_centred_gram_fwd, _centred_gram_bwd)
