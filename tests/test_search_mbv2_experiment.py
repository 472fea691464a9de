"""experiments/search_mbv2.py at toy size: the cost proxies (params, flops) as the vote, so
nothing compiles; the report, the table, EA_our_vote_600M beside the found architecture,
and a re-run that finds everything done."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import SAMPLE, require

from wrcor_jax.spaces import get_space
from wrcor_jax.spaces.mbv2.arch import EA_OUR_VOTE_600M

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


@pytest.fixture(scope="module")
def experiment():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENTS))  # it imports search_nb201's helpers
        spec = importlib.util.spec_from_file_location("search_mbv2", EXPERIMENTS / "search_mbv2.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


def test_toy_search_reports_the_found_architecture_beside_the_landmark(
    experiment, tmp_path, capsys
):
    args = ["--proxies", "params,flops", "--budget", "20", "--seeds", "2", "--dataset", "cifar10"]
    args += ["--data", str(require(SAMPLE)), "--out", str(tmp_path), "--quiet"]
    report = experiment.main(args)
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["command"].startswith("python experiments/search_mbv2.py --proxies")
    assert not report["full_scale"] and report["flops_limit"] == 600_000_000
    assert report["algo_options"] == {"population_size": 10, "tournament_size": 10}
    assert report["wall_s_this_run"] >= 0 and report["machine"]
    assert report["precompile"] is None
    space = get_space("mbv2")
    for seed, search in enumerate(report["searches"]):
        assert search["seed"] == seed and search["ran"] and search["evaluations"] == 20
        described = space.describe(space.parse(search["best_arch"]), 1000)
        assert (search["flops"], search["params"]) == (described["flops"], described["params"])
        assert search["scores"] == {"params": search["params"], "flops": search["flops"]}
        assert search["seconds_per_evaluation"] == search["seconds"] / 20
        assert search["scored"] + search["cache_hits"] == 22  # 20 + the two landmarks
        landmark = search["landmark"]
        assert landmark["arch"] == EA_OUR_VOTE_600M and landmark["flops"] == 591_710_478
        assert 1 <= landmark["rank"] <= landmark["of"] + 1
    assert report["searches"][1]["cache_hits"] > 0  # seed 1 met seed 0's landmarks at least

    table = [line for line in out.splitlines() if line.startswith("|")]
    assert out.startswith("**Reduced scale.** MobileNetV2 space, FLOPs <= 600.0M")
    assert table[0].startswith("| Architecture | Res. | FLOPs | Params | params | flops |")
    assert len(table) == 2 + 2 + 2 and len({line.count("|") for line in table}) == 1
    assert table[2].startswith("| found, seed 0 | ") and "| best |" in table[2]
    assert table[4].startswith("| EA_our_vote_600M (seed 0's batch) | 224 | 591.7M | 10.8M |")
    assert f"- EA_our_vote_600M: `{EA_OUR_VOTE_600M}`" in out
    assert (tmp_path / "table.md").read_text().startswith("**Reduced scale.**")

    # Everything finished: the re-run searches nothing and reports the same.
    again = experiment.main(args)
    assert [s["ran"] for s in again["searches"]] == [False, False]
    strip = ("ran",)
    assert [{k: v for k, v in s.items() if k not in strip} for s in again["searches"]] == [
        {k: v for k, v in s.items() if k not in strip} for s in report["searches"]
    ]


def test_a_limit_that_excludes_the_landmark(experiment, tmp_path, capsys):
    args = ["--proxies", "params,flops", "--budget", "6", "--flops-limit", "300M"]
    args += ["--dataset", "cifar10", "--data", str(require(SAMPLE)), "--out", str(tmp_path)]
    report = experiment.main([*args, "--quiet"])
    landmark = report["searches"][0]["landmark"]
    assert "over the limit of 300,000,000" in landmark["outside"]
    assert "outside: 591,710,478 FLOPs" in capsys.readouterr().out


def test_precompile_needs_the_compilation_cache(experiment, capsys):
    with pytest.raises(SystemExit):
        experiment.parse_args(["--budget", "5", "--precompile", "3", "--no-compile-cache"])
    assert "--precompile takes a count >= 0 and needs the compilation cache" in (
        capsys.readouterr().err
    )
