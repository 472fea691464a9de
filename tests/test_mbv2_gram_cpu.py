"""The native centred Gram matrix (`gram_cpu`) and its cotangent against float64 NumPy and
autodiff of XLA's product, on the engine's tiles of rows."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.spaces.mbv2 import gram_cpu
from wrcor_jax.spaces.mbv2.rows import gram_matrix, tile_mask

if os.environ.get("WRCOR_JAX_NATIVE") == "0" or not (os.environ.get("CXX") or shutil.which("g++")):
    pytest.skip("native centred gram: switched off or no compiler", allow_module_level=True)

CASES = [  # images, rows per tile, channels, real rows per image, tile index, real channels
    (4, 128, 64, 128, 0, 64),  # a whole tile
    (3, 64, 96, 100, 1, 96),  # the image ends inside the tile
    (2, 32, 40, 49, 1, 40),  # a width no register block divides
    (5, 300, 32, 290, 0, 32),  # more rows than a chunk, in several parts
    (2, 8, 33, 20, 3, 33),  # padding only: 0
    (3, 128, 64, 100, 0, 40),  # the engine's padded channels: zeros, a cotangent's too
]


def _case(n: int, r: int, c: int, rows: int, tile: int, real: int, dtype) -> tuple:
    rng = np.random.default_rng(n * 1000 + r + c)
    x = (rng.normal(size=(n, r, c)) + rng.uniform(0, 3, size=c)).astype(dtype)
    x[:, max(0, rows - tile * r) :] = 0  # the engine's padded rows are zero
    mean = x.reshape(-1, c).mean(axis=0) + rng.normal(scale=0.1, size=c).astype(dtype)
    g = rng.normal(size=(c, c))
    x[..., real:] = mean[real:] = g[real:] = g[:, real:] = 0
    return jnp.asarray(x), jnp.asarray(mean.astype(dtype)), g


def _xla(x, mean, rows, tile):
    """The engine's XLA form: the centred, masked tile's product."""
    centred = (x - mean) * tile_mask(x.shape[1], tile, rows)
    return gram_matrix(centred.reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "r", "c", "rows", "tile", "channels"), CASES)
def test_native_gram_and_cotangent_equal_the_xla_product(n, r, c, rows, tile, channels, dtype):
    assert gram_cpu.available()
    with jax.enable_x64(dtype == np.float64):
        x, mean, g = _case(n, r, c, rows, tile, channels, dtype)
        got = gram_cpu.centred_gram(x, mean, rows, tile)
        assert got.dtype == dtype and got.shape == (c, c)
        real = np.asarray(x, np.float64)[:, : max(0, min(r, rows - tile * r))].reshape(-1, c)
        centred = real - np.asarray(mean, np.float64)
        want = centred.T @ centred
        tol = 2e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
        np.testing.assert_array_equal(got, got.T)

        def loss(gram):
            return lambda x_, m_: jnp.sum(jnp.asarray(g, dtype) * gram(x_, m_, rows, tile))

        got_d = jax.grad(loss(gram_cpu.centred_gram), (0, 1))(x, mean)
        with jax.enable_x64(True):
            x64, mean64 = (jnp.asarray(a, np.float64) for a in (x, mean))
            want_d = jax.grad(loss(_xla), (0, 1))(x64, mean64)
        for got_part, want_part in zip(got_d, want_d, strict=True):
            scale = np.abs(want_part).max() + 1e-30
            np.testing.assert_allclose(got_part, want_part, rtol=tol, atol=tol * scale)
        # the padded rows' cotangent is 0
        assert not np.any(np.asarray(got_d[0])[:, max(0, rows - tile * r) :])


def test_native_gram_refuses_a_mean_of_another_width():
    x = jnp.ones((2, 8, 32), jnp.float32)
    with pytest.raises(Exception, match="centred gram: expected"):
        jax.block_until_ready(gram_cpu.centred_gram(x, jnp.zeros(16, jnp.float32), 8, 0))
