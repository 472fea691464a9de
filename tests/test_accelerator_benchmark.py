"""`experiments/accelerator_benchmark.py` runs end to end at toy size and reports what the
issue asks for, its scores equal to the composed engine's."""

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
def test_benchmark_reports_speed_memory_and_flops(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "experiments" / "accelerator_benchmark.py")]
    command += ["--num-archs", "3", "--chunk", "2", "--batch-size", "4", "--floor-archs", "2"]
    command += ["--check", "2", "--matmul-size", "256", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    report = json.loads(out.read_text())
    assert report["chunk"] == {"archs": 2, "conv3x3": 1, "conv1x1": 1}
    assert report["chunks"] >= 2 and report["compile_s"] > 0 and report["archs_per_s"] > 0
    assert report["peak_memory_bytes"] > 0 and report["floor_archs"] == 2
    assert 0.5 < report["full_chunk_over_floor"] < 5 and 0 < report["utilisation"] < 1
    assert report["wrcor_checked_archs"] == 2
    assert report["wrcor_max_rel_diff_vs_composed"] < 1e-5


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "accelerator_benchmark", ROOT / "experiments" / "accelerator_benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_figures_from_counts_and_null_without_them() -> None:
    """Two chunks of 4 places for 6 archs, a full chunk's program at 8 GFLOP, floors of 1
    and 3 GFLOP: 2 G per place, 8/3 G executed per arch; without counts every figure is null
    (XLA:GPU's jax 0.11.2 analysed no lowered program) but the matmul peak."""
    flop_report = _benchmark_module().flop_report
    report = flop_report((8e9, [1e9, 3e9]), 4, 2, 6, 10.0, 1e12)
    assert report["executed_flops_per_chunk_place"] == 2e9
    assert report["executed_flops_per_arch"] == pytest.approx(8e9 / 3)
    assert report["floor_flops_per_arch"] == 2e9 and report["floor_archs"] == 2
    assert report["full_chunk_over_floor"] == 1.0
    assert report["utilisation"] == pytest.approx(8e9 / 3 * 10 / 1e12)
    empty = flop_report(None, 4, 2, 6, 10.0, 1e12)
    assert empty.pop("matmul_peak_flops_per_s") == 1e12
    assert set(empty.values()) == {None}
