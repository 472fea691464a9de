"""`experiments/mbv2_compiles.py --trace-only`: counts the engine's jit keys, compiles none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "cifar10_sample.npz"


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
    # One key per piece and direction: a forward and a backward of the same shapes, but
    # that WRCor's SE sites need no backward below the first SE (none for the stem, one
    # expand and one shortcut key fewer when only the first sub-block has theirs).
    forward = {k: v for k, v in first["by_piece"].items() if k.endswith("/forward")}
    assert set(forward) == {
        "stem/forward",
        "expand/forward",
        "depthwise_se/forward",
        "shortcut/forward",
        "project/forward",
        "head/forward",
    }
    backward = {
        k.replace("backward", "forward"): v
        for k, v in first["by_piece"].items()
        if k.endswith("/backward")
    }
    assert "stem/backward" not in first["by_piece"]
    for name, n in forward.items():
        if name in ("expand/forward", "shortcut/forward"):
            assert n - 1 <= backward.get(name, 0) <= n, name
        elif name != "stem/forward":
            assert backward[name] == n, name
    assert first["piece_compiles"] == sum(first["by_piece"].values())
    assert second["piece_compiles"] >= first["piece_compiles"]
