"""Searching the MobileNetV2 space under a FLOPs limit: the NB201 search's guarantees
(history, resume after a kill, the score cache, one search per seed), result.json's cost and
landmark standings, bad input as one-line errors that write nothing, and the ImageNet batch
through tfds. Toy size: the cost proxies (params, flops) score in microseconds; the one
WRCor test scores a narrow network at CIFAR's size."""

import csv
import json
import math

import numpy as np
import pytest
from conftest import SAMPLE, require

from wrcor_jax.cli import main
from wrcor_jax.data import load_batch
from wrcor_jax.proxies.wrcor import mbv2_wrcor
from wrcor_jax.search import ALGORITHMS
from wrcor_jax.spaces import get_space
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.arch import EA_OUR_VOTE_600M, MOBILENET_V2, parse
from wrcor_jax.spaces.mbv2.engine import SE_KINDS, MBV2Engine
from wrcor_jax.spaces.mbv2.network import init_params
from wrcor_jax.vote import hard_vote_compare

NB201_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|none~1|none~2|"
SMALL = "SuperConvK3BNRELU(3,16,1,1)SuperResIDWE2K5(16,16,2,8,2)SuperConvK1BNRELU(16,24,1,1)@32"
BUDGETS = {"random": 24, "evolution": 20, "reinforce": 110}  # reinforce: past its warm-up


def search(out, algo="evolution", seed=0, budget=None, *extra) -> list[str]:
    command = ["search", "--space", "mbv2", "--algo", algo, "--proxies", "params,flops"]
    command += ["--vote", "hard", "--budget", str(budget or BUDGETS[algo]), "--seed", str(seed)]
    return [*command, "--out", str(out), "--quiet", *extra]


