"""The scoring run: one compilation for the space, resume, clean failures, the CLI."""

import csv

import numpy as np
import pytest
from conftest import GROUND_TRUTH, SAMPLE, SMALL_BATCH, require

from wrcor_jax import cli
from wrcor_jax.compilation import CompileCounter
from wrcor_jax.scoring import NB201Scorer, ScoreConfig, score_archs
from wrcor_jax.spaces import nb201

PROXIES = ("wrcor", "wrcor_clean", "act_cor", "act_grad_cor")


def config(**overrides) -> ScoreConfig:
    data = str(require(SAMPLE))
    defaults = {"proxies": PROXIES, "batch_size": SMALL_BATCH, "data": data, "chunk_size": 4}
    return ScoreConfig(**defaults | overrides)


def random_archs(seed: int, n: int) -> list[str]:
    return [nb201.arch_string(o) for o in nb201.sample_archs(np.random.default_rng(seed), n)]


def read(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def kill_on_second_chunk(monkeypatch):
    """Make NB201Scorer.score raise KeyboardInterrupt on its second call (a killed run);
    returns the real method, to put back."""
    real_score, calls = NB201Scorer.score, []

    def dies_on_second_chunk(self, ops):
        calls.append(len(ops))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(self, ops)

    monkeypatch.setattr(NB201Scorer, "score", dies_on_second_chunk)
    return real_score


@pytest.mark.slow
def test_scoring_40_archs_compiles_as_often_as_scoring_20():
    scorer = NB201Scorer(config(batch_size=10))  # a shape no other test compiles
    before = CompileCounter.count
    scorer.score(np.stack([nb201.parse_arch(a) for a in random_archs(1, 20)]))
    first_20 = CompileCounter.count - before
    scorer.score(np.stack([nb201.parse_arch(a) for a in random_archs(2, 20)]))
    assert first_20 > 0
    assert CompileCounter.count - before == first_20  # the next 20 compile nothing

    # A subset of the configured proxies (what a score cache lacks), in the order asked.
    ops = np.stack([nb201.parse_arch(a) for a in random_archs(1, 3)])
    rows = scorer.score(ops)
    assert scorer.score(ops, ("act_cor", "wrcor")) == [[row[2], row[0]] for row in rows]
    with pytest.raises(ValueError, match="'synflow' is not one this scorer"):
        scorer.score(ops, ("synflow",))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_file(tmp_path, monkeypatch):
    archs = random_archs(3, 10)
    whole = tmp_path / "whole.csv"
    score_archs(archs, config(), whole, progress=False)

    resumed = tmp_path / "resumed.csv"
    real_score = kill_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        score_archs(archs, config(), resumed, progress=False)
    assert len(read(resumed)) == 1 + 4  # header + the first chunk
    monkeypatch.setattr(NB201Scorer, "score", real_score)
    with resumed.open("a") as f:  # a row torn by the kill is dropped on resume
        f.write("|none~0|+|none~0|none")
    summary = score_archs(archs, config(), resumed, progress=False)
    assert (summary.archs, summary.skipped) == (6, 4)
    assert read(resumed) == read(whole)


VALID = "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|\n"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def score_args(tmp_path, *extra):
    return ["score", "--data", require(SAMPLE), "--batch-size", SMALL_BATCH, "--quiet",
            "--out", tmp_path / "r.csv", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (VALID + "|nor_conv_3x3~0|+|bogus~0|none~1|+|none~0|none~1|none~2|\n", "unknown op"),
        (VALID + "|nor_conv_3x3~0|+|none~0|+|none~0|none~1|none~2|\n", "must have 2 inputs"),
        ("\n\n", "holds no architecture"),
    ],
)
def test_bad_arch_file_fails_in_one_line_without_writing(tmp_path, capsys, content, message):
    archs = tmp_path / "archs.txt"
    archs.write_text(content)
    code, _, err = run_cli(capsys, *score_args(tmp_path, "--archs", archs))
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [("missing.npz", "not found"), ("garbled.npz", "npz")],
)
def test_missing_or_garbled_data_fails_in_one_line(tmp_path, capsys, data, message):
    (tmp_path / "garbled.npz").write_bytes(b"not a zip file at all")
    args = ["score", "--data", tmp_path / data, "--sample", 3, "--out", tmp_path / "r.csv"]
    code, _, err = run_cli(capsys, *args)
    assert code != 0 and message in err.lower() and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.csv").exists()


