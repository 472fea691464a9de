"""Zen-score (Lin et al., "Zen-NAS", ICCV 2021), on its own Gaussian weights and inputs.

Zen-score = log E_x ||f(x) - f(x + gamma eps)||_1 + sum_i log sigma_i, with f the features
before global pooling, x and eps standard Gaussian, gamma = 0.01, every conv and linear
weight drawn N(0, 1) (BatchNorm scale 1, bias 0, linear bias 0), and sigma_i the root mean
over channels of BatchNorm i's batch variance. Variant: sigma_i comes from the batch
statistics of the forward pass on x, the quantity the paper defines (the paper's code reads
BatchNorm running variances, which after one momentum-0.1 update mostly hold their
initial value 1); a BatchNorm whose input is constant (a conv reading an all-zero node,
which Zen-NAS's spaces never have) is left out rather than adding log 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from wrcor_jax.layers import fill_tree, unit_affine
from wrcor_jax.spaces.nb201 import param_shapes

MIXUP_GAMMA = 0.01


def gaussian_params(shapes: Mapping, seed: int) -> dict:
    """A parameter tree shaped like `shapes` with Zen-NAS's Gaussian initialisation (every
    `kernel` N(0, 1), BatchNorm scale 1, every bias 0), as NumPy float32."""
    rng = np.random.default_rng([seed, 1])

    def leaf(name: str, node: Mapping) -> np.ndarray:
        shape = tuple(node[name].shape)
        if name == "kernel":
            return rng.standard_normal(shape).astype(np.float32)
        return unit_affine(name, shape)

    return fill_tree(shapes, leaf)


def zen_params(seed: int, num_classes: int) -> dict:
    """The NB201 supernet's tree with Zen-NAS's Gaussian initialisation."""
    return gaussian_params(param_shapes(num_classes), seed)


def zen_inputs(seed: int, images_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs x and x + 0.01 eps of shape `images_shape` (NB201: the scoring
    batch's)."""
    rng = np.random.default_rng([seed, 2])
    x = rng.standard_normal(images_shape).astype(np.float32)
    eps = rng.standard_normal(images_shape).astype(np.float32)
    return x, x + np.float32(MIXUP_GAMMA) * eps


def zen(measured: tuple[float, float], params: dict) -> float:
    """log(delta) + sum of log sigma from the `zen` measurement."""
    delta, log_std = measured
    with np.errstate(divide="ignore"):
        return float(np.log(np.float64(delta)) + log_std)
