"""Strict JSON: every non-finite float becomes null, at any depth, and files appear whole."""

import json
import math

import numpy as np
import pytest

from wrcor_jax.jsonio import dumps, finite_or_null, write_json


def _strict_loads(text: str):
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_non_finite_floats_become_null_at_any_depth():
    value = {"rho": math.nan, "ci": (0.1, math.inf), "rows": [{"tau": -math.inf, "n": 3}]}
    assert finite_or_null(value) == {
        "rho": None,
        "ci": [0.1, None],
        "rows": [{"tau": None, "n": 3}],
    }
    assert _strict_loads(dumps(value))["rows"][0] == {"tau": None, "n": 3}


def test_numpy_float64_nan_is_caught_and_finite_values_survive():
    text = dumps({"a": np.float64("nan"), "b": np.float64(0.25), "c": "NaN"})
    assert _strict_loads(text) == {"a": None, "b": 0.25, "c": "NaN"}


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"best": math.nan})
    write_json(path, {"best": 93.5})
    assert _strict_loads(path.read_text()) == {"best": 93.5}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_value_json_cannot_encode_is_still_an_error(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"bad": object()})
    assert not (tmp_path / "x.json").exists()
