"""`wrcor-jax train` as a 2-process `jax.distributed` job on this machine (issue 14, item 4).

The processes are real: separate interpreters on the CPU backend (one device each, gloo for
the collectives), process 0 hosting the coordinator on 127.0.0.1 at a free port and joining
through the options, process 1 through $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
$JAX_PROCESS_ID alone. Every subprocess is bounded in time and killed in `finally`.

The job runs the one-process run with the same global batch of 16: the same records and
augmentations (interleaved over the processes), mixup's same pairs. The losses agree to
float32 rounding of the reductions split over the 2 processes' devices: measured here 0.0
(bitwise) for the loss and at most 2.3e-7 relative for the gradient norm over the 6 steps
(tolerance 1e-5, as tests/test_train_sharding.py); the final parameters at most 1.2e-7 apart
(tolerance 1e-6); eval top-1 equal. ~65 s on 2 loaded cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SAMPLE, require
from train_tiny import TINY

from tests.multihost import Job, free_port
from wrcor_jax.train import train

RTOL = 1e-5


def _train_args(workdir: Path) -> list[str]:
    return [
        "train", "--arch", TINY, "--dataset", "cifar10", "--data", str(require(SAMPLE)),
        "--workdir", str(workdir), "--steps", "6", "--batch-size", "16",
        "--set", "log_every_steps=1", "--set", "mixup_alpha=0.4",
    ]  # fmt: skip


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _job(job: Job, args: list[str]) -> list[tuple[int, str]]:
    """Process 0 joins through the options, process 1 through JAX's variables alone."""
    port = free_port()
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    procs = [job.launch(args, port, 0), job.start(args, "p1", **env, JAX_PROCESS_ID="1")]
    return [job.finish(proc) for proc in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run, the 2-process job of the same command, and that job run again
    (it restores its last checkpoint, data iterators included, and has nothing left to do):
    the workdir, the metrics file after the first job, the outputs."""
    tmp = tmp_path_factory.mktemp("train_multihost")
    job = Job(tmp)
    args = _train_args(tmp / "two")
    try:
        code, one = job.finish(job.start(_train_args(tmp / "one"), "one"))
        assert code == 0, one
        first = _job(job, args)
        written = (tmp / "two" / "metrics.jsonl").read_text()
        again = _job(job, args)
    finally:
        job.kill_all()
    for code, err in (*first, *again):
        assert code == 0, err
    return tmp, written, [one, *(out for _, out in first)], [out for _, out in again]


@pytest.mark.slow
def test_two_processes_train_as_one(runs):
    tmp, _, outs, _ = runs
    one, two = _records(tmp / "one"), _records(tmp / "two")
    # process 0 alone writes metrics.jsonl: 6 losses and one evaluation, nothing twice
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6, 6]
    for key in ("loss", "grad_norm", "lr"):
        values = [[r[key] for r in run if key in r] for run in (one, two)]
        np.testing.assert_allclose(values[1], values[0], rtol=RTOL, err_msg=key)
    evals = [[r for r in run if "eval_top1" in r][-1] for run in (one, two)]
    assert evals[1]["eval_top1"] == evals[0]["eval_top1"]
    np.testing.assert_allclose(evals[1]["eval_loss"], evals[0]["eval_loss"], rtol=RTOL)
    final = json.dumps({k: v for k, v in evals[1].items() if k != "step"})
    assert [out.splitlines()[-1] for out in outs] == [final] * 3  # every process prints it
    assert sorted(p.name for p in (tmp / "two" / "checkpoints" / "6" / "data").iterdir()) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


@pytest.mark.slow
def test_job_run_again_restores_and_changes_nothing(runs):
    tmp, written, outs, again = runs
    assert (tmp / "two" / "metrics.jsonl").read_text() == written
    final = outs[1].splitlines()[-1]
    assert [out.splitlines()[-1] for out in again] == [final] * 2


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(runs):
    """The job's last checkpoint restores here (one process) to the one-process run's
    parameters, and evaluates to the job's own final evaluation."""
    tmp = runs[0]
    mesh = train.data_mesh()
    (_, _, one, step_one), (_, _, two, step_two) = (
        train.restore_run(tmp / name, mesh) for name in ("one", "two")
    )
    assert step_one == step_two == 6
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=RTOL, atol=1e-6)
    result = train.evaluate_checkpoint(tmp / "two")
    expected = [r for r in _records(tmp / "two") if "eval_top1" in r][-1]
    assert result["eval_top1"] == expected["eval_top1"]
    np.testing.assert_allclose(result["eval_loss"], expected["eval_loss"], rtol=RTOL)


class _Device:
    def __init__(self, process_index: int):
        self.process_index = process_index


class _Sharding:
    """What `canonical_order` reads of a NamedSharding: 4 devices of 4 rows each."""

    def __init__(self, processes: list[int]):
        self.devices = [_Device(p) for p in processes]

    def devices_indices_map(self, shape):
        return {d: (slice(4 * i, 4 * i + 4),) for i, d in enumerate(self.devices)}


@pytest.mark.parametrize(
    "processes, assembled",
    [
        ([0, 0, 1, 1], lambda r, k: 8 * r + k),  # process-major, as jax.make_mesh lays it
        ([1, 1, 0, 0], lambda r, k: 8 * (1 - r) + k),
        ([0, 1, 0, 1], lambda r, k: 8 * (k // 4) + 4 * r + k % 4),
    ],
)
def test_canonical_order_reads_where_each_process_rows_are(monkeypatch, processes, assembled):
    """Canonical row t = 2k + r (process r's local row k) sits where the sharding puts that
    process's k-th row; one process needs no order."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    order = train.canonical_order(_Sharding(processes), 16)
    assert order.tolist() == [assembled(t % 2, t // 2) for t in range(16)]
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert train.canonical_order(_Sharding([0] * 4), 16) is None
