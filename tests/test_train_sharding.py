"""Sharding: the same global batch on 4 (forced host) devices and on 1 gives the same run.

Each run is a subprocess, since the device count is fixed when JAX starts. The losses agree
to float32 rounding of the reordered reductions (BatchNorm statistics and the gradient's sum
across devices): measured here at most 2.1e-7 relative over 6 steps of the tiny network
(tolerance 1e-5); top-1 equal.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE, require
from train_tiny import TINY


def _run(workdir, devices: int) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = ["--arch", TINY, "--dataset", "cifar10", "--data", str(require(SAMPLE))]
    args += ["--workdir", str(workdir), "--steps", "6", "--batch-size", "16"]
    args += ["--set", "log_every_steps=1", "--set", "mixup_alpha=0.4"]
    code = (
        "import sys, jax; assert jax.device_count() == int(sys.argv[1]), jax.devices(); "
        "from wrcor_jax.train.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(devices), "train", *args],
        env=env,
        check=True,
        capture_output=True,
    )
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
    one, four = _run(tmp_path / "one", 1), _run(tmp_path / "four", 4)
    losses = [[r["loss"] for r in run if "loss" in r] for run in (one, four)]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    evals = [[r["eval_top1"] for r in run if "eval_top1" in r] for run in (one, four)]
    np.testing.assert_allclose(evals[1], evals[0], atol=1e-3)
