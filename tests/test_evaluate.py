"""`wrcor-jax evaluate`: bootstrap confidence intervals, the JSON and text reports, the plot,
and the note on which batch the scores came from (SPEC section 6)."""

import csv
import json
import math

import numpy as np
import pytest
from conftest import GROUND_TRUTH, require
from scipy import stats

from wrcor_jax import cli
from wrcor_jax.benchmarks import rank_correlations
from wrcor_jax.benchmarks.bootstrap import _average_ranks, _codes, bootstrap_ci
from wrcor_jax.benchmarks.nb201 import load_ground_truth
from wrcor_jax.results import write_meta


def correlated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    accuracies = rng.normal(size=n)
    return np.round(accuracies + rng.normal(size=n), 1), accuracies


# --------------------------------------------------------------------------- bootstrap


def test_vectorised_ranks_average_ties_like_scipy():
    rng = np.random.default_rng(1)
    values = np.round(rng.normal(size=200), 1)
    values[:4] = -math.inf
    codes, distinct = _codes(values)
    picks = rng.integers(0, 200, size=(5, 200))
    ranks = _average_ranks(codes[picks], distinct)
    for row, pick in zip(ranks, picks, strict=True):
        np.testing.assert_allclose(row, stats.rankdata(values[pick]))


def test_intervals_hold_the_estimate_and_shrink_with_more_data():
    widths = {}
    for n in (60, 2000):
        scores, accuracies = correlated(n)
        point = rank_correlations(scores, accuracies)
        ci = bootstrap_ci(scores, accuracies, resamples=300, seed=0)
        for stat in ("kendall", "spearman"):
            lo, hi = ci[f"{stat}_ci"]
            assert -1 <= lo < point[stat] < hi <= 1
            widths[n, stat] = hi - lo
    for stat in ("kendall", "spearman"):
        assert widths[2000, stat] < widths[60, stat] / 3  # ~1/sqrt(n): 5.8x narrower


def test_bootstrap_is_seeded_and_omits_nan_pairs():
    scores, accuracies = correlated(80)
    assert bootstrap_ci(scores, accuracies, 50, seed=3) == bootstrap_ci(
        scores, accuracies, 50, seed=3
    )
    assert bootstrap_ci(scores, accuracies, 50, seed=3) != bootstrap_ci(
        scores, accuracies, 50, seed=4
    )
    holes = scores.copy()
    holes[::4] = math.nan
    keep = ~np.isnan(holes)
    assert bootstrap_ci(holes, accuracies, 50) == bootstrap_ci(scores[keep], accuracies[keep], 50)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, math.nan], [1, 2])["kendall_ci"])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci(scores, accuracies, 0)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def truth():
    return load_ground_truth(require(GROUND_TRUTH))


def write_scores(path, truth, n=60):
    """A score file of the first `n` architectures: a noisy oracle and a vote column."""
    archs = list(truth)[:n]
    rng = np.random.default_rng(0)
    accuracy = np.array([truth[a].cifar10 for a in archs])
    noisy = accuracy + rng.normal(0, 2, n)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arch", "noisy", "vote(noisy,noisy2)"])
        for arch, value, rank in zip(archs, noisy, stats.rankdata(noisy), strict=True):
            writer.writerow([arch, repr(float(value)), repr(float(rank - 1))])
    return path


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def evaluate_args(path, *extra):
    return ["evaluate", path, "--ground-truth", GROUND_TRUTH, "--bootstrap", 200, *extra]


def test_json_report_has_intervals_per_column(tmp_path, capsys, truth):
    path = write_scores(tmp_path / "r.csv", truth)
    code, out, err = run_cli(capsys, *evaluate_args(path, "--json"))
    report = json.loads(out)
    assert code == 0 and set(report) == {"noisy", "vote(noisy,noisy2)"}
    for r in report.values():
        assert set(r) == {"kendall", "spearman", "n", "kendall_ci", "spearman_ci"}
        assert r["n"] == 60 and r["kendall_ci"][0] < r["kendall"] < r["kendall_ci"][1]
        assert r["spearman_ci"][0] < r["spearman"] < r["spearman_ci"][1]
    # The vote column is the rank of "noisy": the same order, the same statistics.
    assert report["noisy"] == report["vote(noisy,noisy2)"]
    assert "not recorded" in err


def test_json_report_writes_undefined_statistics_as_null(tmp_path, capsys, truth):
    path = tmp_path / "r.csv"
    archs = list(truth)[:5]
    path.write_text("arch,constant\n" + "".join(f"{a},1.0\n" for a in archs))
    code, out, _ = run_cli(capsys, *evaluate_args(path, "--json"))
    assert code == 0 and "NaN" not in out
    report = json.loads(out)["constant"]
    assert report["kendall"] is None and report["kendall_ci"] == [None, None]


def test_text_report_shows_intervals_and_the_batch(tmp_path, capsys, truth):
    path = write_scores(tmp_path / "r.csv", truth)
    write_meta(path, {"dataset": "cifar10", "seed": 42, "batch_size": 64})
    code, out, _ = run_cli(capsys, *evaluate_args(path, "--dataset", "cifar10"))
    assert code == 0 and "scores computed on the cifar10 batch (seed 42, 64 images)" in out
    assert "evaluated against" not in out and "200 resamples" in out
    line = next(line for line in out.splitlines() if line.startswith("vote(noisy,noisy2) "))
    assert line.count("[") == 2 and line.split()[-1] == "60"
    code, out, _ = run_cli(capsys, *evaluate_args(path, "--dataset", "ImageNet16-120"))
    assert code == 0
    assert "scores computed on the cifar10 batch (seed 42, 64 images), evaluated against " \
        "imagenet16_120 accuracy" in out  # fmt: skip
    code, out, _ = run_cli(
        capsys, *evaluate_args(path, "--dataset", "cifar100", "--scored-on", "cifar100")
    )
    assert "scores computed on the cifar100 batch" in out and "evaluated against" not in out


def test_unfilled_vote_column_is_reported(tmp_path, capsys, truth):
    path = tmp_path / "r.csv"
    path.write_text(
        'arch,noisy,"vote(noisy,noisy2)"\n' + "".join(f"{a},{i},\n" for i, a in enumerate(truth))
    )
    code, out, _ = run_cli(capsys, *evaluate_args(path, "--bootstrap", 0))
    assert code == 0 and "vote(noisy,noisy2) not filled yet" in out


def test_plot_writes_a_png(tmp_path, capsys, truth):
    path = write_scores(tmp_path / "r.csv", truth)
    plot = tmp_path / "plots" / "ranks.png"
    code, _, _ = run_cli(capsys, *evaluate_args(path, "--bootstrap", 0, "--plot", plot))
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000


def test_negative_bootstrap_is_an_error(tmp_path, capsys, truth):
    path = write_scores(tmp_path / "r.csv", truth)
    code, _, err = run_cli(capsys, *evaluate_args(path, "--bootstrap", -1))
    assert code == 1 and "--bootstrap must be >= 0" in err
