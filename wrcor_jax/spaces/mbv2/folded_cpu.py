"""The backward of the expand's folded conv, from `folded_cpu.cc`, as an XLA:CPU custom call
built on first use.

The expand's backward reads its output's cotangent g for the scale's and the bias's sums and
again for the product that gives the input's; on large images g and the output are the
widest arrays of a block, and XLA:CPU read them from memory each time. The call sums and
multiplies each chunk of rows while in cache. Built as `native_calls` says; where it is not,
`available()` is False and the engine keeps XLA's form."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.spaces.mbv2 import native_calls

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "wrcor_mbv2_folded_conv_cotangent"


def available() -> bool:
    """Whether the custom call is built and registered for XLA:CPU (once per process)."""
    return native_calls.register(SOURCE, ((TARGET, "WrcorFoldedConvCotangent"),))


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
    flags = jnp.reshape(mask, (r,)).astype(np.int32)
    return tuple(jax.ffi.ffi_call(TARGET, outputs)(g, z, kernel.astype(g.dtype), bias, flags))
