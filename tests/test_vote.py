"""Hard and soft votes on hand-made score matrices (SPEC section 5)."""

import math

import numpy as np
import pytest

from wrcor_jax.vote import (
    VoteColumn,
    hard_vote_compare,
    hard_vote_ranks,
    parse_columns,
    soft_vote,
    vote_scores,
    zscores,
)

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


def test_hard_vote_ranks_match_a_sort_with_hard_vote_compare():
    import functools

    rng = np.random.default_rng(0)
    matrix = np.round(rng.normal(size=(300, 3)), 1)  # ties
    matrix[rng.random(matrix.shape) < 0.05] = NAN
    matrix[rng.random(matrix.shape) < 0.05] = -INF
    signs = [1, -1, 1]
    order = sorted(
        range(len(matrix)),
        key=functools.cmp_to_key(lambda i, j: hard_vote_compare(matrix[i], matrix[j], signs)),
    )
    np.testing.assert_array_equal(np.argsort(hard_vote_ranks(matrix, signs)), order)


# --------------------------------------------------------------------------- vote columns

KNOWN = ("wrcor", "wrcor_clean", "act_cor", "act_grad_cor")


def test_parse_columns_base_proxies_then_what_the_votes_need():
    base, votes = parse_columns(
        "act_cor, vote(wrcor,act_cor, act_grad_cor),softvote(wrcor_clean,wrcor)", KNOWN
    )
    assert base == ["act_cor", "wrcor", "act_grad_cor", "wrcor_clean"]
    assert [v.name for v in votes] == [
        "vote(wrcor,act_cor,act_grad_cor)",
        "softvote(wrcor_clean,wrcor)",
    ]
    assert votes[0] == VoteColumn(
        "vote(wrcor,act_cor,act_grad_cor)", "vote", ("wrcor", "act_cor", "act_grad_cor"), (1, 1, 1)
    )
    assert votes[1].kind == "softvote" and votes[1].proxies == ("wrcor_clean", "wrcor")
    assert parse_columns("wrcor,act_cor,", KNOWN) == (["wrcor", "act_cor"], [])


def test_parse_columns_signs():
    _, (vote,) = parse_columns("vote(wrcor,act_cor)", KNOWN, signs={"act_cor": -1})
    assert vote.signs == (1, -1)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        parse_columns("wrcor", KNOWN, signs={"wrcor": 2})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrcor,zz", "unknown proxy 'zz'; known proxies: wrcor, "),
        ("vote(wrcor,zz,act_cor)", "unknown proxy 'zz' in 'vote(wrcor,zz,act_cor)'"),
        ("vote(wrcor,,act_cor)", "unknown proxy '' in"),
        ("hardvote(wrcor,act_cor)", "unknown vote 'hardvote'"),
        ("vote(wrcor)", "at least two proxies"),
        ("vote(wrcor,wrcor)", "proxy listed twice"),
        ("vote(wrcor,act_cor", "unbalanced parentheses"),
        ("wrcor),act_cor", "unbalanced parentheses"),
        ("vote(wrcor,vote(act_cor,wrcor))", "nested parentheses"),
        ("vote(wrcor,act_cor)x", "cannot read column"),
        ("wrcor,wrcor", "'wrcor' listed twice"),
        ("vote(wrcor,act_cor),vote(wrcor, act_cor)", "listed twice"),
        (" , ", "no proxy given"),
    ],
)
def test_parse_columns_errors_are_one_line(text, message):
    with pytest.raises(ValueError) as error:
        parse_columns(text, KNOWN)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_vote_scores_on_a_synthetic_table():
    proxies = ["wrcor", "act_cor", "act_grad_cor"]
    table = np.array([[3.0, 1, 1], [1, 3, 3], [2, 2, 2], [NAN, NAN, NAN], [-INF, 0, 0]])
    _, votes = parse_columns("vote(wrcor,act_cor,act_grad_cor),softvote(act_cor,wrcor)", proxies)
    got = vote_scores(votes, proxies, table)
    # Hard vote: row 1 beats row 2 on two proxies, row 2 beats row 0, all beat the NaN row.
    np.testing.assert_array_equal(got["vote(wrcor,act_cor,act_grad_cor)"], [2, 4, 3, 0, 1])
    expected = soft_vote(table[:, [1, 0]])
    np.testing.assert_allclose(got["softvote(act_cor,wrcor)"], expected)
    assert math.isnan(expected[3]) and np.isfinite(expected[4])  # -inf skipped, act_cor kept
    with pytest.raises(ValueError, match="'act_grad_cor'"):
        vote_scores(votes, ["wrcor", "act_cor"], table[:, :2])
