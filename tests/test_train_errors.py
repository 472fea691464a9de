"""Bad inputs: a workdir holding another run's config is refused and left as it was; a bad
architecture, missing data or a workdir with no run is a one-line error with exit code 1."""

import subprocess
import sys

import pytest
from train_tiny import tiny_config, train_command

from wrcor_jax.train.train import train_and_evaluate


def test_another_config_in_the_workdir_is_refused(tmp_path):
    train_and_evaluate(tiny_config(2), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"another config .*num_steps"):
        train_and_evaluate(tiny_config(3), tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_cli_errors_are_one_line(tmp_path):
    bad = train_command(tmp_path, 2)
    bad[bad.index("--arch") + 1] = "SuperConvK3BNRELU(3,8,2)@16"
    result = subprocess.run(bad, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("wrcor-jax: error:")
    assert not (tmp_path / "config.json").exists()
    missing = train_command(tmp_path, 2)
    missing[missing.index("--data") + 1] = str(tmp_path / "absent.npz")
    result = subprocess.run(missing, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "config.json").exists()
    evaluate = [sys.executable, "-m", "wrcor_jax.train.cli", "evaluate-checkpoint"]
    result = subprocess.run([*evaluate, "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "holds no training run" in result.stderr
    assert result.stderr.count("\n") == 1
