"""MobileNetV2 WRCor through the Flax capture against the reference's hooks on the PyTorch
twin: same weights, same batch, same scores and term counts (SPEC 3b).

The twin carries the reference's class names, so `torch_ref.wrcor`'s "ReLU"-name matching
hooks exactly the SE's `nn.ReLU` ("reference"); "allrelu" hooks every ReLU. Equal term counts
check the site mapping (SE ReLUs as `act`/`act_grad`, block ReLUs as `block_act`/
`block_act_grad`) and the arithmetic in one go. Widths are narrow and resolutions small;
what remains is one XLA compilation per architecture (~3-6 s on 2 CPUs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch twin needs the optional torch extra")

from wrcor_jax.data import load_batch  # noqa: E402
from wrcor_jax.proxies.wrcor import (  # noqa: E402
    mbv2_act_cor,
    mbv2_wrcor,
    mbv2_wrcor_allrelu,
    response_kernel,
)
from wrcor_jax.responses import KINDS, SiteSums  # noqa: E402
from wrcor_jax.spaces.mbv2.arch import ResBlock, parse  # noqa: E402
from wrcor_jax.spaces.mbv2.capture import site_sums  # noqa: E402
from wrcor_jax.spaces.mbv2.network import init_params  # noqa: E402
from wrcor_jax.torch_ref.wrcor import mbv2_torch_scores  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "cifar10_sample.npz"
NUM_CLASSES = 10
BATCH = 16
# Measured max relative differences over CASES, JAX float32 vs torch float32 (float64):
# wrcor 1.7e-5 (1.7e-5), wrcor_allrelu 1.8e-7 (3.9e-8), act_cor 2.1e-5 (5.0e-5; case "e1k3",
# a log-det of -0.92 from five SE terms, where relative error is largest). 2x the worst case:
RTOL = 1e-4
SCORES = ("wrcor", "wrcor_allrelu", "act_cor")

# Together: conv stems with stride 2 and 1 (two layers), res-block kernels 3/5/7, expansions
# 1/2/4/6, depths 1-3, first sub-blocks with stride 1 and 2, resolutions 32/48/64 (the 32 x 32
# batch kept and upsampled), 9 blocks (weights up to 2^8), widths 8-24.
# Quick: ~3-8 s each (compile included); the two slow ones ~4 s each.
CASES = [
    pytest.param(
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE1K3(8,8,1,8,1)SuperResIDWE6K7(8,16,2,8,2)"
        "SuperConvK1BNRELU(16,24,1,1)@48",
        id="e1k3",
    ),
    pytest.param(
        "SuperConvK5BNRELU(3,16,1,2)SuperResIDWE6K5(16,16,2,8,3)SuperConvK1BNRELU(16,24,1,1)@32",
        id="stem-stride1",
    ),
    pytest.param(
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE4K7(8,12,2,8,1)SuperResIDWE1K5(12,16,1,16,2)"
        "SuperConvK1BNRELU(16,16,1,1)@64",
        id="e4k7",
    ),
    pytest.param(
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE1K3(8,8,1,8,1)SuperResIDWE6K3(8,16,2,8,2)"
        "SuperResIDWE6K5(16,16,2,8,1)SuperResIDWE1K7(16,24,2,16,1)SuperResIDWE6K3(24,24,1,8,1)"
        "SuperResIDWE2K5(24,16,1,16,1)SuperResIDWE6K7(16,24,1,8,1)SuperConvK1BNRELU(24,24,1,1)@32",
        id="nine-blocks",
    ),
    pytest.param(
        "SuperConvK3BNRELU(3,16,2,1)SuperResIDWE2K5(16,8,2,8,2)SuperResIDWE4K3(8,16,1,8,3)"
        "SuperConvK3BNRELU(16,24,2,1)SuperConvK1BNRELU(24,24,1,1)@64",
        id="conv-mid",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "SuperConvK7BNRELU(3,8,2,1)SuperResIDWE6K7(8,24,1,8,3)SuperResIDWE1K3(24,16,2,24,1)"
        "SuperConvK1BNRELU(16,24,1,1)@48",
        id="e6k7-deep",
        marks=pytest.mark.slow,
    ),
]


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    if not SAMPLE.exists():
        pytest.skip(f"the CIFAR-10 sample is not at {SAMPLE}")
    return load_batch("cifar10", BATCH, seed=42, data=SAMPLE)


def _relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs)


@pytest.mark.parametrize("text", CASES)
def test_scores_and_term_counts_match_torch(text, batch):
    images, labels = batch
    arch = parse(text)
    params = init_params(arch, 42, NUM_CLASSES)
    sums = site_sums(arch, params, images, labels, NUM_CLASSES)
    ours = {"wrcor": mbv2_wrcor(sums), "wrcor_allrelu": mbv2_wrcor_allrelu(sums)}
    ours["act_cor"] = mbv2_act_cor(sums)
    ours["terms"] = response_kernel(sums, "mbv2_reference", True)[1]
    ours["terms_allrelu"] = response_kernel(sums, "mbv2_allrelu", True)[1]
    sub_blocks = sum(b.layers for b in arch.blocks if isinstance(b, ResBlock))
    relus = sum(3 * b.layers if isinstance(b, ResBlock) else b.layers for b in arch.blocks)
    assert 0 < ours["terms"] <= 2 * sub_blocks  # an SE term is skipped when its rows are flat
    assert ours["terms"] < ours["terms_allrelu"] <= ours["terms"] + 2 * relus
    for dtype in (torch.float32, torch.float64):
        theirs = mbv2_torch_scores(arch, params, images, labels, NUM_CLASSES, dtype)
        assert (ours["terms"], ours["terms_allrelu"]) == (theirs["terms"], theirs["terms_allrelu"])
        for name in SCORES:
            assert _relative_difference(ours[name], theirs[name]) <= RTOL, (
                f"{name} ({dtype}): JAX {ours[name]!r} vs torch {theirs[name]!r}"
            )


def test_mbv2_site_sets_weight_every_block_alike():
    """No special last block: block i weighs 2^i for every kind, the last one included."""
    blocks, n = 9, 3
    sums = {k: np.zeros((blocks, n, n)) for k in KINDS}
    counts = {k: np.zeros(blocks, np.int64) for k in KINDS}
    for kind in KINDS:
        sums[kind][-1] = np.eye(n)
        counts[kind][-1] = 1
    fake = SiteSums(sums, counts)
    kernel, terms = response_kernel(fake, "mbv2_reference", depth_weighted=True)
    np.testing.assert_array_equal(kernel, 2 * 2.0**8 * np.eye(n))
    assert terms == 2
    kernel, terms = response_kernel(fake, "mbv2_allrelu", depth_weighted=True)
    np.testing.assert_array_equal(kernel, 4 * 2.0**8 * np.eye(n))
    assert terms == 4
