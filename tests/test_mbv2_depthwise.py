"""The trainer's depthwise conv (`depthwise_conv2d_taps`) computes the scoring network's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.spaces.mbv2.network import depthwise_conv2d, depthwise_conv2d_taps


@pytest.mark.parametrize(
    ("kernel", "stride", "side"), [(3, 1, 9), (5, 2, 10), (7, 2, 11), (7, 1, 8)]
)
def test_taps_equal_the_grouped_conv(kernel: int, stride: int, side: int) -> None:
    rng = np.random.default_rng(kernel * 10 + side)
    x = rng.normal(size=(2, side, side, 5))
    w = rng.normal(size=(kernel, kernel, 1, 5))
    with jax.enable_x64(True):
        x64, w64 = jnp.asarray(x), jnp.asarray(w)
        want = depthwise_conv2d(x64, w64, stride)
        got = depthwise_conv2d_taps(x64, w64, stride)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

        def loss(conv):
            return lambda x_, w_: jnp.sum(jnp.sin(conv(x_, w_, stride)))

        for a, b in zip(
            jax.grad(loss(depthwise_conv2d), (0, 1))(x64, w64),
            jax.grad(loss(depthwise_conv2d_taps), (0, 1))(x64, w64),
            strict=True,
        ):
            np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-11)