def read_history(out) -> list[dict]:
    with (out / "history.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def read_result(out) -> dict:
    result = json.loads((out / "result.json").read_text())
    return {k: v for k, v in result.items() if k != "seconds"}


def one_line_error(capsys, text: str) -> None:
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1 and err.startswith("wrcor-jax: error: ")


# ---------------------------------------------------------------------------- guarantees


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_one_search_per_seed(tmp_path, capsys, algo):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(search(tmp_path / name, algo, seed)) == 0
    capsys.readouterr()
    assert read_history(tmp_path / "a") == read_history(tmp_path / "b")
    assert read_result(tmp_path / "a") == read_result(tmp_path / "b")
    assert read_history(tmp_path / "a") != read_history(tmp_path / "c")
    space = get_space("mbv2")
    rows = read_history(tmp_path / "a")
    assert len(rows) == BUDGETS[algo]
    for row in rows:
        arch = space.parse(row["arch"])
        assert space.format(arch) == row["arch"] and space.search_problems(arch) == []
        assert float(row["flops"]) <= 600e6


class Interrupted(Exception):
    """The stand-in for a kill."""


class Cost:
    """params and flops of the 1000-class network, as `score` gives them; raises
    `Interrupted` once `limit` architectures have been scored."""

    proxies = ("params", "flops")
    identity = "cost"

    def __init__(self, limit: int | None = None):
        self.space, self.limit, self.scored = get_space("mbv2"), limit, 0

    def score(self, archs) -> list[list[float]]:
        if self.limit is not None and self.scored + len(archs) > self.limit:
            raise Interrupted
        self.scored += len(archs)
        return [[float(self.space.describe(a, 1000)[p]) for p in self.proxies] for a in archs]


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("stop_after", [3, 17])
def test_resume_after_a_kill_ends_as_an_uninterrupted_search(tmp_path, algo, stop_after):
    def run(fitness, out):
        return ALGORITHMS[algo](fitness, BUDGETS[algo], 0, out)

    run(Cost(), tmp_path / "whole")
    with pytest.raises(Interrupted):
        run(Cost(limit=stop_after), tmp_path / "resumed")
    recorded = len(read_history(tmp_path / "resumed")) if stop_after > 8 else 0
    if stop_after < 8:  # killed before its first evaluation (chunks of 8): nothing is left
        assert not (tmp_path / "resumed").exists()
    again = Cost()
    run(again, tmp_path / "resumed")
    # Each landmark within the limit (2) is scored too, outside the budget.
    assert again.scored == BUDGETS[algo] - recorded + 2
    assert read_history(tmp_path / "resumed") == read_history(tmp_path / "whole")
    assert read_result(tmp_path / "resumed") == read_result(tmp_path / "whole")


def test_score_cache_is_keyed_by_configuration(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(search(tmp_path / "a", "evolution", 0, None, *cache)) == 0
    assert "(22 scored, 0 from the cache)" in capsys.readouterr().err  # 20 + 2 landmarks
    assert main(search(tmp_path / "b", "evolution", 0, None, *cache)) == 0
    assert "(0 scored, 22 from the cache)" in capsys.readouterr().err
    assert read_history(tmp_path / "a") == read_history(tmp_path / "b")
    other_seed = [*cache, "--score-seed", "7"]  # another configuration: another table
    assert main(search(tmp_path / "c", "evolution", 0, None, *other_seed)) == 0
    assert "(22 scored, 0 from the cache)" in capsys.readouterr().err
    keys = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/key.json")]
    assert sorted(k["seed"] for k in keys) == [7, 42] and {k["space"] for k in keys} == {"mbv2"}


# ---------------------------------------------------------------------------- result.json


def test_result_holds_the_cost_and_the_landmark_standings(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(search(out, "evolution", 3)) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "result.json").read_text())
    assert printed == result
    space = get_space("mbv2")
    described = space.describe(space.parse(result["best_arch"]), 1000)
    for key in ("resolution", "flops", "params"):
        assert result[key] == described[key]
    assert result["best_scores"] == [described["params"], described["flops"]]
    assert (result["budget"], result["evaluations"]) == (20, 20) and result["seconds"] > 0

    landmarks = result["landmarks"]
    assert list(landmarks) == ["EA_our_vote", "EA_our_vote_600M", "MobileNetV2"]
    assert "over the limit of 600,000,000" in landmarks["EA_our_vote"]["outside"]
    assert "rank" not in landmarks["EA_our_vote"]
    history = read_history(out)
    distinct = {r["arch"]: [float(r["params"]), float(r["flops"])] for r in history}
    for name, text in (("EA_our_vote_600M", EA_OUR_VOTE_600M), ("MobileNetV2", MOBILENET_V2)):
        standing = landmarks[name]
        cost = space.describe(parse(text), 1000)
        assert standing["arch"] == text and standing["scores"] == [cost["params"], cost["flops"]]
        outcomes = [hard_vote_compare(standing["scores"], row) for row in distinct.values()]
        assert standing["beaten_by"] == outcomes.count(-1) and standing["beats"] == outcomes.count(
            1
        )
        assert standing["rank"] == standing["beaten_by"] + 1 and standing["of"] == len(distinct)
        found = distinct[result["best_arch"]]
        assert standing["beats_found"] == (hard_vote_compare(standing["scores"], found) > 0)

    # Under a limit that admits it, EA_our_vote (1658M FLOPs) is ranked too.
    assert main(search(tmp_path / "2g", "random", 0, None, "--flops-limit", "2G")) == 0
    result = json.loads(capsys.readouterr().out)
    assert all("rank" in standing for standing in result["landmarks"].values())


def test_nb201_result_gains_only_its_cost(tmp_path, capsys):
    command = ["search", "--algo", "random", "--proxies", "params,flops", "--budget", "5"]
    assert main([*command, "--data", str(require(SAMPLE)), "--quiet", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "landmarks" not in result and result["resolution"] == 32
    assert result["flops"] > 0 and result["params"] > 0


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_a_flops_limit_no_architecture_meets(tmp_path, capsys, algo):
    out = tmp_path / "out"
    assert main(search(out, algo, 0, None, "--flops-limit", "1M")) == 1
    smallest = sampling.smallest_flops()
    one_line_error(capsys, f"within flops_limit=1,000,000: the smallest has {smallest:,} FLOPs")
    assert not out.exists()
    # The smallest architecture of the space is one of it, and meets its own count.
    arch = sampling.from_choices([0] * 37 + [0, 0])
    assert sampling.problems(arch) == [] and sampling.describe(arch, 1000).flops >= smallest


@pytest.mark.parametrize("limit", ["abc", "0", "-5M", "600X"])
def test_a_flops_limit_that_does_not_parse(tmp_path, capsys, limit):
    out = tmp_path / "out"
    assert main(search(out, "random", 0, None, f"--flops-limit={limit}")) == 1
    one_line_error(capsys, repr(limit))
    assert not out.exists()


def test_text_of_the_other_space(tmp_path, capsys):
    assert main(["describe", "--space", "mbv2", "--arch", NB201_ARCH]) == 1
    one_line_error(capsys, "an architecture of the nb201 space: use --space nb201")
    assert main(["describe", "--space", "nb201", "--arch", MOBILENET_V2]) == 1
    one_line_error(capsys, "an architecture of the mbv2 space: use --space mbv2")
    archs, out = tmp_path / "archs.txt", tmp_path / "scores.csv"
    archs.write_text(NB201_ARCH + "\n")
    command = ["score", "--space", "mbv2", "--archs", str(archs), "--proxies", "params"]
    assert main([*command, "--quiet", "--out", str(out)]) == 1
    one_line_error(capsys, "use --space nb201")
    assert not out.exists()
    assert main(["describe", "--space", "nb201", "--arch", NB201_ARCH, "--flops-limit", "1G"]) == 1
    one_line_error(capsys, "the nb201 space takes no option flops_limit")


def test_files_of_the_other_space_are_refused(tmp_path, capsys):
    data = ["--data", str(require(SAMPLE))]
    nb201_scores = tmp_path / "nb201.csv"
    command = ["score", "--sample", "3", "--proxies", "params", "--quiet", *data]
    assert main([*command, "--out", str(nb201_scores)]) == 0
    capsys.readouterr()
    before = nb201_scores.read_text()
    assert main([*command, "--space", "mbv2", "--out", str(nb201_scores)]) == 1
    one_line_error(capsys, "was scored with space nb201")
    assert nb201_scores.read_text() == before

    # A search folder of the other space, or of another FLOPs limit, is refused untouched.
    nb201_search = tmp_path / "nb201_search"
    nb201 = ["search", "--algo", "random", "--proxies", "params,flops", "--budget", "4"]
    assert main([*nb201, *data, "--quiet", "--out", str(nb201_search)]) == 0
    mbv2_search = tmp_path / "mbv2_search"
    assert main(search(mbv2_search, "random")) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for d in (nb201_search, mbv2_search) for p in d.iterdir()}
    assert main(search(nb201_search, "random")) == 1
    one_line_error(capsys, "holds another search (")
    assert main(search(mbv2_search, "random", 0, None, "--flops-limit", "300M")) == 1
    one_line_error(
        capsys, "space mbv2 flops_limit=600000000 there, mbv2 flops_limit=300000000 here"
    )
    assert main([*nb201, *data, "--quiet", "--out", str(mbv2_search)]) == 1
    one_line_error(capsys, "space mbv2 flops_limit=600000000 there, nb201 here")
    assert files == {p: p.read_bytes() for d in (nb201_search, mbv2_search) for p in d.iterdir()}

    # A score file of the other space as a cache preload.
    preload = ["--cache-preload", str(nb201_scores)]
    assert main(search(tmp_path / "preloaded", "random", 0, None, *preload)) == 1
    one_line_error(capsys, "use --space nb201")
    assert not (tmp_path / "preloaded").exists()


# ---------------------------------------------------------------------------- ImageNet


def test_score_on_an_imagenet_batch_through_tfds(tmp_path, capsys):
    """tfds' mock stands in for a prepared imagenet2012 (no TensorFlow needed): the batch is
    read at 320 x 320 and the network scored has ImageNet's 1000 classes."""
    tfds = pytest.importorskip("tensorflow_datasets")
    archs, out = tmp_path / "archs.txt", tmp_path / "scores.csv"
    archs.write_text(SMALL + "\n")
    command = ["score", "--space", "mbv2", "--dataset", "imagenet2012", "--data-dir"]
    command += [str(tmp_path / "tfds"), "--archs", str(archs), "--batch-size", "4"]
    command += ["--proxies", "wrcor,params", "--quiet", "--out", str(out)]
    with tfds.testing.mock_data(num_examples=10):
        assert main(command) == 0
        images, labels = load_batch("imagenet2012", 4, 42, data_dir=str(tmp_path / "tfds"))
    with out.open(newline="") as f:
        (row,) = csv.DictReader(f)
    arch = parse(SMALL)
    engine = MBV2Engine(SE_KINDS)
    expected = mbv2_wrcor(engine.site_sums(arch, init_params(arch, 42, 1000), images, labels, 1000))
    assert math.isfinite(expected) and float(row["wrcor"]) == pytest.approx(expected, rel=1e-12)
    assert images.shape == (4, 320, 320, 3)

    # Without the dataset prepared: one line saying how, nothing written anywhere.
    out.unlink()
    (out.parent / (out.name + ".json")).unlink()
    capsys.readouterr()
    assert main(command) == 1
    one_line_error(capsys, "tfds build imagenet2012 --data_dir")
    assert not out.exists() and not (tmp_path / "tfds").exists()


def test_imagenet_batch_rules() -> None:
    """SPEC 2 on the 320 x 320 images: the same seed gives the same batch, ImageNet's
    normalisation (a uniform grey image maps to (128/255 - mean) / std)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def grey(*args, **kwargs):
        return [{"image": np.full((300, 400, 3), 128, np.uint8), "label": 5}] * 8

    with tfds.testing.mock_data(as_data_source_fn=grey):
        images, labels = load_batch("imagenet2012", 4, 0, data_dir="unused", padding=0)
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(images, np.broadcast_to(expected, images.shape), atol=2e-3)
    assert labels.tolist() == [5] * 4
