"""Hard and soft votes on hand-made score matrices (SPEC section 5)."""

import math

import numpy as np
import pytest

from wrcor_jax.vote import hard_vote_compare, hard_vote_ranks, soft_vote, zscores

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([3, 2, 1], [1, 1, 2], 1),  # two of three rank a above
        ([1, 1, 2], [3, 2, 1], -1),
        ([3, 1, 1], [1, 3, 1], 0),  # one above, one below, one equal: no majority
        ([2, 2], [1, 3], 0),  # one of two is not more than half
        ([2, 4], [1, 3], 1),
        ([5], [4], 1),  # one proxy: the plain comparison
        ([4], [4], 0),
    ],
)
def test_hard_vote_majority(a, b, expected):
    assert hard_vote_compare(a, b) == expected
    assert hard_vote_compare(b, a) == -expected


def test_hard_vote_signs_flip_a_proxy():
    assert hard_vote_compare([3, 1, 1], [1, 3, 1]) == 0
    assert hard_vote_compare([3, 1, 1], [1, 3, 1], signs=[1, -1, 1]) == 1


def test_nan_never_ranks_above_anything():
    assert hard_vote_compare([NAN], [-INF]) == -1
    assert hard_vote_compare([NAN], [NAN]) == 0
    assert hard_vote_compare([NAN, 5, 5], [1, 1, 1]) == 1  # the other two proxies still win
    assert hard_vote_compare([NAN, NAN, 5], [1, 1, 1]) == -1
    assert hard_vote_compare([-INF, 0], [NAN, 0]) == 0  # above on one of two: no majority


def test_hard_vote_rejects_bad_shapes_and_signs():
    with pytest.raises(ValueError, match="one length"):
        hard_vote_compare([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        hard_vote_compare([1, 2], [2, 1], signs=[1, 2])


def test_hard_vote_ranks_positions_in_ascending_order():
    matrix = np.array([[1.0, 1, 1], [3, 3, 3], [2, 2, 2], [NAN, NAN, NAN]])
    np.testing.assert_array_equal(hard_vote_ranks(matrix), [1, 3, 2, 0])
    np.testing.assert_array_equal(hard_vote_ranks(-matrix, signs=[-1, -1, -1]), [1, 3, 2, 0])


def test_hard_vote_ranks_majority_beats_single_outlier():
    # Row 0 wins wrcor by far but loses the other two proxies to row 1.
    matrix = np.array([[100.0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(hard_vote_ranks(matrix), [0, 1])


def test_hard_vote_ranks_ties_keep_input_order():
    matrix = np.array([[2.0, 1], [1, 2], [0, 0]])  # rows 0 and 1 tie
    np.testing.assert_array_equal(hard_vote_ranks(matrix), [1, 2, 0])


def test_zscores_use_finite_values_only():
    matrix = np.array([[1.0, 10], [2, NAN], [3, 30], [-INF, INF]])
    z = zscores(matrix)
    std0 = math.sqrt(2 / 3)  # population std of 1, 2, 3
    np.testing.assert_allclose(z[:3, 0], [-1 / std0, 0, 1 / std0])
    np.testing.assert_allclose(z[[0, 2], 1], [-1, 1])
    assert z[3, 0] == -INF and z[3, 1] == INF and math.isnan(z[1, 1])


def test_zscores_against_a_reference_and_without_spread():
    reference = np.array([[0.0, 5], [2, 5]])
    z = zscores(np.array([[3.0, 7], [1, -INF]]), reference=reference)
    np.testing.assert_allclose(z, [[2, 0], [0, -INF]])


def test_soft_vote_means_sign_adjusted_zscores_ignoring_non_finite():
    matrix = np.array([[1.0, 3], [2, 2], [3, NAN], [NAN, -INF]])
    vote = soft_vote(matrix, signs=[1, -1])
    std0 = math.sqrt(2 / 3)
    # Proxy 1 (sign -1): values -3, -2 -> z -1, +1; NaN and -inf (now +inf) are ignored.
    np.testing.assert_allclose(vote[:3], [(-1 / std0 - 1) / 2, (0 + 1) / 2, 1 / std0])
    assert math.isnan(vote[3])
