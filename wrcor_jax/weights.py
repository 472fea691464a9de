"""Linen modules that only declare weights, drawn as PyTorch's defaults would draw them.

The maths lives in `wrcor_jax.layers` as pure functions of (weights, x), so one parameter
tree serves a space's Flax network and the engines that compose compiled pieces at run
time. A bias-free conv and its BatchNorm share one node `{kernel, scale, bias}`.
"""

from __future__ import annotations

import flax.linen as nn

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PyTorch's default conv/linear weight init: Uniform(+-1/sqrt(fan_in)) for HWIO kernels."""


def declare_conv_weights(
    module: nn.Module, features: int, kernel_size: int, in_features: int, batch_norm: bool = True
) -> dict:
    """Declare on `module` the `kernel` of a bias-free conv (+ `scale`, `bias` of its BN)."""
    k = kernel_size
    weights = {"kernel": module.param("kernel", torch_kernel_init, (k, k, in_features, features))}
    if batch_norm:
        weights |= declare_batch_norm(module, features)
    return weights


def declare_batch_norm(module: nn.Module, features: int) -> dict:
    """Declare on `module` an affine BatchNorm's `scale` (ones) and `bias` (zeros)."""
    return {
        "scale": module.param("scale", nn.initializers.ones, (features,)),
        "bias": module.param("bias", nn.initializers.zeros, (features,)),
    }


class BatchNormWeights(nn.Module):
    """Parameters of an affine BatchNorm on its own (the head's)."""

    features: int

    @nn.compact
    def __call__(self) -> dict:
        return declare_batch_norm(self, self.features)


class ConvWeights(nn.Module):
    """Parameters of a bias-free conv (with an affine BatchNorm's when `batch_norm`)."""

    features: int
    kernel_size: int
    batch_norm: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> dict:
        return declare_conv_weights(
            self, self.features, self.kernel_size, in_features, self.batch_norm
        )
