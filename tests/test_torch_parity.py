"""The JAX engine against the PyTorch reference: same weights, same batch, same scores.

`NB201Engine` computes the responses with hand-written backward pieces and reduces them to
|corrcoef| sums on the spot; `wrcor_jax.torch_ref` runs the reference's module hooks on an
eager PyTorch network. Agreement of all four proxies and of the term counts over a mix of
ordinary, none-heavy and disconnected cells checks the site set as well as the arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="parity with the PyTorch reference needs the optional torch extra"
)

from wrcor_jax.data import load_batch  # noqa: E402
from wrcor_jax.proxies import RESPONSE_PROXIES  # noqa: E402
from wrcor_jax.proxies.wrcor import response_kernel  # noqa: E402
from wrcor_jax.spaces.nb201 import (  # noqa: E402
    BEST_CIFAR10,
    arch_string,
    init_params,
    parse_arch,
    sample_archs,
)
from wrcor_jax.spaces.nb201_engine import NB201Engine  # noqa: E402
from wrcor_jax.torch_ref import torch_scores  # noqa: E402

SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "cifar10_sample.npz"
BEST = BEST_CIFAR10
NUM_CLASSES = 10
BATCH = 16
RTOL = 1e-4
SCORES = ("wrcor", "wrcor_clean", "act_cor", "act_grad_cor")

# Disconnected cells whose every term is skipped: -inf in both frameworks.
MINUS_INF = [
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    # The only conv reads node 1, which nothing feeds: its input is all zeros.
    "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|none~1|none~2|",
]
# Disconnected cells (node 3 unreachable) with a finite score: cell 0's convs see the stem's
# output before the zero cell output silences everything after it.
DISCONNECTED_FINITE = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|none~0|none~1|none~2|",
    "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|none~2|",
]
NONE_HEAVY = [
    "|none~0|+|none~0|none~1|+|nor_conv_3x3~0|none~1|none~2|",
    "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|nor_conv_3x3~2|",
    "|none~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|none~1|none~2|",
    "|none~0|+|nor_conv_1x1~0|none~1|+|none~0|none~1|nor_conv_3x3~2|",
    "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|",
]
UNIFORM = [
    "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|",
    "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|",
    "|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|",
]
ARCHS = [BEST, *MINUS_INF, *DISCONNECTED_FINITE, *NONE_HEAVY, *UNIFORM] + [
    arch_string(ops) for ops in sample_archs(np.random.default_rng(2025), 10)
]


def _relative_difference(ours: float, theirs: float) -> float:
    """|ours - theirs| / |theirs|, 0 where both are -inf (and inf where only one is)."""
    if np.isneginf(ours) and np.isneginf(theirs):
        return 0.0
    return abs(ours - theirs) / abs(theirs)


@pytest.fixture(scope="module")
def scores() -> dict[str, tuple[dict, dict]]:
    """arch -> (JAX scores and term counts, torch reference scores), one batch, one init."""
    if not SAMPLE.exists():
        pytest.skip(f"the CIFAR-10 sample is not at {SAMPLE}")
    images, labels = load_batch("cifar10", BATCH, seed=42, data=SAMPLE)
    params = init_params(42, NUM_CLASSES)
    on_device = jax.device_put(params)
    images_jnp, labels_jnp = jnp.asarray(images), jnp.asarray(labels)
    engine = NB201Engine()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads fight the other jobs on the 2 CPUs
    try:
        out = {}
        for arch in ARCHS:
            sums = engine.site_sums(parse_arch(arch), on_device, images_jnp, labels_jnp)
            ours = {name: RESPONSE_PROXIES[name](sums) for name in SCORES}
            ours["terms"] = response_kernel(sums, "reference", True)[1]
            ours["terms_clean"] = response_kernel(sums, "clean", True)[1]
            out[arch] = ours, torch_scores(arch, params, images, labels, NUM_CLASSES)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_and_term_counts_match_torch(arch, scores):
    ours, theirs = scores[arch]
    assert (ours["terms"], ours["terms_clean"]) == (theirs["terms"], theirs["terms_clean"])
    for name in SCORES:
        assert _relative_difference(ours[name], theirs[name]) <= RTOL, (
            f"{name}: JAX {ours[name]!r} vs torch {theirs[name]!r}"
        )


@pytest.mark.parametrize("arch", MINUS_INF)
def test_disconnected_cells_without_terms_score_minus_inf(arch, scores):
    ours, theirs = scores[arch]
    assert ours["terms"] == theirs["terms"] == 0
    assert all(ours[name] == theirs[name] == -np.inf for name in SCORES)


@pytest.mark.parametrize("arch", DISCONNECTED_FINITE)
def test_disconnected_cells_with_terms_score_finite(arch, scores):
    ours, theirs = scores[arch]
    assert ours["terms"] == theirs["terms"] > 0
    assert all(np.isfinite(ours[name]) and np.isfinite(theirs[name]) for name in SCORES)


def test_parity_summary(scores, capsys):
    """The largest relative difference per proxy over every architecture, printed for the log."""
    assert len(ARCHS) >= 20 and len(set(ARCHS)) == len(ARCHS)
    pairs = list(scores.values())
    worst = {
        name: max(_relative_difference(ours[name], theirs[name]) for ours, theirs in pairs)
        for name in SCORES
    }
    with capsys.disabled():
        print(f"\nJAX vs torch over {len(ARCHS)} archs, batch {BATCH}: max relative difference")
        for name, value in worst.items():
            print(f"  {name:13s} {value:.2e}")
    assert max(worst.values()) <= RTOL
