"""The Space seam: a space that lives in the tests only (`tiny_space`) runs through `score`,
`search` and `describe` with one registry line and nothing else, and NB201 keeps its
behaviour behind the seam."""

import csv
import json

import numpy as np
import pytest

from wrcor_jax import spaces
from wrcor_jax.cli import main, parse_count
from wrcor_jax.spaces import ArchError, get_space, nb201

LIMIT = 170_000  # FLOPs: rules out about half the tiny stacks, so the searches meet it


@pytest.fixture
def tiny(monkeypatch):
    """Register the tiny space: the one line a new space needs."""
    monkeypatch.setitem(spaces.SPACES, "tiny", "tiny_space:TinySpace")
    return get_space("tiny", flops_limit=LIMIT)


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_space_scores_through_the_cli(tiny, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    command = ["score", "--space", "tiny", "--sample", "12", "--sample-seed", "3", "--quiet"]
    command += ["--proxies", "params,flops,vote(params,flops)", "--out", str(out)]
    assert main(command) == 0
    scored = rows(out)
    assert len({r["arch"] for r in scored}) == 12
    for row in scored:
        cost = tiny.describe(tiny.parse(row["arch"]), 10)
        assert float(row["params"]) == cost["params"]  # counted from the Flax tree
        assert float(row["flops"]) == cost["flops"]
        assert row["vote(params,flops)"] != ""
    assert json.loads((tmp_path / "scores.csv.json").read_text())["space"] == "tiny"
    assert main(command) == 0  # a rerun resumes: nothing left to score
    assert "scored 0 archs (12 already in the file)" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["random", "evolution", "reinforce"])
def test_tiny_space_searches_through_the_cli(tiny, tmp_path, capsys, algo):
    out = tmp_path / algo
    command = ["search", "--space", "tiny", "--algo", algo, "--proxies", "params"]
    command += ["--budget", "130", "--flops-limit", str(LIMIT), "--quiet", "--out", str(out)]
    command += ["--cache-dir", str(tmp_path / "cache")]
    assert main(command) == 0
    result = json.loads(capsys.readouterr().out)
    history = rows(out / "history.csv")
    assert len(history) == 130
    drawn = [tiny.parse(r["arch"]) for r in history]
    assert all(tiny.describe(a, 10)["flops"] <= LIMIT for a in drawn)
    best = max(float(r["params"]) for r in history)
    assert float(result["best_scores"][0]) == best
    assert tiny.describe(tiny.parse(result["best_arch"]), 10)["params"] == best
    if algo == "reinforce":  # one probability row per decision, as long as its choices
        assert [len(row) for row in result["policy"]] == list(tiny.choices())
    assert main(command) == 0  # resumes from its history: the same result
    assert json.loads(capsys.readouterr().out)["best_arch"] == result["best_arch"]


def test_tiny_space_describes_through_the_cli(tiny, capsys):
    assert main(["describe", "--space", "tiny", "--arch", "tiny:8-16", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described == tiny.describe((8, 16), 10)
    assert main(["describe", "--space", "tiny", "--arch", "tiny:8-17"]) == 1
    assert "widths from" in capsys.readouterr().err


def test_nb201_behind_the_seam_draws_as_before():
    space = get_space("nb201")
    rng = np.random.default_rng(7)
    expected = nb201.all_archs()[rng.choice(nb201.NUM_ARCHS, 5, replace=False)]
    assert space.draw(5, 7) == [nb201.arch_string(o) for o in expected]
    assert np.array_equal(
        space.sample(np.random.default_rng(1), 4), nb201.sample_archs(np.random.default_rng(1), 4)
    )
    assert space.choices() == (5,) * 6
    assert space.canonical(" " + nb201.BEST_CIFAR10 + " ") == nb201.BEST_CIFAR10


def test_nb201_describe_totals_match_the_counters():
    space = get_space("nb201")
    params = nb201.init_params(0, 10)
    for ops in nb201.sample_archs(np.random.default_rng(0), 20):
        described = space.describe(ops, 10)
        assert described["params"] == nb201.count_params(params, ops)
        assert described["flops"] == nb201.count_macs(ops, (1, 32, 32, 3), 10)
        assert len(described["blocks"]) == 1 + nb201.NUM_CELLS + 2


def test_unknown_space_and_options_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="unknown search space 'nb101'"):
        get_space("nb101")
    with pytest.raises(ValueError, match="takes no option flops_limit"):
        get_space("nb201", flops_limit=5)
    arch = nb201.BEST_CIFAR10
    assert main(["describe", "--arch", arch, "--flops-limit", "1M"]) == 1
    assert "takes no option flops_limit" in capsys.readouterr().err
    with pytest.raises(ArchError):
        get_space("nb201").parse("|nor_conv_3x3~0|")


@pytest.mark.parametrize(
    ("text", "value"), [("600M", 600_000_000), ("1.5G", 1_500_000_000), ("6e8", 600_000_000)]
)
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["M", "-5M", "six hundred"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)
