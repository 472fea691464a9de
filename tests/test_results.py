"""The results file: appended rows, torn rows dropped, derived (vote) columns, the sidecar."""

import csv
import math

import numpy as np
import pytest

from wrcor_jax.results import ResultsError, ResultsFile, meta_path, read_meta, write_meta


def read(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_derived_cells_stay_empty_until_filled(tmp_path):
    results = ResultsFile(tmp_path / "r.csv", ["a", "b"], ["vote(a,b)"])
    results.append([("x", [1.0, 2.0]), ("y", [3.0, -math.inf])])
    assert read(results.path) == [
        ["arch", "a", "b", "vote(a,b)"],
        ["x", "1.0", "2.0", ""],
        ["y", "3.0", "-inf", ""],
    ]
    assert results.done() == {"x", "y"}
    seen = []

    def compute(table):
        seen.append(table)
        return {"vote(a,b)": table.sum(axis=1)}

    assert results.fill_derived(compute) == 2
    np.testing.assert_array_equal(seen[0], [[1.0, 2.0], [3.0, -math.inf]])
    assert [row[3] for row in read(results.path)[1:]] == ["3.0", "-inf"]
    assert not results.path.with_suffix(".csv.tmp").exists()
    results.append([("z", [0.0, 0.0])])  # a later row: empty again until the next fill
    assert read(results.path)[-1] == ["z", "0.0", "0.0", ""]


def test_fill_derived_checks_lengths(tmp_path):
    results = ResultsFile(tmp_path / "r.csv", ["a"], ["v"])
    results.append([("x", [1.0])])
    with pytest.raises(ValueError, match="for 1 rows"):
        results.fill_derived(lambda table: {"v": [1.0, 2.0]})
    assert read(results.path) == [["arch", "a", "v"], ["x", "1.0", ""]]


def test_header_names_the_vote_columns(tmp_path):
    ResultsFile(tmp_path / "r.csv", ["a", "b"]).append([("x", [1.0, 2.0])])
    with pytest.raises(ResultsError, match="columns"):
        ResultsFile(tmp_path / "r.csv", ["a", "b"], ["vote(a,b)"]).done()


@pytest.mark.parametrize("derived", [(), ("vote(a,b)",)])
def test_row_torn_inside_its_last_cell_is_dropped(tmp_path, derived):
    results = ResultsFile(tmp_path / "r.csv", ["a", "b"], derived)
    results.append([("x", [1.0, 2.0]), ("y", [3.0, 4.25])])
    text = results.path.read_text()
    results.path.write_text(text[: text.rindex("4.25") + 3])  # "...,4.2": a wrong value
    assert results.done() == {"x"}
    assert read(results.path)[1:] == [["x", "1.0", "2.0", *[""] * len(derived)]]


def test_sidecar_round_trip(tmp_path):
    out = tmp_path / "r.csv"
    assert read_meta(out) is None
    write_meta(out, {"dataset": "cifar10", "seed": 42})
    assert meta_path(out).name == "r.csv.json"
    assert read_meta(out) == {"dataset": "cifar10", "seed": 42}
    meta_path(out).write_text("{not json")
    assert read_meta(out) is None
