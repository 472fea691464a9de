"""The vmapped capture engine (the accelerator path) agrees with the composed engine."""

import jax
import numpy as np
import pytest
from conftest import BEST_CIFAR10

from wrcor_jax.proxies import RESPONSE_PROXIES
from wrcor_jax.responses import SiteSums
from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_capture import vmapped_site_sums


@pytest.mark.slow
def test_vmapped_scores_equal_composed_scores(params, small_batch, engine):
    images, labels = small_batch
    archs = np.stack(
        [
            nb201.parse_arch(BEST_CIFAR10),
            nb201.parse_arch("|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|none~0|none~1|none~2|"),
            *nb201.sample_archs(np.random.default_rng(9), 2),
        ]
    )
    sums, counts = jax.device_get(vmapped_site_sums(10)(params, archs, images, labels))
    for i, ops in enumerate(archs):
        vmapped = SiteSums.from_stacked(sums[i], counts[i])
        composed = engine.site_sums(ops, params, images, labels)
        for kind in composed.counts:
            assert np.array_equal(vmapped.counts[kind], composed.counts[kind]), kind
        for name, proxy in RESPONSE_PROXIES.items():
            assert proxy(vmapped) == pytest.approx(proxy(composed), rel=1e-5), name
