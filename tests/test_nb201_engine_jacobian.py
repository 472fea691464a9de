"""jacob_cov's input Jacobian taken from WRCor's backward pass (`NB201Engine.measure`).

Riding along as the second half of a stacked cotangent must leave WRCor's sums as they are
without it (bit for bit on one machine of this kind; on another, same packages, within
4.8e-7: XLA:CPU compiles for the CPU it runs on, and a stacked cotangent is another
product), and give the Jacobian `nb201_measures` computes on its own forward
pass (float32 summation order apart).
"""

import numpy as np
import pytest
from test_wrcor_numpy import ARCHS

from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_engine import NB201Engine
from wrcor_jax.spaces.nb201_measures import NB201Measurer


@pytest.mark.parametrize("arch", ARCHS[:4] + ARCHS[-2:])
def test_jacobian_rides_along_without_moving_the_sums(engine, params, small_batch, arch):
    ops = nb201.parse_arch(arch)
    alone = engine.measure(ops, params, *small_batch)
    both = engine.measure(ops, params, *small_batch, input_jacobian=True)
    for kind, sums in alone["site_sums"].sums.items():
        np.testing.assert_allclose(both["site_sums"].sums[kind], sums, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(
            both["site_sums"].counts[kind], alone["site_sums"].counts[kind]
        )
    own = NB201Measurer(params, *small_batch).measure("input_jacobian", ops)
    scale = np.abs(own).max()
    assert both["input_jacobian"].shape == own.shape
    assert np.abs(both["input_jacobian"] - own).max() <= 1e-5 * scale


def test_static_per_arch_engine_gives_the_same_jacobian(engine, params, small_batch):
    ops = nb201.parse_arch(ARCHS[0])
    composed = engine.measure(ops, params, *small_batch, input_jacobian=True)["input_jacobian"]
    static = NB201Engine(static_per_arch=True).measure(ops, params, *small_batch, True)
    scale = np.abs(composed).max()
    assert np.abs(static["input_jacobian"] - composed).max() <= 1e-5 * scale
