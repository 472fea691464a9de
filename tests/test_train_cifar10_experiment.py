"""experiments/train_cifar10.py at toy size: a tiny architecture, 5 steps of batch 16 on 64
images of the shared sample (an eval at the epoch's end and at the last step), both
implementations, the report's keys; a rerun trains nothing and reports the same rows.

30-45 s here (three interpreters: plan, jax, torch_eager; most of it imports and the
tiny network's compilation).
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, require

pytest.importorskip("torch")

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TINY = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,16,1,1)@32"
ROW_KEYS = {
    "impl",
    "images_per_s",
    "step_median_s",
    "step_p90_s",
    "first_step_s",
    "steps",
    "epochs",
    "test_top1",
    "peak_rss_mb",
    "ratio_vs_torch_eager",
}


@pytest.fixture(scope="module")
def experiment():
    path = EXPERIMENTS / "train_cifar10.py"
    spec = importlib.util.spec_from_file_location("train_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_data(tmp_path) -> Path:
    """64 train and 40 test images of the shared sample."""
    with np.load(require(SAMPLE)) as archive:
        arrays = {
            "train_images": archive["train_images"][:64],
            "train_labels": archive["train_labels"][:64],
            "test_images": archive["test_images"][:40],
            "test_labels": archive["test_labels"][:40],
        }
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    return path


def test_toy_run_reports_both_implementations(experiment, toy_data, tmp_path):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--data", str(toy_data), "--arch", TINY, "--steps", "5"]
    argv += ["--batch-size", "16", "--set", "mixup_alpha=0.4", "--set", "label_smoothing=0.1"]
    report = experiment.main(argv)

    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["plan"]["steps"] == 5 and report["plan"]["steps_per_epoch"] == 4
    assert report["arch"] == TINY and report["config"]["mixup_alpha"] == 0.4
    jax_row, torch_row = report["implementations"]
    assert (jax_row["impl"], torch_row["impl"]) == ("jax", "torch_eager")
    for row in (jax_row, torch_row):
        assert set(row) >= ROW_KEYS
        assert row["steps"] == 5 and row["epochs"] == 1.25
        assert [point["step"] for point in row["curve"]] == [4, 5]
        assert 0 <= row["test_top1"] <= 1 and row["images_per_s"] > 0
    assert torch_row["ratio_vs_torch_eager"] == 1.0
    assert "test_top1_difference" in report and "test_top1_difference_2se" in report

    # Same weights, batches, learning rates and mixup draws: the same losses, step by step.
    losses = {
        impl: [
            r["loss"] for r in map(json.loads, (out / impl / "metrics.jsonl").open()) if "loss" in r
        ]
        for impl in ("jax", "torch_eager")
    }
    np.testing.assert_allclose(losses["torch_eager"], losses["jax"], rtol=1e-4)

    again = experiment.main(argv)  # every phase done: nothing trains again
    assert again["implementations"] == report["implementations"]


def test_plan_steps_fits_the_budget(experiment):
    # 10 steps an epoch at 2 s and a 5 s eval: 25 s an epoch.
    assert experiment.plan_steps(2.0, 5.0, 10, budget_s=60) == 20
    assert experiment.plan_steps(2.0, 5.0, 10, budget_s=24) == 9  # less than an epoch
    assert experiment.plan_steps(2.0, 5.0, 10, budget_s=1) == 1
