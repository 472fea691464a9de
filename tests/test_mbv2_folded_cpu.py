"""The native expand's folded conv and its backward (`folded_cpu`) against XLA's, in
float32 and float64."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.spaces.mbv2 import folded_cpu

if os.environ.get("WRCOR_JAX_NATIVE") == "0" or not (os.environ.get("CXX") or shutil.which("g++")):
    pytest.skip("native folded conv: switched off or no compiler", allow_module_level=True)

CASES = [  # images, rows, input channels, output channels, real rows, real widths
    (4, 128, 64, 384, 128, None),
    (3, 64, 40, 200, 49, None),  # padded rows, widths no register block divides
    (1, 700, 32, 96, 650, None),  # rows over several parts
    (2, 256, 64, 512, 196, (40, 232)),  # the engine's zero-padded kernel: its block only
]


def _xla(g, z, kernel, bias, mask):
    """The engine's XLA form: masked sums of g (z - bias) and g, and g @ kernel^T (0 on the
    padded rows, as the native call leaves them)."""
    weights = mask.astype(g.dtype)
    sums = jnp.stack([(g * (z - bias) * weights).sum(axis=(0, 1)), (g * weights).sum(axis=(0, 1))])
    return jnp.einsum("npo,io->npi", g, kernel) * weights, sums


def _kernel(rng, ci: int, co: int, widths, dtype) -> jax.Array:
    """A kernel, zero past `widths` (real input, output channels) as the engine pads it."""
    kernel = rng.normal(size=(ci, co)).astype(dtype)
    if widths is not None:
        kernel[widths[0] :] = kernel[:, widths[1] :] = 0
    return jnp.asarray(kernel)


def _assert_close(got: tuple, want: tuple, dtype) -> None:
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for got_part, want_part in zip(got, want, strict=True):
        assert got_part.dtype == dtype and got_part.shape == want_part.shape
        scale = np.abs(want_part).max()
        np.testing.assert_allclose(got_part, want_part, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "r", "ci", "co", "real", "widths"), CASES)
def test_native_folded_conv_equals_the_masked_product(n, r, ci, co, real, widths, dtype):
    assert folded_cpu.available()
    rng = np.random.default_rng(n + r + ci + co)
    with jax.enable_x64(dtype == np.float64):
        mask = (jnp.arange(r) < real)[:, None]
        centred = jnp.asarray(rng.normal(size=(n, r, ci)).astype(dtype)) * mask
        kernel = _kernel(rng, ci, co, widths, dtype)
        bias = jnp.asarray(rng.normal(size=co).astype(dtype))
        got = folded_cpu.folded_conv(centred, kernel, bias, mask)
        wide = [np.asarray(a, np.float64) for a in (centred, kernel, bias)]
        want = (wide[0] @ wide[1] + wide[2]) * np.asarray(mask)
        _assert_close((got,), (want.astype(dtype),), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "r", "ci", "co", "real", "widths"), CASES)
def test_native_folded_conv_cotangent_equals_xla(n, r, ci, co, real, widths, dtype):
    assert folded_cpu.available()
    rng = np.random.default_rng(n + r + ci + co)
    with jax.enable_x64(dtype == np.float64):
        g, z = (jnp.asarray(rng.normal(size=(n, r, co)).astype(dtype)) for _ in range(2))
        kernel = _kernel(rng, ci, co, widths, dtype)
        bias = jnp.asarray(rng.normal(size=co).astype(dtype))
        mask = (jnp.arange(r) < real)[:, None]
        got = folded_cpu.folded_conv_cotangent(g, z, kernel, bias, mask)
        with jax.enable_x64(True):
            want = _xla(*(jnp.asarray(a, np.float64) for a in (g, z, kernel, bias)), mask)
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "r", "ci", "co", "real", "widths"), CASES)
def test_native_cotangent_sums_are_the_cotangent_calls_sums(n, r, ci, co, real, widths, dtype):
    """The sums alone (the depthwise conv's BatchNorm reads them) read only the real rows:
    g and z are not 0 on the others here."""
    del ci, widths
    rng = np.random.default_rng(n + r + co)
    with jax.enable_x64(dtype == np.float64):
        g, z = (jnp.asarray(rng.normal(size=(n, r, co)).astype(dtype)) for _ in range(2))
        bias = jnp.asarray(rng.normal(size=co).astype(dtype))
        mask = (jnp.arange(r) < real)[:, None]
        got = folded_cpu.cotangent_sums(g, z, bias, mask)
        with jax.enable_x64(True):
            wide = (jnp.asarray(a, np.float64) for a in (g, z, jnp.zeros((1, co)), bias))
            _, want = _xla(*wide, mask)
        _assert_close((got,), (want,), dtype)
