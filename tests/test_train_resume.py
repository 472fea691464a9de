"""Checkpoints and resume: a run killed (SIGKILL) or preempted (SIGTERM) and restarted with
the same command ends bitwise equal to an uninterrupted one (CPU); so does one resumed in
process from an earlier checkpoint."""

import json
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_tiny import tiny_config, train_command

from wrcor_jax.train import metrics
from wrcor_jax.train.train import train_and_evaluate

LONG_STEPS = 240


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
    """Start the long run, send `sig` once its metrics reach `after_step` (checkpoints
    every 20 steps); the process, ended."""
    process = subprocess.Popen(train_command(workdir, LONG_STEPS), stderr=subprocess.DEVNULL)
    log = workdir / "metrics.jsonl"
    while process.poll() is None:
        try:
            records = metrics.read(log)
        except json.JSONDecodeError:  # a line half written
            continue
        if records and records[-1]["step"] >= after_step:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    process.wait(timeout=120)
    return process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(train_command(workdir, LONG_STEPS), check=True, capture_output=True)
    return workdir


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_uninterrupted(uninterrupted, tmp_path):
    process = _interrupt(tmp_path, signal.SIGKILL, after_step=50)
    assert process.returncode == -signal.SIGKILL
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) < LONG_STEPS, "the kill came after the end: nothing resumed"
    subprocess.run(train_command(tmp_path, LONG_STEPS), check=True, capture_output=True)
    _assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(uninterrupted, tmp_path):
    process = _interrupt(tmp_path, signal.SIGTERM, after_step=50)
    assert process.returncode == 0
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 50 <= saved < LONG_STEPS
    assert metrics.read(tmp_path / "metrics.jsonl")[-1]["step"] == saved
    subprocess.run(train_command(tmp_path, LONG_STEPS), check=True, capture_output=True)
    _assert_same_run(uninterrupted, tmp_path)


def test_resume_from_an_earlier_checkpoint_replays_the_run(tmp_path):
    """In process: a finished run, its last two checkpoints deleted, rerun from step 4."""
    config, run, reference = tiny_config(12), tmp_path / "run", tmp_path / "reference"
    train_and_evaluate(config, run)
    shutil.copytree(run, reference)
    for step in (8, 12):
        shutil.rmtree(run / "checkpoints" / str(step))
    resumed = train_and_evaluate(config, run)
    _assert_same_run(reference, run)
    assert set(resumed) == {"eval_top1", "eval_top5", "eval_loss"}
    assert (run / "curves.png").stat().st_size > 0
