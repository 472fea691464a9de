"""WRCor and its variants as weightings of per-(block, kind) response sums (SPEC 3).

A site set says how many times each kind of response counts, in the cells and in the final
block (NB201) or in every block alike (MobileNetV2, no final block). `reference` reproduces
the hooks of the paper's code (what produced the published numbers); `clean` is the documented
intent (each ReLU once: its input and the gradient at its input). `mbv2_reference` and
`mbv2_allrelu` are their MobileNetV2 counterparts (SPEC 3b). WRCor weights block i by 2^i;
act_cor and act_grad_cor weight every term 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wrcor_jax.responses import SiteSums

FORWARD_KINDS = frozenset({"act", "act_out", "block_act"})


@dataclasses.dataclass(frozen=True)
class SiteSet:
    """Multiplicity of each kind of response in the cells and in the final block; with
    `final` None, every block counts as a cell (a space without a special last block)."""

    cells: dict[str, int]
    final: dict[str, int] | None = None

    def multiplicities(self, num_blocks: int, forward_only: bool = False) -> dict[str, np.ndarray]:
        """kind -> per-block multiplicity (num_blocks,), the last block being the final one."""
        out = {}
        for kind in set(self.cells) | set(self.final or {}):
            if forward_only and kind not in FORWARD_KINDS:
                continue
            m = np.full(num_blocks, self.cells.get(kind, 0), np.float64)
            if self.final is not None:
                m[-1] = self.final.get(kind, 0)
            out[kind] = m
        return out


SITE_SETS = {
    # The reference hooks every module whose class name contains "ReLU": a conv op's nn.ReLU
    # and its ReLUConvBN wrapper both see the op's input (counted twice); the ReLU's backward
    # hook gives the gradient at its input, the wrapper's old-style hook the gradient at its
    # last op (BatchNorm) input. The final ReLU runs in place: its forward hook sees the output.
    "reference": SiteSet(
        cells={"act": 2, "act_grad": 1, "bn_grad": 1}, final={"act_out": 1, "act_grad": 1}
    ),
    "clean": SiteSet(cells={"act": 1, "act_grad": 1}, final={"act": 1, "act_grad": 1}),
    # MobileNetV2: the block ReLUs are the reference's `RELU`, which its hooks skip, so it
    # sees only each SE's nn.ReLU (kinds act, act_grad); allrelu adds every block ReLU.
    "mbv2_reference": SiteSet(cells={"act": 1, "act_grad": 1}),
    "mbv2_allrelu": SiteSet(cells={"act": 1, "act_grad": 1, "block_act": 1, "block_act_grad": 1}),
}


def _site_set(name: str) -> SiteSet:
    if name not in SITE_SETS:
        raise ValueError(f"unknown site set {name!r}; known: {', '.join(SITE_SETS)}")
    return SITE_SETS[name]


def response_kernel(
    sums: SiteSums, site_set: str, depth_weighted: bool, forward_only: bool = False
) -> tuple[np.ndarray, int]:
    """K = sum over terms of weight x |C| (float64), and the number of terms in it."""
    multiplicities = _site_set(site_set).multiplicities(sums.num_blocks, forward_only)
    depth = 2.0 ** np.arange(sums.num_blocks) if depth_weighted else np.ones(sums.num_blocks)
    n = sums.sums["act"].shape[-1]
    kernel, terms = np.zeros((n, n)), 0
    for kind, m in multiplicities.items():
        kernel += np.einsum("b,bij->ij", depth * m, sums.sums[kind])
        terms += int(m @ sums.counts[kind])
    return kernel, terms


def logdet(kernel: np.ndarray) -> float:
    """log|det K| in float64; -inf for K = 0 (no term survived: a disconnected cell)."""
    return float(np.linalg.slogdet(kernel)[1])


def wrcor(sums: SiteSums, site_set: str = "reference") -> float:
    """Weighted response correlation: log|det sum_i 2^i |C_i||, higher is better."""
    return logdet(response_kernel(sums, site_set, depth_weighted=True)[0])


def act_cor(sums: SiteSums, site_set: str = "reference") -> float:
    """Forward responses only, every term weight 1."""
    return logdet(response_kernel(sums, site_set, depth_weighted=False, forward_only=True)[0])


def act_grad_cor(sums: SiteSums, site_set: str = "reference") -> float:
    """Forward and backward responses, every term weight 1."""
    return logdet(response_kernel(sums, site_set, depth_weighted=False)[0])


def mbv2_wrcor(sums: SiteSums) -> float:
    """MobileNetV2 WRCor with the reference's sites, the SE ReLUs (SPEC 3b)."""
    return wrcor(sums, "mbv2_reference")


def mbv2_wrcor_allrelu(sums: SiteSums) -> float:
    """MobileNetV2 WRCor over every ReLU: its input and the gradient at its input."""
    return wrcor(sums, "mbv2_allrelu")


def mbv2_act_cor(sums: SiteSums) -> float:
    """MobileNetV2 act_cor with the reference's sites: the SE ReLU inputs, weight 1 each."""
    return act_cor(sums, "mbv2_reference")
