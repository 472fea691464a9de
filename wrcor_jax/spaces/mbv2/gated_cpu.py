"""The project's gated 1x1 conv of `gated_cpu.cc` as XLA:CPU custom calls, built on first use.

(ReLU(h) x gate) @ kernel for the depthwise piece's pre-ReLU rows h and the SE gate, with
the sum of the output's rows (BatchNorm's running sum). XLA:CPU wrote the gated rows out
full size before the product, and the product's cotangent before the ReLU's mask and the
gate's sums; the calls gate, multiply and read back each chunk of rows in cache. The
kernel's gradient stays XLA's, computed only where asked for. Built as `native_calls` says;
where it is not, `available()` is False and the engine keeps `gated_matmul`."""

from __future__ import annotations

from pathlib import Path

import jax

from wrcor_jax.spaces.mbv2 import native_calls

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "wrcor_mbv2_gated_product"
BACKWARD_TARGET = "wrcor_mbv2_gated_product_backward"


def available() -> bool:
    """Whether the custom calls are built and registered for XLA:CPU (once per process)."""
    handlers = ((TARGET, "WrcorGatedProduct"), (BACKWARD_TARGET, "WrcorGatedProductBackward"))
    return native_calls.register(SOURCE, handlers)


@jax.custom_vjp
def gated_product(h: jax.Array, gate: jax.Array, kernel: jax.Array) -> tuple:
    """(ReLU(h) x gate[:, None]) @ kernel for (N, R, Cw) rows h, an (N, Cw) gate and a
    (Cw, Co) kernel, and the sum of its rows (Co,), summed in double."""
    if not available():
        raise RuntimeError("the native gated product is not available on this machine")
    n, r, _ = h.shape
    co = kernel.shape[-1]
    outputs = (jax.ShapeDtypeStruct((n, r, co), h.dtype), jax.ShapeDtypeStruct((co,), h.dtype))
    return tuple(jax.ffi.ffi_call(TARGET, outputs)(h, gate, kernel.astype(h.dtype)))


def _gated_product_fwd(h: jax.Array, gate: jax.Array, kernel: jax.Array) -> tuple:
    return gated_product(h, gate, kernel), (h, gate, kernel)


def _gated_product_bwd(residuals: tuple, cotangents: tuple) -> tuple:
    h, gate, kernel = residuals
    g, d_sums = cotangents
    outputs = (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(gate.shape, h.dtype))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, outputs)
    d_h, d_gate = call(h, gate, kernel.astype(h.dtype), g, d_sums)
    # the kernel's gradient, which XLA drops where no one reads it
    gated = (jax.nn.relu(h) * gate[:, None, :]).reshape(-1, h.shape[-1])
    d_kernel = gated.T @ (g + d_sums).reshape(-1, g.shape[-1])
    return d_h, d_gate, d_kernel.astype(kernel.dtype)


gated_product.defvjp(_gated_product_fwd, _gated_product_bwd)
