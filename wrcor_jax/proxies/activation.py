"""Proxies of a forward pass or an input Jacobian: naswot, meco, jacob_cov (SPEC 4).

The heavy part (binary codes, per-map eigenvalues, the Jacobian) is computed on device by
`wrcor_jax.spaces.nb201_measures`; these finish in float64 on the host.
"""

from __future__ import annotations

import numpy as np

JACOB_COV_EPS = 1e-5


def naswot(measured: tuple[np.ndarray, float], params: dict) -> float:
    """NASWOT (Mellor et al., ICML 2021), the reference's `act_hamming`: log|det K_H| with
    K_H = sum over forward sites of c c^T + (1-c)(1-c)^T, c = (activation > 0)."""
    return float(np.linalg.slogdet(measured[0].astype(np.float64))[1])


def meco(measured: tuple[np.ndarray, float], params: dict) -> float:
    """MeCo (Jiang et al., NeurIPS 2023): sum over feature maps of the smallest eigenvalue of
    the channel correlation matrix of one sample (the first of the batch). Variant: the maps
    are the stem, every edge's op, each reduction conv, every cell and the final BN-ReLU,
    i.e. the NB201 modules' outputs (not every torch submodule the paper's code hooks)."""
    return measured[1]


def jacob_cov(jacobian: np.ndarray, params: dict) -> float:
    """Jacobian covariance (Mellor et al., 2020 v1): -sum(log(v + k) + 1/(v + k)) over the
    eigenvalues v of corrcoef of the per-image input gradients of the summed logits.
    NaN when some image's gradient is constant (an output that ignores the input), where
    the reference's eigen-solver fails and it records NaN."""
    rows = jacobian.reshape(jacobian.shape[0], -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(rows)
    if not np.all(np.isfinite(corr)):
        return float("nan")
    v = np.linalg.eigvalsh(corr)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(-np.sum(np.log(v + JACOB_COV_EPS) + 1.0 / (v + JACOB_COV_EPS)))
