"""`wrcor-jax search` as a 2-process `jax.distributed` job on this machine (issue 14, item 3).

Each process runs the search and scores its share of every batch; both must end with the
history and result of a one-process run of the same command (`seconds` aside). Batched
evolution (population 4, 3 children a generation) on NB201 with the vote of two proxies.
"""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, SMALL_BATCH, require
from tests.multihost import LIMIT_S, Job, free_port
from wrcor_jax.distributed import search_dir


def _search_args(tmp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "search", "--algo", "evolution", "--population", "4", "--children", "3",
        "--budget", "10", "--seed", "3", "--proxies", "synflow,wrcor", "--vote", "hard",
        "--data", str(require(SAMPLE)), "--batch-size", str(SMALL_BATCH),
        "--out", str(out), "--compile-cache", str(tmp / "xla"), "--quiet", *extra,
    ]  # fmt: skip


def _history(folder: Path) -> list[list[str]]:
    """history.csv without its `seconds` column."""
    with (folder / "history.csv").open(newline="") as f:
        return [row[:-1] for row in csv.reader(f)]


def _result(folder: Path) -> dict:
    result = json.loads((folder / "result.json").read_text())
    return {k: v for k, v in result.items() if k != "seconds"}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A one-process search and a 2-process job of the same command."""
    tmp = tmp_path_factory.mktemp("multihost_search")
    job = Job(tmp)
    try:
        code, one = job.finish(job.start(_search_args(tmp, tmp / "one"), "one"))
        assert code == 0, one
        port = free_port()
        procs = [job.launch(_search_args(tmp, tmp / "two"), port, rank) for rank in (0, 1)]
        outcomes = [job.finish(proc) for proc in procs]
    finally:
        job.kill_all()
    return tmp, outcomes


def test_every_process_ends_with_the_one_process_search(searched):
    tmp, outcomes = searched
    for code, err in outcomes:
        assert code == 0, err
    one = tmp / "one"
    assert len(_history(one)) == 11  # the header and 10 evaluations
    for rank in (0, 1):
        folder = search_dir(tmp / "two", rank, 2)
        assert _history(folder) == _history(one)
        assert _result(folder) == _result(one)
    assert (tmp / "two" / "process-1-of-2" / "result.json").exists()


def test_the_processes_split_the_scoring(searched):
    """Each process computed only its share: 10 evaluations, 5 + 5 or close, none twice."""
    _, outcomes = searched
    scored = []
    for _, err in outcomes:
        line = next(line for line in err.splitlines() if line.startswith("best "))
        scored.append(int(line.split("(")[1].split(" scored")[0]))
    assert sum(scored) <= 10 and min(scored) >= 3, scored


def test_a_rerun_of_the_finished_job_replays_its_histories(searched, job):
    """The same command again: both processes replay their history, score nothing, and end
    with the same result."""
    tmp, _ = searched
    port = free_port()
    procs = [job.launch(_search_args(tmp, tmp / "two"), port, rank) for rank in (0, 1)]
    for rank, proc in enumerate(procs):
        code, err = job.finish(proc)
        assert code == 0, err
        assert "(0 scored," in err
        assert _result(search_dir(tmp / "two", rank, 2)) == _result(tmp / "one")


@pytest.mark.slow
def test_killed_process_rejoins_and_the_search_ends_the_same(searched, job):
    """Process 1 is killed (SIGKILL) after its first generation; restarted with the same
    arguments it replays its history, rejoins the job (process 0 waits for its share), and
    both end with the one-process result."""
    tmp, _ = searched
    out, port = tmp / "killed", free_port()
    first = job.launch(_search_args(tmp, out), port, 0)
    victim = job.launch(_search_args(tmp, out), port, 1)
    history = search_dir(out, 1, 2) / "history.csv"
    deadline = time.monotonic() + LIMIT_S
    while not (history.exists() and len(history.read_text().splitlines()) >= 6):
        assert victim.poll() is None and time.monotonic() < deadline, "no generation yet"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=LIMIT_S)
    assert len(history.read_text().splitlines()) < 11, "the search ended before the kill"
    code, err = job.finish(job.launch(_search_args(tmp, out), port, 1))
    assert code == 0, err
    assert job.finish(first)[0] == 0
    for rank in (0, 1):
        assert _history(search_dir(out, rank, 2)) == _history(tmp / "one")
        assert _result(search_dir(out, rank, 2)) == _result(tmp / "one")
