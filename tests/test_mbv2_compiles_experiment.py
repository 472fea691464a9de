"""`experiments/mbv2_compiles.py --trace-only`: counts the engine's jit keys, compiles none."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from wrcor_jax.spaces.mbv2 import sampling

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "cifar10_sample.npz"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # for its dataclass
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.exists(), reason="needs ../shared/data/cifar10_sample.npz")
def test_trace_only_counts_piece_keys(tmp_path: Path) -> None:
    out = tmp_path / "keys.jsonl"
    command = [sys.executable, str(ROOT / "experiments" / "mbv2_compiles.py"), "--archs", "2"]
    command += ["--checkpoints", "1,2", "--batch-size", "4", "--trace-only", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["archs"] == 1 and second["archs"] == 2
    assert "compiles" not in first
    # One key per piece and direction, as the key replay counts them from the architectures
    # alone (none for the stem's backward: WRCor's SE sites need none below the first SE)
    replay = _load("mbv2_key_replay")
    archs = sampling.sample(np.random.default_rng(0), 2, flops_limit=600_000_000)
    for counted, n in ((first, 1), (second, 2)):
        replayed = Counter(f"{key[1]}/{key[0]}" for key in replay.keys_met(archs[:n]))
        assert counted["by_piece"] == dict(replayed)
    assert "stem/backward" not in first["by_piece"]
    assert first["piece_compiles"] == sum(first["by_piece"].values())
    assert second["piece_compiles"] >= first["piece_compiles"]
