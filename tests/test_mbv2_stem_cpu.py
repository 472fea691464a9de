"""The native stem conv (`stem_cpu`) computes `layers.conv2d`, and differentiates as it."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.layers import conv2d
from wrcor_jax.spaces.mbv2 import stem_cpu

if os.environ.get("WRCOR_JAX_NATIVE") == "0" or not (os.environ.get("CXX") or shutil.which("g++")):
    pytest.skip("native stem conv: switched off or no compiler", allow_module_level=True)

CASES = [  # images, side, input channels, kernel, output channels, stride
    (2, 9, 3, 3, 40, 2),  # odd side at stride 2; 40 channels: a part-filled vector
    (2, 10, 3, 5, 32, 2),
    (1, 7, 3, 3, 20, 1),
    (2, 8, 3, 7, 72, 2),  # more channels than the registers hold at once
    (2, 11, 4, 3, 48, 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "side", "ci", "k", "co", "stride"), CASES)
def test_native_stem_conv_equals_xla_conv(n, side, ci, k, co, stride, dtype):
    assert stem_cpu.available()
    tol = 1e-6 if dtype == np.float32 else 1e-13
    rng = np.random.default_rng(side + k + co)
    with jax.enable_x64(dtype == np.float64):
        x = jnp.asarray(rng.normal(size=(n, side, side, ci)).astype(dtype))
        kernel = jnp.asarray(rng.normal(size=(k, k, ci, co)).astype(dtype))
        got = stem_cpu.stem_conv(x, kernel, stride)
        with jax.enable_x64(True):
            want = conv2d(jnp.asarray(x, np.float64), jnp.asarray(kernel, np.float64), stride)
            g = jnp.asarray(rng.normal(size=want.shape))
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())

        def loss(conv):
            return lambda x_, k_: jnp.sum(g.astype(dtype) * conv(x_, k_, stride))

        got_d = jax.grad(loss(stem_cpu.stem_conv), (0, 1))(x, kernel)
        want_d = jax.grad(loss(conv2d), (0, 1))(x, kernel)
        for got_part, want_part in zip(got_d, want_d, strict=True):
            np.testing.assert_array_equal(got_part, want_part)  # the same XLA backward


def test_native_calls_refuse_other_types_with_their_name():
    """`ForFloatType` (native_cpu.h) serves float32 and float64 and names the call otherwise."""
    images, kernel = jnp.ones((1, 5, 5, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 8), jnp.bfloat16)
    with pytest.raises(Exception, match="stem conv: float32 or float64 only"):
        jax.block_until_ready(stem_cpu.stem_conv(images, kernel, 1))
