"""The native gated product (`gated_cpu`) against the engine's XLA `gated_matmul`, forward
and backward, in float32 and float64."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.spaces.mbv2 import gated_cpu
from wrcor_jax.spaces.mbv2.rows import gated_matmul

if os.environ.get("WRCOR_JAX_NATIVE") == "0" or not (os.environ.get("CXX") or shutil.which("g++")):
    pytest.skip("native gated product: switched off or no compiler", allow_module_level=True)

CASES = [  # images, rows, wide channels, output channels, real rows per image, real widths
    (4, 128, 192, 32, 128, None),
    (3, 64, 96, 40, 49, None),  # padded rows (zero), widths no register block divides
    (1, 1000, 48, 24, 1000, None),  # one image in several parts, a part-filled last chunk
    (2, 16, 1536, 256, 16, None),
    (3, 128, 256, 64, 100, (152, 40)),  # the engine's zero-padded kernel: its block only
    (2, 64, 64, 32, 64, (0, 0)),  # a kernel of zeros: zeros
]


def _case(n: int, r: int, cw: int, co: int, real: int, widths, dtype) -> tuple:
    rng = np.random.default_rng(n + r + cw + co)
    h = rng.normal(size=(n, r, cw)).astype(dtype)
    h[:, real:] = 0  # the depthwise piece's padded rows are zero
    h[:, real // 2] = -np.abs(h[:, real // 2])  # a row the ReLU zeroes
    gate = rng.uniform(size=(n, cw)).astype(dtype)
    kernel = rng.normal(size=(cw, co)).astype(dtype)
    if widths is not None:
        kernel[widths[0] :] = kernel[:, widths[1] :] = 0
    g = rng.normal(size=(n, r, co)).astype(dtype)
    d_sums = rng.normal(size=co).astype(dtype)
    return tuple(jnp.asarray(a) for a in (h, gate, kernel, g, d_sums))


def _xla(h, gate, kernel):
    y = gated_matmul(h, gate, kernel)
    return y, y.sum(axis=(0, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "r", "cw", "co", "real", "widths"), CASES)
def test_native_gated_product_and_its_backward_equal_xla(n, r, cw, co, real, widths, dtype):
    assert gated_cpu.available()
    tol = 2e-5 if dtype == np.float32 else 1e-12
    with jax.enable_x64(dtype == np.float64):
        h, gate, kernel, g, d_sums = _case(n, r, cw, co, real, widths, dtype)
        got, got_pullback = jax.vjp(gated_cpu.gated_product, h, gate, kernel)
        with jax.enable_x64(True):
            wide = [jnp.asarray(a, np.float64) for a in (h, gate, kernel, g, d_sums)]
            want, want_pullback = jax.vjp(_xla, *wide[:3])
            want_d = want_pullback((wide[3], wide[4]))
        got_d = got_pullback((g, d_sums))
        for got_part, want_part in zip((*got, *got_d), (*want, *want_d), strict=True):
            assert got_part.dtype == dtype and got_part.shape == want_part.shape
            scale = np.abs(want_part).max()
            np.testing.assert_allclose(got_part, want_part, rtol=tol, atol=tol * scale)


def test_native_gated_product_refuses_a_gate_of_another_width():
    h = jnp.ones((2, 8, 32), jnp.float32)
    with pytest.raises(Exception, match="gated product: expected"):
        jax.block_until_ready(gated_cpu.gated_product(h, jnp.ones((2, 16)), jnp.ones((32, 8))))
