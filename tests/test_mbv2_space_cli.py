"""The MobileNetV2 space through the CLI: describe (SPEC 8's numbers), the search ranges and
FLOPs limit, and `score` / `search` with the proxies it has so far (params, flops)."""

import csv
import json

import pytest

from wrcor_jax.cli import main
from wrcor_jax.spaces import get_space
from wrcor_jax.spaces.mbv2.arch import EA_OUR_VOTE, EA_OUR_VOTE_600M, MOBILENET_V2


@pytest.mark.parametrize(
    ("arch", "mflops", "mparams"),
    [(EA_OUR_VOTE, 1658.3, 8.504), (EA_OUR_VOTE_600M, 591.7, 10.807), (MOBILENET_V2, 277.0, 4.466)],
)
def test_describe_gives_spec_8_numbers(capsys, arch, mflops, mparams):
    assert main(["describe", "--space", "mbv2", "--arch", arch, "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["arch"] == arch and described["num_classes"] == 1000
    assert isinstance(described["flops"], int) and isinstance(described["params"], int)
    assert round(described["flops"] / 1e6, 1) == mflops
    assert round(described["params"] / 1e6, 3) == mparams
    assert sum(b["flops"] for b in described["blocks"]) == described["flops"]
    assert main(["describe", "--space", "mbv2", "--arch", arch]) == 0  # the table
    assert f"{mflops:.1f}M FLOPs" in capsys.readouterr().out


def test_describe_other_class_counts(capsys):
    assert main(["describe", "--space", "mbv2", "--arch", MOBILENET_V2, "--num-classes", "10"]) == 0
    assert "10 classes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (MOBILENET_V2.removesuffix("@224"), "missing '@<resolution>'"),
        (MOBILENET_V2.replace("(32,16,1,32,1)", "(32,16,1,32)"), "takes 5 arguments"),
        (MOBILENET_V2.replace("(16,24,2", "(17,24,2"), "does not match"),
        (MOBILENET_V2.replace("SuperResIDWE1K3", "SuperResIDWE3K3"), "expansion must be"),
        (MOBILENET_V2.replace("SuperConvK3", "SuperConvQ3"), "unknown block"),
        (MOBILENET_V2.replace("(96,160,2", "(96,160,3"), "stride must be 1 or 2"),
        (MOBILENET_V2.replace("@224", "@100"), "odd resolution"),
    ],
)
def test_malformed_arch_is_one_line_error(capsys, arch, message):
    assert main(["describe", "--space", "mbv2", "--arch", arch]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_check_ranges(capsys):
    assert main(["describe", "--space", "mbv2", "--arch", EA_OUR_VOTE_600M, "--check-ranges"]) == 0
    capsys.readouterr()
    assert main(["describe", "--space", "mbv2", "--arch", EA_OUR_VOTE, "--check-ranges"]) == 1
    assert "over the limit of 600,000,000" in capsys.readouterr().err
    command = ["describe", "--space", "mbv2", "--arch", EA_OUR_VOTE, "--check-ranges"]
    assert main([*command, "--flops-limit", "2G"]) == 0
    capsys.readouterr()
    assert main(["describe", "--space", "mbv2", "--arch", MOBILENET_V2, "--check-ranges"]) == 0
    small = MOBILENET_V2.replace("@224", "@160")
    assert main(["describe", "--space", "mbv2", "--arch", small, "--check-ranges"]) == 1
    assert "outside the mbv2 search space" in capsys.readouterr().err


def test_score_sample_under_a_flops_limit(tmp_path):
    out = tmp_path / "scores.csv"
    command = ["score", "--space", "mbv2", "--sample", "6", "--flops-limit", "400M"]
    assert main([*command, "--proxies", "params,flops", "--quiet", "--out", str(out)]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    space = get_space("mbv2")
    assert len({r["arch"] for r in rows}) == 6
    for row in rows:
        arch = space.parse(row["arch"])
        assert space.format(arch) == row["arch"] and space.search_problems(arch) == []
        assert 0 < float(row["flops"]) <= 400e6
        assert float(row["params"]) == space.describe(arch, 1000)["params"]


def test_score_without_its_engine_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "scores.csv"
    command = ["score", "--space", "mbv2", "--sample", "2", "--proxies", "wrcor"]
    assert main([*command, "--quiet", "--out", str(out)]) == 1
    assert "scores only params, flops so far" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("algo", ["evolution", "reinforce"])
def test_search_keeps_to_the_flops_limit(tmp_path, capsys, algo):
    out = tmp_path / algo
    command = ["search", "--space", "mbv2", "--algo", algo, "--proxies", "params", "--quiet"]
    command += ["--budget", "120", "--flops-limit", "300M", "--out", str(out)]
    assert main(command) == 0
    result = json.loads(capsys.readouterr().out)
    with (out / "history.csv").open(newline="") as f:
        history = list(csv.DictReader(f))
    space = get_space("mbv2", flops_limit=300_000_000)
    assert all(space.search_problems(space.parse(r["arch"])) == [] for r in history)
    assert float(result["best_scores"][0]) == max(float(r["params"]) for r in history)
