"""`experiments/mbv2_compiles.py --trace-only`: counts the engine's jit keys, compiles none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "cifar10_sample.npz"


@pytest.mark.skipif(not SAMPLE.exists(), reason="needs ../shared/data/cifar10_sample.npz")
def test_trace_only_counts_piece_keys(tmp_path: Path) -> None:
    out = tmp_path / "keys.jsonl"
    command = [sys.executable, str(ROOT / "experiments" / "mbv2_compiles.py"), "--archs", "2"]
    command += ["--checkpoints", "1,2", "--batch-size", "4", "--trace-only", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["archs"] == 1 and second["archs"] == 2
    assert "compiles" not in first
    # One key per piece and direction: a forward and a backward of the same shapes.
    forward = {k: v for k, v in first["by_piece"].items() if k.endswith("/forward")}
    assert set(forward) == {
        "stem/forward",
        "expand/forward",
        "depthwise_se/forward",
        "shortcut/forward",
        "project/forward",
        "head/forward",
    }
    for name, n in forward.items():
        assert first["by_piece"][name.replace("forward", "backward")] == n
    assert first["piece_compiles"] == sum(first["by_piece"].values())
    assert second["piece_compiles"] >= first["piece_compiles"]
