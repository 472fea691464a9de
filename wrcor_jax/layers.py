"""Pure functional layers shared by the Flax modules and the response engines.

Conventions are Flax's (NHWC activations, HWIO kernels); the numerics are PyTorch's, because
the published zero-shot numbers came from PyTorch networks: BatchNorm always normalises with
the current batch's biased variance (training mode, eps 1e-5 unless given), average pools
exclude padded cells, and weights start from PyTorch's default uniform initialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-5


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Convolution with PyTorch's symmetric padding of kernel_size // 2 and no bias."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def batch_norm(y: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = BN_EPS) -> jax.Array:
    """Training-mode BatchNorm over (N, H, W) with the biased variance, as torch computes it."""
    axes = tuple(range(y.ndim - 1))
    mean = jnp.mean(y, axis=axes)
    var = jnp.mean(jnp.square(y - mean), axis=axes)
    return (y - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _pool_counts(size: int) -> np.ndarray:
    """How many unpadded cells each output of a 3-wide, stride-1, pad-1 window covers."""
    counts = np.full(size, 3.0, np.float32)
    counts[0] = counts[-1] = 2.0 if size > 1 else 1.0
    return counts


def _sum_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 window sums with zero padding 1, as separable sums of shifted slices (XLA:CPU's
    reduce_window was ~3x slower here). Being symmetric, it is its own adjoint."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]


def _pool_divisor(x: jax.Array) -> np.ndarray:
    """Unpadded cells under each window, a NumPy constant built at trace time: pooling a
    constant inside jit is constant-folded by XLA at great compile-time cost (FINDINGS.md)."""
    _, h, w, _ = x.shape
    return np.outer(_pool_counts(h), _pool_counts(w))[None, :, :, None]


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, padded cells not counted (count_include_pad=False)."""
    return _sum_pool_3x3(x) / _pool_divisor(x)


def avg_pool_3x3_transpose(cotangent: jax.Array) -> jax.Array:
    """The adjoint of `avg_pool_3x3` (its backward): sum-pool the cotangent over divisors."""
    return _sum_pool_3x3(cotangent / _pool_divisor(cotangent))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pool with stride 2 (the reduction cell's shortcut)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def fill_tree(shapes: Mapping, leaf: Callable[[str, Mapping], np.ndarray]) -> dict:
    """A tree shaped like `shapes` whose every leaf is `leaf(name, parent node)`, made in
    sorted-path order, so a seeded sampler fills it reproducibly."""
    return {
        name: fill_tree(child, leaf) if isinstance(child, Mapping) else leaf(name, shapes)
        for name, child in sorted(shapes.items())
    }


def unit_affine(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """BatchNorm's initial `scale` (ones); any other non-kernel leaf (a bias) is zeros."""
    return np.full(shape, 1.0 if name == "scale" else 0.0, np.float32)


def torch_default_init(seed: int, shapes: Mapping) -> dict:
    """Initialise a parameter tree as PyTorch's defaults would, on the host with NumPy.

    Conv and linear weights (`kernel`, HWIO or in x out) and linear biases (`bias` beside a
    `kernel` and no `scale`) ~ Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm `scale`
    is 1 and its `bias` 0. Leaves are drawn in sorted-path order from one PCG64 stream.
    NumPy, not jax.random: a jitted initialiser of ~190 leaves took 9-130 s to compile on
    XLA:CPU (threefry fused into every slice); NumPy draws the 1.7M NB201 values in ~10 ms.
    """
    rng = np.random.default_rng(seed)

    def leaf(name: str, node: Mapping) -> np.ndarray:
        shape = tuple(node[name].shape)
        if name == "kernel" or ("kernel" in node and "scale" not in node):
            bound = 1.0 / np.sqrt(np.prod(node["kernel"].shape[:-1]))
            return rng.uniform(-bound, bound, shape).astype(np.float32)
        return unit_affine(name, shape)

    return fill_tree(shapes, leaf)
