"""experiments/mbv2_reference_check.py at toy size: two tiny architectures in a CSV of the
shared sample's columns, WRCor at batch 8; the paper's code too when ZSNAS_WRCOR names a
checkout of kunjing96/ZSNAS-WRCor."""

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import SAMPLE, require

from wrcor_jax.benchmarks import rank_correlations
from wrcor_jax.spaces.mbv2.arch import parse
from wrcor_jax.spaces.mbv2.cost import describe

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TINY = (
    "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,16,1,1)@32",
    "SuperConvK3BNRELU(3,16,1,1)SuperResIDWE2K5(16,16,2,8,2)SuperConvK1BNRELU(16,24,1,1)@32",
)
COLUMNS = ("arch", "flops_1000cls", "params_1000cls", "wrcor_10cls", "synflow_10cls")
COLUMNS += ("jacob_cov_10cls", "seconds_trio")


@pytest.fixture(scope="module")
def experiment():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENTS))  # it imports search_nb201's machine()
        path = EXPERIMENTS / "mbv2_reference_check.py"
        spec = importlib.util.spec_from_file_location("mbv2_reference_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    """Both archs with their true counts but the second's FLOPs off by one; WRCor 1, 2."""
    path = tmp_path / "sample.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for i, text in enumerate(TINY):
            cost = describe(parse(text), 1000)
            writer.writerow([text, cost.flops + i, cost.params, 1.0 + i, 1.0, 1.0, 1.0])
    return path


# 14 s on the 2 idle cores here (45 s beside another job): the engine's compilations
def test_toy_check_reports_ranks_and_counts(experiment, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--out", str(out), "--csv", str(tiny_csv), "--data", str(require(SAMPLE))]
    report = experiment.main([*args, "--proxies", "wrcor", "--batch-size", "8"])
    assert json.loads((out / "report.json").read_text()) == report
    assert report["archs"] == list(TINY) and report["csv_scores"] == [[1.0], [2.0]]
    assert report["cost"]["equal"] == 1 and report["cost"]["of"] == 2
    (mismatch,) = report["cost"]["mismatches"]
    assert mismatch["arch"] == TINY[1] and mismatch["flops"][1] == mismatch["flops"][0] + 1
    scores = [row[0] for row in report["scores"]["wrcor_jax"]]
    assert report["agreement"]["wrcor_jax"] == {"wrcor": rank_correlations(scores, [1.0, 2.0])}
    assert len(report["seconds"]["wrcor_jax"]) == 2
    table = capsys.readouterr().out
    assert table.startswith("| proxy | wrcor_jax vs CSV: Spearman / Kendall |")
    assert "equal the CSV's for 1 of 2 architectures" in table
    assert (out / "table.md").read_text() == table
    again = experiment.main([*args, "--proxies", "wrcor", "--batch-size", "8"])
    assert again["seconds"] == report["seconds"]  # a rerun finds both archs scored


def test_the_vote_needs_all_three(experiment):
    three = ("wrcor", "synflow", "jacob_cov")
    scores = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 0.0]]
    result = experiment.agreement(scores, scores, three)
    assert result["vote"]["spearman"] == pytest.approx(1.0)
    assert "vote" not in experiment.agreement([s[:2] for s in scores], scores, three[:2])


def test_bad_arguments(experiment, tmp_path):
    with pytest.raises(SystemExit):
        experiment.parse_args(["--out", str(tmp_path), "--proxies", "naswot"])
    with pytest.raises(SystemExit):
        experiment.parse_args(["--out", str(tmp_path), "--reference-seeds", "43"])


@pytest.mark.skipif(not os.environ.get("ZSNAS_WRCOR"), reason="ZSNAS_WRCOR (checkout) not set")
def test_paper_code_on_the_same_batch(experiment, tiny_csv):
    """The paper's code reruns the tiny archs; the same seed gives the same scores."""
    batch = experiment.proxy_batch(require(SAMPLE), 8)
    root = Path(os.environ["ZSNAS_WRCOR"])
    score = experiment.paper_code_scorer(root, batch, ["wrcor", "synflow"], 42)
    for text in TINY:
        assert score(parse(text)) == score(parse(text))
