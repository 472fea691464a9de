"""`wrcor-jax score` as a 2-process `jax.distributed` job on this machine (issue 14, item 2).

The processes are real: separate interpreters on the CPU backend, process 0 hosting the
coordinator on 127.0.0.1 at a free port. Every subprocess is bounded in time and killed in
`finally`. The one-process reference and the job share one compile cache, so only the first
run compiles.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, SMALL_BATCH, require
from tests.multihost import LIMIT_S, Job, free_port
from wrcor_jax import distributed
from wrcor_jax.cli import main
from wrcor_jax.distributed import part_path, share
from wrcor_jax.results import ResultsFile
from wrcor_jax.scoring import ScoreConfig
from wrcor_jax.spaces import get_space

PROXIES = "wrcor,act_cor,vote(wrcor,act_cor)"


def _score_args(tmp: Path, out: Path, archs: str = "archs.txt") -> list[str]:
    return [
        "score",
        "--archs",
        str(tmp / archs),
        "--data",
        str(require(SAMPLE)),
        "--batch-size",
        str(SMALL_BATCH),
        "--proxies",
        PROXIES,
        "--chunk-size",
        "1",
        "--out",
        str(out),
        "--compile-cache",
        str(tmp / "xla"),
        "--quiet",
    ]


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        header, *rows = csv.reader(f)
    return header, sorted(rows)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A one-process run (its stderr) and a 2-process job of the same command on 6 archs."""
    tmp = tmp_path_factory.mktemp("multihost")
    archs = get_space("nb201").draw(6, 0)
    (tmp / "archs.txt").write_text("\n".join(archs) + "\n")
    job = Job(tmp)
    try:
        code, one = job.finish(job.start(_score_args(tmp, tmp / "one.csv"), "one"))
        assert code == 0, one
        port = free_port()
        args = _score_args(tmp, tmp / "two.csv")
        procs = [job.launch(args, port, rank) for rank in (0, 1)]
        outcomes = [job.finish(proc) for proc in procs]
    finally:
        job.kill_all()
    return tmp, archs, one, outcomes


def test_engine_auto_is_composed_on_cpu(scored):
    assert "archs/s, composed engine, " in scored[2]


def test_two_processes_merge_into_the_one_process_file(scored):
    tmp, archs, _, outcomes = scored
    for rank, (code, err) in enumerate(outcomes):
        assert code == 0, err
        assert f"process {rank} of 2: scored 3 archs" in err
        assert f"merged 6 rows from 2 part(s) into {tmp / 'two.csv'}" in err.splitlines()[-1]
    assert _rows(tmp / "two.csv") == _rows(tmp / "one.csv")
    canonical = [get_space("nb201").format(get_space("nb201").read(a)) for a in archs]
    for rank in (0, 1):
        part = part_path(tmp / "two.csv", rank, 2)
        header, rows = _rows(part)
        assert header == ["arch", "wrcor", "act_cor"]
        assert [row[0] for row in rows] == sorted(share(canonical, rank, 2))
        meta = json.loads(Path(f"{part}.json").read_text())
        assert meta | {"process": rank, "num_processes": 2, "share": 3} == meta
    one, two = (json.loads((tmp / f"{n}.csv.json").read_text()) for n in ("one", "two"))
    assert one == two


def test_merge_command_rebuilds_the_file_from_the_parts(scored, capsys):
    tmp = scored[0]
    parts = [str(part_path(tmp / "two.csv", rank, 2)) for rank in (0, 1)]
    out = tmp / "by_hand.csv"
    assert main(["merge", *parts, "--out", str(out), "--proxies", PROXIES]) == 0
    assert _rows(out) == _rows(tmp / "one.csv")
    assert "merged 6 rows from 2 part(s)" in capsys.readouterr().err


