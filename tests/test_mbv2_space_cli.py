"""The MobileNetV2 space through the CLI: describe (SPEC 8's numbers), the search ranges and
FLOPs limit, and `score` / `search` (params, flops, and WRCor and act_cor through the
compile-bounded engine; the other proxies: tests/test_mbv2_proxy_parity.py)."""

import csv
import json
import re

import jax
import pytest
from conftest import SAMPLE, require

from wrcor_jax.cli import main
from wrcor_jax.data import load_batch
from wrcor_jax.proxies.wrcor import mbv2_act_cor, mbv2_wrcor
from wrcor_jax.spaces import get_space
from wrcor_jax.spaces.mbv2.arch import EA_OUR_VOTE, EA_OUR_VOTE_600M, MOBILENET_V2, parse
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.spaces.mbv2.engine import SE_KINDS, MBV2Engine
from wrcor_jax.spaces.mbv2.network import init_params


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


def test_score_sample_under_a_flops_limit(tmp_path, capsys):
    out = tmp_path / "scores.csv"
    command = ["score", "--space", "mbv2", "--sample", "6", "--flops-limit", "400M"]
    assert main([*command, "--proxies", "params,flops", "--quiet", "--out", str(out)]) == 0
    summary = capsys.readouterr().err
    assert "composed engine, " in summary and "native CPU calls" not in summary  # counts only
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    space = get_space("mbv2")
    assert len({r["arch"] for r in rows}) == 6
    for row in rows:
        arch = space.parse(row["arch"])
        assert space.format(arch) == row["arch"] and space.search_problems(arch) == []
        assert 0 < float(row["flops"]) <= 400e6
        assert float(row["params"]) == space.describe(arch, 1000)["params"]


def test_score_of_a_proxy_the_space_lacks_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "scores.csv"
    command = ["score", "--space", "mbv2", "--sample", "2", "--proxies", "wrcor,wrcor_clean"]
    assert main([*command, "--quiet", "--out", str(out)]) == 1
    assert "does not score wrcor_clean" in capsys.readouterr().err
    assert not out.exists()


SMALL = [  # narrow networks of the grammar at CIFAR's size, so the test compiles quickly
    "SuperConvK3BNRELU(3,16,1,1)SuperResIDWE2K5(16,16,2,8,2)SuperConvK1BNRELU(16,24,1,1)@32",
    "SuperConvK3BNRELU(3,8,1,1)SuperResIDWE6K3(8,16,1,8,1)SuperConvK1BNRELU(16,16,1,1)@32",
]


def test_score_wrcor_through_the_cli(tmp_path, capsys):
    """`score --space mbv2` computes WRCor and act_cor with the compile-bounded engine on the
    batch (its agreement with the Flax capture: tests/test_mbv2_engine.py), and the ImageNet
    network's counts, into a resumable file."""
    archs, out = tmp_path / "archs.txt", tmp_path / "scores.csv"
    archs.write_text("\n".join(SMALL) + "\n")
    command = ["score", "--space", "mbv2", "--archs", str(archs), "--batch-size", "8"]
    command += ["--data", str(require(SAMPLE)), "--proxies", "wrcor,act_cor,params", "--quiet"]
    assert main([*command, "--out", str(out)]) == 0
    summary = re.search(
        r"(\d+) compilations.*?(?:, (\d+) programs from the compile cache)?$",
        capsys.readouterr().err.strip().splitlines()[-1],
    )
    assert int(summary[1]) + int(summary[2] or 0) > 0  # counted for this space's engine too
    with out.open(newline="") as f:
        rows = {row["arch"]: row for row in csv.DictReader(f)}
    images, labels = load_batch("cifar10", 8, 42, data=SAMPLE)
    for text in SMALL:
        arch = parse(text)
        sums = MBV2Engine(SE_KINDS).site_sums(arch, init_params(arch, 42, 10), images, labels, 10)
        assert float(rows[text]["wrcor"]) == pytest.approx(mbv2_wrcor(sums), rel=1e-12)
        assert float(rows[text]["act_cor"]) == pytest.approx(mbv2_act_cor(sums), rel=1e-12)
        assert float(rows[text]["params"]) == describe(arch, 1000).params
    assert main([*command, "--out", str(out)]) == 0
    assert "scored 0 archs (2 already in the file)" in capsys.readouterr().err


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


@pytest.fixture
def out_of_memory_on_the_second_call(monkeypatch) -> None:
    """mbv2 scorers whose second call fails as XLA does when the device is out of memory."""
    space_class = type(get_space("mbv2"))
    make_scorer = space_class.scorer

    def scorer(space, config):
        real, calls = make_scorer(space, config), []

        def score(archs, *args):
            calls.append(archs)
            if len(calls) == 2:
                raise jax.errors.JaxRuntimeError(
                    "RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes."
                )
            return real.score(archs, *args)

        return type("Failing", (), {"score": staticmethod(score), "archs_per_call": 1})()

    monkeypatch.setattr(space_class, "scorer", scorer)


@pytest.mark.usefixtures("out_of_memory_on_the_second_call")
def test_out_of_memory_names_the_architecture_and_keeps_the_rows(tmp_path, capsys):
    """XLA's RESOURCE_EXHAUSTED, deep in a piece's call, reaches the user as one line naming
    the architecture being scored; the rows scored before it stay in the file."""
    archs, out = tmp_path / "archs.txt", tmp_path / "scores.csv"
    archs.write_text("\n".join(SMALL) + "\n")
    command = ["score", "--space", "mbv2", "--archs", str(archs), "--proxies", "params"]
    assert main([*command, "--quiet", "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert f"out of memory scoring {SMALL[1]}" in error and "9 bytes" in error
    with out.open(newline="") as f:
        assert [row["arch"] for row in csv.DictReader(f)] == SMALL[:1]


@pytest.mark.usefixtures("out_of_memory_on_the_second_call")
def test_search_out_of_memory_is_one_line(tmp_path, capsys):
    command = ["search", "--space", "mbv2", "--algo", "random", "--proxies", "params"]
    command += ["--budget", "4", "--quiet", "--out", str(tmp_path / "search")]
    assert main(command) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert re.fullmatch(r"wrcor-jax: error: out of memory scoring SuperConv\S+@\d+ .*", error)
