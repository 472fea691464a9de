"""Checkpoints and resume: a run killed (SIGKILL) or preempted (SIGTERM) and restarted with
the same command ends bitwise equal to an uninterrupted one (CPU); a workdir holding another
config is refused; a bad architecture is a one-line error."""

import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SAMPLE, require

from wrcor_jax.train import configs, metrics
from wrcor_jax.train.train import train_and_evaluate

TINY = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,32,1,1)@16"
LONG_STEPS = 240


def _command(workdir, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "wrcor_jax.train.cli", "train", "--arch", TINY,
        "--dataset", "cifar10", "--data", str(require(SAMPLE)), "--workdir", str(workdir),
        "--steps", str(steps), "--batch-size", "16", "--checkpoint-every", "20",
        "--set", "log_every_steps=1", "--set", "eval_every_steps=100000",
    ]  # fmt: skip


def _final_state(workdir) -> dict:
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return ocp.PyTreeCheckpointer().restore(
        (workdir / "checkpoints" / str(step) / "state").absolute()
    )


def _assert_same_run(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(_final_state(a)), jax.tree.leaves(_final_state(b))
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = [[r["loss"] for r in metrics.read(w / "metrics.jsonl") if "loss" in r] for w in (a, b)]
    assert losses[0] == losses[1]


def _interrupt(workdir, sig: int, after_step: int) -> subprocess.Popen:
    """Start the long run, send `sig` once its metrics reach `after_step` and a checkpoint
    exists; the process, ended."""
    process = subprocess.Popen(_command(workdir, LONG_STEPS), stderr=subprocess.DEVNULL)
    log = workdir / "metrics.jsonl"
    while process.poll() is None:
        records = metrics.read(log) if log.exists() else []
        if records and records[-1]["step"] >= after_step:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    process.wait(timeout=120)
    return process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_command(workdir, LONG_STEPS), check=True, capture_output=True)
    return workdir


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_uninterrupted(uninterrupted, tmp_path):
    process = _interrupt(tmp_path, signal.SIGKILL, after_step=50)
    assert process.returncode == -signal.SIGKILL
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) < LONG_STEPS, "the kill came after the end: nothing resumed"
    subprocess.run(_command(tmp_path, LONG_STEPS), check=True, capture_output=True)
    _assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(uninterrupted, tmp_path):
    process = _interrupt(tmp_path, signal.SIGTERM, after_step=50)
    assert process.returncode == 0
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 50 <= saved < LONG_STEPS
    assert metrics.read(tmp_path / "metrics.jsonl")[-1]["step"] == saved
    subprocess.run(_command(tmp_path, LONG_STEPS), check=True, capture_output=True)
    _assert_same_run(uninterrupted, tmp_path)


def _tiny_config(steps: int) -> configs.TrainConfig:
    return configs.override(
        configs.PRESETS["cifar10"],
        [
            f"arch={TINY}", f"data.data={require(SAMPLE)}", "data.resolution=16",
            "batch_size=16", f"num_steps={steps}", "checkpoint_every_steps=4",
            "keep_checkpoints=5", "log_every_steps=1", "mixup_alpha=0.4",
        ],
    )  # fmt: skip


def test_resume_from_an_earlier_checkpoint_replays_the_run(tmp_path):
    """In process: a finished run, its last two checkpoints deleted, rerun from step 4."""
    config, run, reference = _tiny_config(12), tmp_path / "run", tmp_path / "reference"
    train_and_evaluate(config, run)
    shutil.copytree(run, reference)
    for step in (8, 12):
        shutil.rmtree(run / "checkpoints" / str(step))
    resumed = train_and_evaluate(config, run)
    _assert_same_run(reference, run)
    assert set(resumed) == {"eval_top1", "eval_top5", "eval_loss"}
    assert (run / "curves.png").stat().st_size > 0


def test_another_config_in_the_workdir_is_refused(tmp_path):
    train_and_evaluate(_tiny_config(2), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"another config .*num_steps"):
        train_and_evaluate(_tiny_config(3), tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_cli_errors_are_one_line(tmp_path):
    bad = _command(tmp_path, 2)
    bad[bad.index("--arch") + 1] = "SuperConvK3BNRELU(3,8,2)@16"
    result = subprocess.run(bad, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("wrcor-jax: error:")
    assert not (tmp_path / "config.json").exists()
    missing = _command(tmp_path, 2)
    missing[missing.index("--data") + 1] = str(tmp_path / "absent.npz")
    result = subprocess.run(missing, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr


def test_distillation_from_another_run(tmp_path):
    train_and_evaluate(_tiny_config(2), tmp_path / "teacher")
    student = configs.override(
        _tiny_config(2), [f"teacher_workdir={tmp_path / 'teacher'}", "kd_ratio=0.5"]
    )
    result = train_and_evaluate(student, tmp_path / "student")
    assert 0 <= result["eval_top1"] <= 1
    with pytest.raises(ValueError, match="holds no training run"):
        train_and_evaluate(
            configs.override(student, [f"teacher_workdir={tmp_path}"]), tmp_path / "orphan"
        )