def test_unknown_proxy_fails_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, *score_args(tmp_path, "--sample", 3, "--proxies", "wrcor,zz"))
    assert code != 0 and "unknown proxy 'zz'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.csv").exists()


def test_results_file_of_other_proxies_is_refused(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("arch,act_cor\n")
    code, _, err = run_cli(capsys, *score_args(tmp_path, "--sample", 3))
    assert code != 0 and "columns" in err
    assert read(tmp_path / "r.csv") == [["arch", "act_cor"]]


@pytest.mark.slow
def test_cli_score_then_evaluate(tmp_path, capsys):
    archs = tmp_path / "archs.txt"
    archs.write_text("\n".join(random_archs(4, 6)) + "\n")
    code, _, err = run_cli(
        capsys, *score_args(tmp_path, "--archs", archs, "--proxies", "wrcor,act_cor")
    )
    assert code == 0 and "scored 6 archs" in err and "compilations" in err
    rows = read(tmp_path / "r.csv")
    assert rows[0] == ["arch", "wrcor", "act_cor"] and len(rows) == 7
    code, out, _ = run_cli(
        capsys, "evaluate", tmp_path / "r.csv", "--ground-truth", require(GROUND_TRUTH), "--json"
    )
    import json

    report = json.loads(out)
    assert code == 0 and set(report) == {"wrcor", "act_cor"}
    assert report["wrcor"]["n"] == 6 and -1 <= report["wrcor"]["kendall"] <= 1


VOTES = "wrcor,vote(wrcor,act_cor,act_grad_cor),softvote(wrcor_clean,act_cor)"


def test_vote_columns_are_filled_when_the_run_completes(tmp_path, capsys, monkeypatch):
    """4 archs in chunks of 2, killed after the first chunk: the file holds base scores and
    empty vote cells; the resumed run scores the rest and fills the votes over all rows."""
    from wrcor_jax.results import read_meta
    from wrcor_jax.vote import parse_columns, vote_scores

    archs = tmp_path / "archs.txt"
    archs.write_text("\n".join(random_archs(5, 4)) + "\n")
    args = score_args(tmp_path, "--archs", archs, "--proxies", VOTES, "--chunk-size", 2)
    real_score = kill_on_second_chunk(monkeypatch)
    code, _, err = run_cli(capsys, *args)
    assert code == cli.EXIT_INTERRUPTED and "re-run" in err
    base = ["wrcor", "act_cor", "act_grad_cor", "wrcor_clean"]
    header = ["arch", *base, "vote(wrcor,act_cor,act_grad_cor)", "softvote(wrcor_clean,act_cor)"]
    rows = read(tmp_path / "r.csv")
    assert rows[0] == header and len(rows) == 3
    assert all(row[-2:] == ["", ""] and all(row[1:5]) for row in rows[1:])

    monkeypatch.setattr(NB201Scorer, "score", real_score)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "scored 2 archs (2 already" in err
    assert "2 vote column(s) filled over 4 rows" in err
    rows = read(tmp_path / "r.csv")
    table = np.array([[float(c) for c in row[1:5]] for row in rows[1:]])
    expected = vote_scores(parse_columns(VOTES, base)[1], base, table)
    np.testing.assert_array_equal([float(row[5]) for row in rows[1:]], expected[header[5]])
    np.testing.assert_allclose([float(row[6]) for row in rows[1:]], expected[header[6]])
    assert sorted(float(row[5]) for row in rows[1:]) == [0, 1, 2, 3]  # positions
    assert read_meta(tmp_path / "r.csv")["dataset"] == "cifar10"

    code, _, err = run_cli(capsys, *args)  # nothing left: the votes come out the same
    assert code == 0 and "scored 0 archs" in err and read(tmp_path / "r.csv") == rows
    code, _, err = run_cli(capsys, *args[:-2], "--seed", 7)
    assert code == 1 and "was scored with seed 42" in err and read(tmp_path / "r.csv") == rows


def test_unknown_proxy_in_a_vote_fails_in_one_line(tmp_path, capsys):
    proxies = "wrcor,vote(wrcor,zz)"
    code, _, err = run_cli(capsys, *score_args(tmp_path, "--sample", 3, "--proxies", proxies))
    assert code != 0 and "unknown proxy 'zz' in 'vote(wrcor,zz)'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.csv").exists()


def test_cli_offers_every_engine():
    from wrcor_jax.cli import ENGINE_CHOICES
    from wrcor_jax.scoring import ENGINES

    assert ENGINE_CHOICES == ENGINES
