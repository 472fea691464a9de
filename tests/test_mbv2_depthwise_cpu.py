"""The native depthwise conv (`depthwise_cpu`) computes the engine's XLA taps, both ways, and
their kernel's cotangent."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.spaces.mbv2 import depthwise_cpu
from wrcor_jax.spaces.mbv2.padding import MAX_KERNEL, rows_bucket
from wrcor_jax.spaces.mbv2.rows import _taps_branches, depthwise_strided_rows, row_moments

if os.environ.get("WRCOR_JAX_NATIVE") == "0" or not (os.environ.get("CXX") or shutil.which("g++")):
    pytest.skip("native depthwise conv: switched off or no compiler", allow_module_level=True)

CASES = [  # images, side, channels, kernel, stride, real channels (the kernel's others 0)
    (3, 5, 32, 3, 1, 32),
    (2, 7, 40, 7, 1, 40),  # a width no vector divides: the scalar path
    (2, 7, 32, 5, 2, 32),
    (2, 9, 64, 3, 2, 64),  # odd side at stride 2
    (2, 12, 32, 7, 2, 32),
    (2, 14, 96, 5, 1, 96),
    (1, 3, 16, 7, 1, 16),  # kernel wider than the image
    (2, 10, 128, 5, 2, 72),  # the engine's padded channels: zeros past the kernel's
    (2, 6, 40, 3, 1, 24),  # and on the scalar path
]


def _case(n: int, side: int, c: int, k: int, stride: int, real: int, dtype) -> tuple:
    rng = np.random.default_rng(side * 100 + c + k + stride)
    p_in = rows_bucket(side * side) + 3  # rows after the image, as the engine pads
    out_side = -(-side // stride)
    p_out = rows_bucket(out_side * out_side) if stride == 2 else p_in
    x = rng.normal(size=(n, p_in, c)).astype(dtype)
    x[:, side * side :] = 0  # the engine's padded rows are zero
    r = k // 2
    kernel = np.zeros((MAX_KERNEL, MAX_KERNEL, 1, c), dtype)
    kernel[3 - r : 4 + r, 3 - r : 4 + r, :, :real] = rng.normal(size=(k, k, 1, real))
    g = rng.normal(size=(n, p_out, c)).astype(dtype)
    return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g), p_out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "side", "c", "k", "stride", "real_c"), CASES)
def test_native_conv_and_its_transpose_equal_the_taps(n, side, c, k, stride, real_c, dtype):
    assert depthwise_cpu.available()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    with jax.enable_x64(dtype == np.float64):
        x, kernel, g, p_out = _case(n, side, c, k, stride, real_c, dtype)
        r = k // 2
        centre = kernel[3 - r : 4 + r, 3 - r : 4 + r]
        taps = _taps_branches(stride, p_out)[r - 1]
        want, pullback = jax.vjp(lambda x_: taps((x_,), kernel, jnp.asarray(side)), x)
        (want_dx,) = pullback(g)
        side_ = jnp.asarray(side)
        (got,) = depthwise_cpu.depthwise((x,), centre, side_, (), p_out, 1, stride, False)
        (got_dx,) = depthwise_cpu.depthwise((g,), centre, side_, (x,), x.shape[1], 1, stride, True)
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        # the taps' cotangent reaches padded input rows, which the engine's BatchNorm masks;
        # the native one leaves them zero
        real = side * side
        np.testing.assert_allclose(got_dx[:, :real], want_dx[:, :real], rtol=tol, atol=tol)
        assert not np.any(got_dx[:, real:])


@pytest.mark.parametrize(
    ("side", "stride", "tiles_in", "tiles_out"), [(9, 1, 8, 4), (12, 2, 4, 2), (14, 1, 16, 1)]
)
def test_native_conv_reads_and_writes_tiles(side, stride, tiles_in, tiles_out):
    """Tiles whose ends cut the images' pixel rows give the whole array's result, forward,
    transposed and the kernel's cotangent, to the bit."""
    x, kernel, g, _ = _case(2, side, 32, 5, stride, 32, np.float32)
    p_in = rows_bucket(side * side)
    out_side = -(-side // stride)
    p_out = rows_bucket(out_side * out_side)
    x, g, centre, side_ = x[:, :p_in], g[:, :p_out], kernel[1:6, 1:6], jnp.asarray(side)
    x_tiles, g_tiles = jnp.split(x, tiles_in, axis=1), jnp.split(g, tiles_out, axis=1)
    (whole,) = depthwise_cpu.depthwise((x,), centre, side_, (), p_out, 1, stride, False)
    tiled = depthwise_cpu.depthwise(x_tiles, centre, side_, (), p_out, tiles_out, stride, False)
    assert len(tiled) == tiles_out
    np.testing.assert_array_equal(np.concatenate(tiled, axis=1), whole)
    (whole_dx,) = depthwise_cpu.depthwise((g,), centre, side_, (x,), p_in, 1, stride, True)
    tiled_dx = depthwise_cpu.depthwise(
        g_tiles, centre, side_, x_tiles, p_in, tiles_in, stride, True
    )
    np.testing.assert_array_equal(np.concatenate(tiled_dx, axis=1), whole_dx)
    whole_dk = depthwise_cpu.kernel_cotangent((x,), (g,), centre, side_, stride)
    tiled_dk = depthwise_cpu.kernel_cotangent(x_tiles, g_tiles, centre, side_, stride)
    np.testing.assert_array_equal(tiled_dk, whole_dk)


@pytest.mark.parametrize(("n", "side", "c", "k", "stride", "real_c"), CASES[2:5])
def test_engine_conv_gradients_equal_the_taps(n, side, c, k, stride, real_c):
    """The engine's custom vjp (the native input and kernel cotangents) against autodiff of
    the XLA taps, in float64."""
    with jax.enable_x64(True):
        x, kernel, g, p_out = _case(n, side, c, k, stride, real_c, np.float64)
        geometry = jnp.asarray([side, k // 2])
        taps = _taps_branches(stride, p_out)[k // 2 - 1]

        def loss(conv):
            return lambda x_, k_: jnp.sum(g * jnp.sin(conv(x_, k_)))

        engine = loss(lambda x_, k_: depthwise_strided_rows((x_,), k_, geometry, stride, p_out))
        reference = loss(lambda x_, k_: taps((x_,), k_, jnp.asarray(side)))
        np.testing.assert_allclose(engine(x, kernel), reference(x, kernel), rtol=1e-12)
        got = jax.grad(engine, (0, 1))(x, kernel)
        want = jax.grad(reference, (0, 1))(x, kernel)
        real = side * side
        np.testing.assert_allclose(got[0][:, :real], want[0][:, :real], rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(("n", "side", "c", "k", "stride", "real_c"), CASES)
def test_native_moments_are_the_outputs_over_its_real_rows(n, side, c, k, stride, real_c):
    """The forward's sum and squares about the mean (summed in float64) against NumPy's
    float64 sums of the output's real rows, the same output beside them, and XLA's
    `row_moments` where the native call is switched off."""
    x, kernel, _, p_out = _case(n, side, c, k, stride, real_c, np.float32)
    r, side_ = k // 2, jnp.asarray(side)
    centre = kernel[3 - r : 4 + r, 3 - r : 4 + r]
    (plain,) = depthwise_cpu.depthwise((x,), centre, side_, (), p_out, 1, stride, False)
    y, moments = depthwise_cpu.depthwise((x,), centre, side_, (), p_out, 1, stride, False, True)
    np.testing.assert_array_equal(y, plain)
    real = np.asarray(y, np.float64)[:, : (-(-side // stride)) ** 2].reshape(-1, c)
    want = [real.sum(axis=0), np.square(real - real.mean(axis=0)).sum(axis=0)]
    np.testing.assert_allclose(moments, want, rtol=1e-6, atol=1e-6)
    taps = _taps_branches(stride, p_out)[r - 1]((x,), kernel, side_)
    xla = row_moments(taps, (-(-side // stride)) ** 2)
    np.testing.assert_allclose(xla, want, rtol=1e-4, atol=1e-4)