def _foreign(tmp: Path, change: dict) -> str:
    """A copy of part 1 whose sidecar says it was scored otherwise."""
    part = part_path(tmp / "two.csv", 1, 2)
    copy = tmp / f"foreign.{'_'.join(change)}.part-1-of-2"
    shutil.copy(part, copy)
    meta = json.loads(Path(f"{part}.json").read_text())
    Path(f"{copy}.json").write_text(json.dumps(meta | change))
    return str(copy)


@pytest.mark.parametrize(
    "second, message",
    [
        (lambda tmp: _foreign(tmp, {"seed": 7}), "another configuration"),
        (lambda tmp: _foreign(tmp, {"num_processes": 3}), "another configuration"),
        (lambda tmp: _foreign(tmp, {"share": 4}), "re-run process 1"),
        (lambda tmp: str(part_path(tmp / "two.csv", 0, 2)), "must be given once"),
        (lambda tmp: str(tmp / "one.csv"), "has no part sidecar"),
    ],
)
def test_merge_refuses_parts_that_are_not_one_run(scored, capsys, second, message):
    tmp = scored[0]
    first = str(part_path(tmp / "two.csv", 0, 2))
    out = tmp / "refused.csv"
    assert main(["merge", first, second(tmp), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("wrcor-jax: error:") and "\n" not in err and message in err
    assert not out.exists()


def test_stale_part_of_another_seed_fails_both_processes_in_one_line(scored, job):
    """Process 1 refuses its part file scored with another seed; process 0 learns it through
    the coordination service instead of waiting, and nothing is merged."""
    tmp = scored[0]
    out = tmp / "stale.csv"
    stale = part_path(out, 1, 2)
    shutil.copy(_foreign(tmp, {"seed": 7}), stale)
    shutil.copy(f"{_foreign(tmp, {'seed': 7})}.json", f"{stale}.json")
    args, port = _score_args(tmp, out), free_port()
    procs = [job.launch(args, port, rank) for rank in (0, 1)]
    (code0, err0), (code1, err1) = (job.finish(proc) for proc in procs)
    assert code1 == 1 and err1.splitlines()[-1].startswith("wrcor-jax: error: ")
    assert "was scored with seed 7" in err1.splitlines()[-1]
    assert code0 == 1 and "error: process 1 failed: " in err0.splitlines()[-1]
    assert not out.exists()


def test_unreachable_coordinator_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "archs.txt").write_text(get_space("nb201").draw(1, 0)[0] + "\n")
    args = _score_args(tmp_path, tmp_path / "r.csv")
    hosts = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    start = time.monotonic()
    code = main([*args, *hosts, "--process-id", "1", "--init-timeout", "2"])
    assert code == 1 and time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("wrcor-jax: error: cannot reach the coordinator 127.0.0.1:")
    assert "\n" not in err
    assert not (tmp_path / "r.csv.part-1-of-2").exists()


def test_distributed_auto_without_a_job_fails_in_one_line(tmp_path):
    """In a fresh process, as a user runs it: this one's JAX backend is already started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    (tmp_path / "archs.txt").write_text(get_space("nb201").draw(1, 0)[0] + "\n")
    args = _score_args(tmp_path, tmp_path / "r.csv")
    command = [sys.executable, "-m", "wrcor_jax.cli", *args, "--distributed", "auto"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    assert run.returncode == 1
    err = run.stderr.strip().splitlines()[-1]
    assert err.startswith("wrcor-jax: error: no jax.distributed job found")
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.slow
def test_killed_process_resumes_its_part(scored, job):
    """Process 1 is killed (SIGKILL) after its first row; restarted with the same arguments
    it rejoins the job, scores only what its part lacks, and the merge is the same."""
    tmp = scored[0]
    out = tmp / "killed.csv"
    args, port = _score_args(tmp, out), free_port()
    first = job.launch(args, port, 0)
    victim = job.launch(args, port, 1)
    part = part_path(out, 1, 2)
    deadline = time.monotonic() + LIMIT_S
    while not (part.exists() and len(part.read_text().splitlines()) > 1):
        assert victim.poll() is None and time.monotonic() < deadline, "no row before the kill"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=LIMIT_S)
    kept = len(ResultsFile(part, ["wrcor", "act_cor"]).done())
    code, err = job.finish(job.launch(args, port, 1))
    assert code == 0, err
    assert f"({kept} already in the file)" in err
    assert job.finish(first)[0] == 0
    assert _rows(out) == _rows(tmp / "one.csv")


@pytest.mark.slow
def test_vmap_engine_spreads_a_chunk_over_4_local_devices(scored, job):
    """NB201 (MobileNetV2 splits its batch instead: the next test): 3 archs in a chunk of 4 (one
    slot of padding) over 4 forced host devices score as the composed engine does, to
    test_vmap_engine's tolerance. One vmap compilation: ~8 min on 2 loaded cores."""
    tmp, archs, _, _ = scored
    (tmp / "three.txt").write_text("\n".join(archs[:3]) + "\n")
    out = tmp / "vmap4.csv"
    args = [*_score_args(tmp, out, "three.txt"), "--engine", "vmap", "--chunk-size", "4"]
    flags = "--xla_force_host_platform_device_count=4"
    code, err = job.finish(job.start(args, "vmap4", XLA_FLAGS=flags), limit=1800)
    assert code == 0, err
    assert "vmap engine on 4 device(s)" in err
    composed = {row[0]: row for row in _rows(tmp / "one.csv")[1]}
    for arch, *scores in _rows(out)[1]:
        expected = [float(v) for v in composed[arch][1:3]]
        assert [float(v) for v in scores[:2]] == pytest.approx(expected, rel=1e-5)


# Three archs that fill no more than two 3x3 slots per edge in pairs (`ChunkShape.for_archs(8)`
# has 2): the chunked engine plans two chunks, one per device.
CONV_HEAVY = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "|nor_conv_1x1~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|avg_pool_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
]


