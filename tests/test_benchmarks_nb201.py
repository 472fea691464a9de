"""NAS-Bench-201 ground truth and rank correlations (SPEC section 6)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from wrcor_jax.benchmarks import (
    BenchmarkError,
    GroundTruth,
    evaluate_scores,
    load_ground_truth,
    parse_score,
    rank_correlations,
)

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
GROUND_TRUTH = SHARED_DATA / "nb201_test_accuracy.csv"


@pytest.fixture(scope="module")
def ground_truth() -> GroundTruth:
    if not GROUND_TRUTH.exists():
        pytest.skip(f"NAS-Bench-201 ground truth not found at {GROUND_TRUTH}")
    return load_ground_truth(GROUND_TRUTH)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- ground truth


def test_load_real_ground_truth(ground_truth: GroundTruth) -> None:
    assert len(ground_truth) == 15_625
    cifar10 = ground_truth.accuracies("cifar10")
    assert round(float(cifar10.max()), 2) == 94.37
    assert round(float(cifar10.mean()), 2) == 87.06
    assert len({record.unique_str for record in ground_truth.values()}) == 6_466
    assert [record.index for record in ground_truth.values()] == list(range(15_625))
    arch = (
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
        "+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
    )
    record = ground_truth[arch]
    assert record.index == 1
    assert record["cifar10"] == pytest.approx(93.66)
    assert record.accuracy("ImageNet16-120") == pytest.approx(44.0333)


def test_ground_truth_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="ground-truth file not found"):
        load_ground_truth(tmp_path / "missing.csv")


def test_ground_truth_missing_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "gt.csv", ["index", "arch", "cifar10"], [[0, "|a~0|", 90.0]])
    with pytest.raises(BenchmarkError, match="missing column\\(s\\) cifar100, imagenet16_120"):
        load_ground_truth(path)


def test_ground_truth_bad_value_and_duplicates(tmp_path: Path) -> None:
    header = ["index", "arch", "cifar10", "cifar100", "imagenet16_120", "unique_str"]
    path = _write_csv(tmp_path / "bad.csv", header, [[0, "|a~0|", "oops", 1, 2, "u"]])
    with pytest.raises(BenchmarkError, match="line 2: bad value"):
        load_ground_truth(path)
    rows = [[0, "|a~0|", 1, 1, 1, "u"], [1, "|a~0|", 2, 2, 2, "v"]]
    path = _write_csv(tmp_path / "dup.csv", header, rows)
    with pytest.raises(BenchmarkError, match="appears twice"):
        load_ground_truth(path)


# --------------------------------------------------------------------------- correlations


def test_perfect_and_reversed_order() -> None:
    accuracies = [10.0, 20.0, 30.0, 40.0, 50.0]
    same = rank_correlations([1, 2, 3, 4, 5], accuracies)
    assert same == {"kendall": pytest.approx(1.0), "spearman": pytest.approx(1.0), "n": 5}
    reverse = rank_correlations([5, 4, 3, 2, 1], accuracies)
    assert reverse == {"kendall": pytest.approx(-1.0), "spearman": pytest.approx(-1.0), "n": 5}


def test_nan_pairs_are_omitted() -> None:
    nan = math.nan
    result = rank_correlations([1, nan, 3, 4, 2], [1, 2, 3, nan, 5])
    assert result["n"] == 3  # pairs (1, 1), (3, 3), (2, 5)
    expected = stats.kendalltau([1, 3, 2], [1, 3, 5]).statistic
    assert result["kendall"] == pytest.approx(expected)


def test_minus_inf_ranks_lowest() -> None:
    inf = math.inf
    result = rank_correlations([-inf, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0])
    assert result == {"kendall": pytest.approx(1.0), "spearman": pytest.approx(1.0), "n": 4}
    # -inf at the second-best architecture: same as a very low finite score there.
    got = rank_correlations([1.0, 2.0, -inf, 4.0], [1.0, 2.0, 3.0, 4.0])
    low = [1.0, 2.0, -1e9, 4.0]
    assert got["kendall"] == pytest.approx(stats.kendalltau(low, [1, 2, 3, 4]).statistic)
    assert got["spearman"] == pytest.approx(stats.spearmanr(low, [1, 2, 3, 4]).statistic)
    assert not math.isnan(got["spearman"])
    # Several -inf tie with each other at the bottom; +inf ranks highest.
    tied = rank_correlations([-inf, -inf, 5.0, inf], [1.0, 2.0, 3.0, 4.0])
    assert tied["n"] == 4 and tied["spearman"] == pytest.approx(
        stats.spearmanr([0, 0, 5, 6], [1, 2, 3, 4]).statistic
    )


def test_degenerate_inputs() -> None:
    assert math.isnan(rank_correlations([1.0], [2.0])["kendall"])
    constant = rank_correlations([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert constant["n"] == 3 and math.isnan(constant["spearman"])
    with pytest.raises(BenchmarkError, match="3 scores but 2 accuracies"):
        rank_correlations([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    accuracies = rng.normal(80, 5, size=300)
    scores = 0.5 * accuracies + rng.normal(0, 3, size=300)
    scores = np.round(scores, 0)  # ties exercise tau-b
    scores[rng.choice(300, 20, replace=False)] = np.nan
    accuracies[rng.choice(300, 10, replace=False)] = np.nan
    got = rank_correlations(scores, accuracies)
    keep = ~(np.isnan(scores) | np.isnan(accuracies))
    assert got["n"] == int(keep.sum())
    tau = stats.kendalltau(scores[keep], accuracies[keep], variant="b").statistic
    rho = stats.spearmanr(scores[keep], accuracies[keep]).statistic
    assert got["kendall"] == pytest.approx(tau, abs=1e-12)
    assert got["spearman"] == pytest.approx(rho, abs=1e-12)
    omit = stats.kendalltau(scores, accuracies, nan_policy="omit").statistic
    assert got["kendall"] == pytest.approx(omit, abs=1e-12)


# --------------------------------------------------------------------------- score tables


def test_parse_score() -> None:
    assert math.isnan(parse_score("nan"))
    assert parse_score("-inf") == -math.inf
    assert parse_score(" inf ") == math.inf
    assert parse_score("1.5e3") == 1500.0
    assert math.isnan(parse_score(""))
    assert parse_score(2) == 2.0
    with pytest.raises(BenchmarkError, match="not a score"):
        parse_score("high")


def test_evaluate_scores(ground_truth: GroundTruth) -> None:
    archs = list(ground_truth)[:50]
    worst = min(ground_truth[arch].cifar10 for arch in archs)
    rows = []
    for k, arch in enumerate(archs):
        accuracy = ground_truth[arch].cifar10
        rows.append(
            {
                "arch": arch,
                "oracle": repr(accuracy),
                "negated": str(-accuracy),
                "holes": "nan" if k % 5 == 0 else f"{accuracy:.6f}",
                "floor": "-inf" if accuracy == worst else str(accuracy),
            }
        )
    result = evaluate_scores(rows, ground_truth, "cifar10", ["oracle", "negated", "holes", "floor"])
    assert set(result) == {"oracle", "negated", "holes", "floor"}
    assert result["oracle"]["kendall"] == pytest.approx(1.0)
    assert result["oracle"]["spearman"] == pytest.approx(1.0)
    assert result["oracle"]["n"] == 50
    assert result["negated"]["kendall"] == pytest.approx(-1.0)
    assert result["holes"]["n"] == 40 and result["holes"]["kendall"] == pytest.approx(1.0)
    assert result["floor"]["n"] == 50 and result["floor"]["kendall"] == pytest.approx(1.0)
    other = evaluate_scores(rows, ground_truth, "ImageNet16-120", ["oracle"])["oracle"]
    assert other["n"] == 50 and other["kendall"] < 1.0


def test_evaluate_scores_errors(ground_truth: GroundTruth) -> None:
    arch = next(iter(ground_truth))
    with pytest.raises(BenchmarkError, match="not in the ground truth"):
        evaluate_scores([{"arch": "|bogus~0|", "s": "1"}], ground_truth, "cifar10", ["s"])
    with pytest.raises(BenchmarkError, match="has no column 's'"):
        evaluate_scores([{"arch": arch}], ground_truth, "cifar10", ["s"])
    with pytest.raises(BenchmarkError, match="no accuracies for dataset 'imagenet1k'"):
        evaluate_scores([{"arch": arch, "s": "1"}], ground_truth, "imagenet1k", ["s"])
    with pytest.raises(BenchmarkError, match="column 's': not a score"):
        evaluate_scores([{"arch": arch, "s": "x"}], ground_truth, "cifar10", ["s"])
