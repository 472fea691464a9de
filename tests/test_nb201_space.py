"""NB201 encoding, sampling, mutation, enumeration, isomorphism key, parameters, init."""

import csv

import jax
import numpy as np
import pytest
from conftest import BEST_CIFAR10, GROUND_TRUTH, require

from wrcor_jax import layers
from wrcor_jax.spaces import nb201


def test_string_round_trip_over_the_whole_space():
    for ops in nb201.all_archs():
        assert np.array_equal(nb201.parse_arch(nb201.arch_string(ops)), ops)
    assert len({tuple(o) for o in nb201.all_archs()}) == nb201.NUM_ARCHS


def test_best_arch_indices():
    assert nb201.parse_arch(BEST_CIFAR10).tolist() == [3, 3, 3, 1, 3, 2]


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("|nor_conv_3x3~0|+|nor_conv_3x3~0|conv_5x5~1|+|none~0|none~1|none~2|", "unknown op"),
        ("|nor_conv_3x3~0|+|nor_conv_3x3~0|+|none~0|none~1|none~2|", "must have 2 inputs"),
        ("|nor_conv_3x3~0|+|nor_conv_3x3~0|none~1|", "expected 3 nodes"),
        ("|none~0|+|none~0|none~2|+|none~0|none~1|none~2|", "must be op~1"),
        ("|none~0|+none~0|none~1|+|none~0|none~1|none~2|", "must look like"),
        ("|none0|+|none~0|none~1|+|none~0|none~1|none~2|", "must be op~0"),
        ("", "expected 3 nodes"),
    ],
)
def test_malformed_strings_say_what_is_wrong(arch, message):
    with pytest.raises(nb201.ArchError, match=message):
        nb201.parse_arch(arch)


@pytest.mark.parametrize("bad", [np.zeros(5, int), np.full(6, 5), np.zeros(6, float)])
def test_bad_op_arrays_are_rejected(bad):
    with pytest.raises(nb201.ArchError):
        nb201.validate_ops(bad)


def test_sampling_is_seeded_and_uniform():
    a = nb201.sample_archs(np.random.default_rng(3), 5000)
    b = nb201.sample_archs(np.random.default_rng(3), 5000)
    assert np.array_equal(a, b) and a.shape == (5000, 6) and a.dtype == np.int32
    frequencies = np.bincount(a.ravel(), minlength=5) / a.size
    assert np.allclose(frequencies, 0.2, atol=0.02)


def test_mutation_changes_exactly_one_edge_to_a_different_op():
    rng = np.random.default_rng(0)
    for parent in nb201.sample_archs(rng, 200):
        child = nb201.mutate_arch(rng, parent)
        assert (child != parent).sum() == 1
    assert np.array_equal(
        nb201.mutate_arch(np.random.default_rng(1), parent),
        nb201.mutate_arch(np.random.default_rng(1), parent),
    )


def test_enumeration_order_and_isomorphism_key_match_nats_bench():
    with require(GROUND_TRUTH).open() as f:
        rows = list(csv.DictReader(f))
    archs = nb201.all_archs()
    for row in rows:
        ops = archs[int(row["index"])]
        assert nb201.arch_string(ops) == row["arch"]
        assert nb201.isomorphism_key(ops) == row["unique_str"]
    assert len({nb201.isomorphism_key(o) for o in archs}) == 6466


# Hand-derived counts: stem 3*3*3*16 + 2*16 = 464; reduction cells 14,464 and 57,600 (two
# 3x3 ReLUConvBN + 1x1 shortcut); head BN 128 + linear 64*10 + 10 = 778: fixed 73,306.
# A 3x3 conv op on one edge in all 15 cells: 5 * (9*16^2+32 + 9*32^2+64 + 9*64^2+128) =
# 243,040; a 1x1 conv op: 5 * (16^2+32 + 32^2+64 + 64^2+128) = 28,000; others have none.
@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", 73_306),
        ("|skip_connect~0|+|avg_pool_3x3~0|none~1|+|skip_connect~0|none~1|none~2|", 73_306),
        ("|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|none~2|", 73_306 + 28_000),
        (BEST_CIFAR10, 73_306 + 4 * 243_040 + 28_000),
        (
            "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+"
            "|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
            73_306 + 6 * 243_040,
        ),
    ],
)
def test_parameter_counts_equal_hand_derived_counts(arch, expected):
    params = nb201.init_params(0, 10)
    assert nb201.count_params(params, nb201.parse_arch(arch)) == expected


def test_init_matches_pytorch_default_uniform():
    params = nb201.init_params(7, 10)
    kernel = params["cell_16"]["edge_3_2"]["nor_conv_3x3"]["kernel"]  # fan_in 9*64 = 576
    bound = 1 / np.sqrt(576)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    assert abs(kernel.mean()) < 0.02 * bound
    assert np.isclose(kernel.var(), bound**2 / 3, rtol=0.03)
    stem = params["stem"]["kernel"]  # fan_in 27
    assert np.abs(stem).max() <= 1 / np.sqrt(27)
    head = params["head"]
    assert np.abs(head["classifier"]["bias"]).max() <= 1 / 8
    assert np.all(head["classifier"]["bias"] != 0)
    assert np.all(head["bn"]["scale"] == 1) and np.all(head["bn"]["bias"] == 0)
    assert np.all(params["cell_00"]["edge_1_0"]["nor_conv_1x1"]["scale"] == 1)
    assert not np.array_equal(
        kernel, nb201.init_params(8, 10)["cell_16"]["edge_3_2"]["nor_conv_3x3"]["kernel"]
    )


def test_flax_initialisers_use_the_same_bound():
    kernel = nb201.torch_kernel_init(jax.random.key(0), (3, 3, 64, 64))
    bound = 1 / np.sqrt(576)
    assert float(abs(kernel).max()) <= bound
    assert np.isclose(float(kernel.var()), bound**2 / 3, rtol=0.05)


def test_fast_init_has_the_flax_init_tree():
    shapes = nb201.param_shapes(10)
    assert jax.tree.structure(shapes) == jax.tree.structure(nb201.init_params(0, 10))
    for a, b in zip(
        jax.tree.leaves(shapes), jax.tree.leaves(nb201.init_params(0, 10)), strict=True
    ):
        assert a.shape == b.shape


def test_pool_transpose_is_the_vjp_of_the_pool():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    (expected,) = jax.vjp(layers.avg_pool_3x3, x)[1](cotangent)
    np.testing.assert_allclose(layers.avg_pool_3x3_transpose(cotangent), expected, rtol=1e-5)


def test_pool_excludes_padded_cells():
    x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    pooled = np.asarray(layers.avg_pool_3x3(x))
    assert pooled[0, 0, 0, 0] == x[0, :2, :2, 0].mean()
    assert pooled[1, 2, 1, 0] == pytest.approx(x[1, 1:4, 0:3, 0].mean())