@pytest.mark.slow
def test_chunked_engine_runs_a_chunk_on_each_of_2_local_devices(tmp_path, job, capsys):
    """The accelerator engine on 2 forced host devices (one program, the chunks' axis split
    over them) scores as the composed engine does. ~1 min on 2 loaded cores."""
    (tmp_path / "heavy.txt").write_text("\n".join(CONV_HEAVY) + "\n")
    composed = tmp_path / "composed.csv"
    assert main([*_score_args(tmp_path, composed, "heavy.txt"), "--engine", "composed"]) == 0
    out = tmp_path / "chunked2.csv"
    args = [*_score_args(tmp_path, out, "heavy.txt"), "--engine", "chunked"]
    flags = "--xla_force_host_platform_device_count=2"
    code, err = job.finish(job.start(args, "chunked2", XLA_FLAGS=flags), limit=900)
    assert code == 0, err
    assert "chunked engine on 2 device(s)" in err
    expected = {arch: [float(v) for v in scores[:2]] for arch, *scores in _rows(composed)[1]}
    for arch, *scores in _rows(out)[1]:
        assert [float(v) for v in scores[:2]] == pytest.approx(expected[arch], rel=1e-5)


@pytest.mark.slow
def test_mbv2_batch_spreads_over_4_local_devices(tmp_path, job):
    """MobileNetV2: the batch split over 4 forced host devices (one program per piece for
    all four) scores as one device does. Measured on a small architecture, batch 8: wrcor
    7e-9, act_cor 1.7e-6, synflow 0, jacob_cov 2e-8 relative."""
    arch = (
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)"
        "SuperResIDWE4K5(16,24,2,16,2)SuperConvK1BNRELU(24,32,1,1)@32"
    )
    (tmp_path / "archs.txt").write_text(arch + "\n")
    rows = {}
    for devices in (1, 4):
        out = tmp_path / f"mbv2_{devices}.csv"
        args = [
            *_score_args(tmp_path, out), "--space", "mbv2", "--batch-size", "8",
            "--proxies", "wrcor,act_cor,synflow,jacob_cov",
        ]  # fmt: skip
        flags = f"--xla_force_host_platform_device_count={devices}"
        code, err = job.finish(job.start(args, f"mbv2_{devices}", XLA_FLAGS=flags), limit=900)
        assert code == 0, err
        assert ("composed engine on 4 device(s)" in err) == (devices == 4), err
        rows[devices] = [float(v) for v in _rows(out)[1][0][1:]]
    assert rows[4] == pytest.approx(rows[1], rel=1e-5)


