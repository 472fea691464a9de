"""Gradient-based proxies: snip, grad_norm, synflow (SPEC 4) and ZiCo.

Each reads gradients of an architecture's used weights (the trees `used_params` keeps) and
sums over the conv and linear weights (the `kernel` leaves); biases and BatchNorm
parameters do not count, as in the zero-cost-proxy reference code.
"""

from __future__ import annotations

import jax
import numpy as np


def kernels(tree: dict) -> list[np.ndarray]:
    """The conv and linear weights of a parameter (or gradient) tree, in a fixed order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [np.asarray(leaf, np.float64) for path, leaf in leaves if path[-1].key == "kernel"]


def _pairs(params: dict, grads: dict) -> zip:
    return zip(kernels(params), kernels(grads), strict=True)


def snip(grads: dict, params: dict) -> float:
    """SNIP (Lee et al., ICLR 2019) as a proxy: sum |theta * dL/dtheta|."""
    return float(sum(np.abs(w * g).sum() for w, g in _pairs(params, grads)))


def grad_norm(grads: dict, params: dict) -> float:
    """Sum over layers of the Frobenius norm of dL/dW."""
    return float(sum(np.linalg.norm(g) for g in kernels(grads)))


def synflow(grads: dict, params: dict) -> float:
    """SynFlow (Tanaka et al., NeurIPS 2020): sum |theta * dR/dtheta| with theta -> |theta|,
    BatchNorm removed, R the summed output for an all-ones image; float64 throughout."""
    return float(sum(np.abs(np.abs(w) * g).sum() for w, g in _pairs(params, grads)))


def zico(half_grads: dict, params: dict) -> float:
    """ZiCo (Li et al., ICLR 2023): sum over layers of log(sum_theta mean|g| / std(g)), the
    statistics taken over batches. Variant: the scoring batch split into two halves serves
    as the two batches (the paper's code draws separate batches); entries with zero std are
    left out and a layer whose sum is 0 adds nothing, as in the paper's code."""
    score = 0.0
    for g in kernels(half_grads):
        g = g.reshape(g.shape[0], -1)
        std, mean_abs = g.std(axis=0), np.abs(g).mean(axis=0)
        nonzero = std != 0
        total = (mean_abs[nonzero] / std[nonzero]).sum()
        if total != 0:
            score += float(np.log(total))
    return score
