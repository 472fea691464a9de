"""Moving weights between a Flax parameter tree and a PyTorch module: the leaf pairs and
the layouts (HWIO conv kernels <-> OIHW, (in, out) linear kernels <-> (out, in))."""

from __future__ import annotations

import numpy as np
from torch import nn

CONV, LINEAR, VECTOR = "conv", "linear", "vector"  # layouts of a leaf


def bn_pairs(path: tuple[str, ...], bn: nn.BatchNorm2d) -> list:
    """(Flax path, torch parameter, layout) of a BatchNorm's scale and bias under `path`."""
    return [((*path, "scale"), bn.weight, VECTOR), ((*path, "bias"), bn.bias, VECTOR)]


def conv_bn_pairs(path: tuple[str, ...], conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list:
    """The pairs of a bias-free conv and its BatchNorm, sharing one Flax node."""
    return [((*path, "kernel"), conv.weight, CONV), *bn_pairs(path, bn)]


def flax_to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """HWIO conv kernel -> OIHW; (in, out) linear kernel -> (out, in)."""
    if layout == CONV:
        return value.transpose(3, 2, 0, 1)
    return value.T if layout == LINEAR else value


def torch_to_flax_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """OIHW conv weight -> HWIO; (out, in) linear weight -> (in, out)."""
    if layout == CONV:
        return value.transpose(2, 3, 1, 0)
    return value.T if layout == LINEAR else value