@pytest.mark.slow
def test_mbv2_processes_each_score_on_the_native_calls(tmp_path, job):
    """MobileNetV2 in a 2-process job: each process scores its share on its own device, with
    the native CPU calls (other processes' devices do not switch them off), as one process
    scores alone."""
    archs = [
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)"
        "SuperResIDWE4K5(16,24,2,16,2)SuperConvK1BNRELU(24,32,1,1)@32",
        "SuperConvK3BNRELU(3,16,2,1)SuperResIDWE6K7(16,24,2,8,1)"
        "SuperResIDWE1K3(24,24,1,16,1)SuperConvK1BNRELU(24,48,1,1)@48",
    ]
    (tmp_path / "archs.txt").write_text("\n".join(archs) + "\n")
    mbv2 = ["--space", "mbv2", "--batch-size", "8", "--proxies", "wrcor,synflow"]
    code, one = job.finish(job.start([*_score_args(tmp_path, tmp_path / "one.csv"), *mbv2], "one"))
    assert code == 0, one
    port = free_port()
    args = [*_score_args(tmp_path, tmp_path / "two.csv"), *mbv2]
    procs = [job.launch(args, port, rank) for rank in (0, 1)]
    outcomes = [job.finish(proc) for proc in procs]
    for code, err in [(0, one), *outcomes]:
        assert code == 0, err
        assert "composed engine, native CPU calls" in err, err
    assert _rows(tmp_path / "two.csv") == _rows(tmp_path / "one.csv")


class _RecordingClient:
    """The coordination client's publishing calls, recorded."""

    def __init__(self):
        self.published = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool) -> None:
        self.published[key] = value

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool) -> None:
        self.published[key] = value.decode()


def _fail(*_, **__):
    """Scoring that fails as no input check foresees."""
    raise RuntimeError("INVALID_ARGUMENT: a device's failure\nits details")


class _Broken:
    """A fitness that fails so."""

    proxies, identity, space = ("wrcor",), "broken", get_space("nb201")
    score = staticmethod(_fail)


@pytest.mark.parametrize("rank, key", [(0, distributed._OUTCOME_KEY), (1, "wrcor_jax/part/1")])
def test_an_unforeseen_failure_is_published_so_no_process_waits_for_it(
    tmp_path, monkeypatch, rank, key
):
    """Any exception, not only bad input, reaches the other processes (a runtime error in
    process 0 once left process 1 waiting a day for the merge), as its first line."""
    client = _RecordingClient()
    monkeypatch.setattr(distributed, "_client", lambda: client)
    monkeypatch.setattr(distributed, "_leave", lambda *_: None)
    monkeypatch.setattr(distributed, "score_archs", _fail)
    config = ScoreConfig(proxies=("wrcor",), batch_size=SMALL_BATCH)
    cluster, space = distributed.Cluster(rank, 2), get_space("nb201")
    archs = space.draw(2, 0)  # one for each process
    with pytest.raises(RuntimeError, match="a device's failure"):
        distributed.score_share(archs, config, tmp_path / "r.csv", cluster)
    assert client.published == {key: "error: INVALID_ARGUMENT: a device's failure"}
    with pytest.raises(RuntimeError):
        distributed.SharedFitness(_Broken(), cluster).score([space.read(a) for a in archs])
    assert list(client.published.values())[-1] == "error: INVALID_ARGUMENT: a device's failure"
