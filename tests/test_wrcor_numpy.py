"""WRCor recomputed in float64 NumPy from captured responses, straight from SPEC 3a.

The responses come from the Flax network (`sow` values, `perturb` gradients) with the
architecture as data; the recomputation uses numpy's corrcoef, the NaN skip rule, the 2^block
weights and the reference multiplicities written out here independently of the library's
site-set tables. The composed engine must agree with it to 1e-4 relative.
"""

import functools

import jax
import numpy as np
import pytest
from conftest import BEST_CIFAR10

from wrcor_jax.proxies import RESPONSE_PROXIES
from wrcor_jax.proxies.wrcor import response_kernel
from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_capture import capture_sites, site_keys

# (multiplicity in normal/reduction cells, in the final block 17) per kind, per SPEC 3a
REFERENCE = {"act": (2, 0), "act_out": (0, 1), "act_grad": (1, 1), "bn_grad": (1, 0)}
CLEAN = {"act": (1, 1), "act_out": (0, 0), "act_grad": (1, 1), "bn_grad": (0, 0)}
FINAL_BLOCK = 17

ARCHS = [
    BEST_CIFAR10,
    # node 1 is all zeros (fed by `none` only) and feeds two conv ops
    "|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|",
    # node 3 disconnected, no conv reads a non-zero node: no term survives, -inf
    "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|none~1|none~2|",
    # node 3 disconnected, but cell 0's conv still sees the stem output: finite
    "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "|skip_connect~0|+|avg_pool_3x3~0|skip_connect~1|+|avg_pool_3x3~0|skip_connect~1|none~2|",
    *(nb201.arch_string(ops) for ops in nb201.sample_archs(np.random.default_rng(2026), 6)),
]


def numpy_score(sites, multiplicities, depth_weighted, forward_only=False):
    """log|det K| and the number of surviving terms, float64 throughout."""
    n = sites[0][3].shape[0]
    kernel, terms = np.zeros((n, n)), 0
    for block, kind, active, response in sites:
        in_cells, in_final = multiplicities[kind]
        count = in_final if block == FINAL_BLOCK else in_cells
        if not active or count == 0 or (forward_only and kind not in ("act", "act_out")):
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(np.asarray(response, np.float64).reshape(n, -1))
        if np.isnan(corr).any():
            continue
        kernel += count * (2.0**block if depth_weighted else 1.0) * np.abs(corr)
        terms += count
    return float(np.linalg.slogdet(kernel)[1]), terms


_capture = jax.jit(functools.partial(capture_sites, num_classes=10))


def captured(params, ops, images, labels):
    """Host copies of every site: (block, kind, used by ops?, response)."""
    values = jax.device_get(_capture(params, ops, images, labels))
    return [(b, k, bool(a), r) for (b, k), (a, r) in zip(site_keys(), values, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_float64_numpy_recomputation(arch, params, small_batch, engine):
    images, labels = small_batch
    ops = nb201.parse_arch(arch)
    sites = captured(params, ops, images, labels)
    expected = {
        "wrcor": numpy_score(sites, REFERENCE, True),
        "wrcor_clean": numpy_score(sites, CLEAN, True),
        "act_cor": numpy_score(sites, REFERENCE, False, forward_only=True),
        "act_grad_cor": numpy_score(sites, REFERENCE, False),
    }
    sums = engine.site_sums(ops, params, images, labels)
    for name, (score, _) in expected.items():
        got = RESPONSE_PROXIES[name](sums)
        if np.isneginf(score):
            assert np.isneginf(got), (name, got)
        else:
            assert got == pytest.approx(score, rel=1e-4), name
    assert response_kernel(sums, "reference", True)[1] == expected["wrcor"][1]
    assert response_kernel(sums, "clean", True)[1] == expected["wrcor_clean"][1]


def test_site_counts_of_the_best_arch(params, small_batch, engine):
    """SPEC 3a: 4 terms per conv op in each of 15 normal cells (5 conv ops), 8 per reduction
    cell, 2 for the final ReLU: 60 x 5 + 18 = 318; clean: 2 per conv op + 2 = 160."""
    sums = engine.site_sums(nb201.parse_arch(BEST_CIFAR10), params, *small_batch)
    assert response_kernel(sums, "reference", True)[1] == 318
    assert response_kernel(sums, "clean", True)[1] == 160
    per_cell = sums.counts["act"][:17] + sums.counts["act_grad"][:17] + sums.counts["bn_grad"][:17]
    assert per_cell.tolist() == [15] * 5 + [6] + [15] * 5 + [6] + [15] * 5
    assert sums.counts["act_out"][17] == 1 and sums.counts["act_grad"][17] == 1


def test_disconnected_arch_scores_minus_infinity(params, small_batch, engine):
    sums = engine.site_sums(nb201.parse_arch(ARCHS[2]), params, *small_batch)
    assert response_kernel(sums, "reference", True)[1] == 0
    assert all(np.isneginf(RESPONSE_PROXIES[name](sums)) for name in RESPONSE_PROXIES)
