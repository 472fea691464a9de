"""Scoring and search on many hosts through JAX's own distributed runtime (`jax.distributed`).

Every process of a job scores a fixed share of the architectures (every N-th of their sorted,
distinct canonical texts) into its own part file next to `--out`, `results.csv.part-I-of-N`,
with the guarantees of a single-process file: header and sidecar checked on resume, rows
appended chunk by chunk. A process that has finished its share publishes the part in the
coordination service's key-value store, so hosts need not share a filesystem; process 0
collects every part, merges them into `--out`, fills the vote columns over the merged rows and
publishes the outcome, which every process prints.

The service runs with JAX's recoverability switch on: a process killed mid-run and restarted
with the same arguments rejoins the job and resumes its part while the others wait. If process
0 (which hosts the service) dies, the whole job stops; re-running it resumes every part.

A search runs the same program in every process (`SharedFitness`): each scores its share of
every batch of candidates and reads the others' shares from the same store, so all take the
one-process course and write the same history and result.json, process 0 into `--out` and
process I into `--out/process-I-of-N` (`search_dir`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import socket
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wrcor_jax.results import CsvLog, ResultsError, ResultsFile, read_meta, write_meta
from wrcor_jax.scoring import (
    SAME_BATCH,
    RunSummary,
    ScoreConfig,
    batch_meta,
    check_votes,
    score_archs,
)
from wrcor_jax.spaces import get_space
from wrcor_jax.vote import VoteColumn, vote_scores

SHARE_KEYS = ("process", "num_processes", "share")  # what a part's sidecar adds
_PART_KEY, _OUTCOME_KEY = "wrcor_jax/part/{}", "wrcor_jax/merged"
_BATCH_KEY = "wrcor_jax/search/{}/{}"  # a batch's digest, the process that scored a share
_ERROR = "error: "  # what a failed process publishes instead of its part or the outcome


class CoordinatorUnreachable(ConnectionError):
    """The coordinator (process 0) did not answer within the initialisation timeout."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in a `jax.distributed` job."""

    process_id: int
    num_processes: int


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {text!r}") from None


def _wait_for(address: str, timeout: float) -> None:
    """Poll the coordinator's port: JAX aborts the whole interpreter with a stack trace when
    it cannot register, so an absent coordinator is caught here first."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachable(
                    f"cannot reach the coordinator {address} within {timeout:g} s: start "
                    "process 0 first, or check the address and port"
                ) from None
            time.sleep(0.25)


def connect(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> Cluster:
    """Join the job: the values given, else $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
    $JAX_PROCESS_ID, else JAX's own cluster detection (Cloud TPU, SLURM, Open MPI).

    Must run before anything touches a JAX backend.
    """
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if None not in (process_id, num_processes) and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    if coordinator and process_id:
        _wait_for(coordinator, timeout)
    jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=timeout
        )
    except ValueError as exc:  # nothing given and no cluster detected
        raise ValueError(
            f"no jax.distributed job found ({exc}): give --coordinator, --num-processes and "
            "--process-id, or set $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID"
        ) from None
    except RuntimeError as exc:  # JAX already started in this process (library use)
        raise ValueError(f"cannot join a jax.distributed job: {exc}") from None
    return Cluster(jax.process_index(), jax.process_count())


def part_path(out: str | Path, process_id: int, num_processes: int) -> Path:
    """Where process I of N writes its share: `results.csv.part-I-of-N`."""
    return Path(f"{out}.part-{process_id}-of-{num_processes}")


def share(archs: Sequence[str], process_id: int, num_processes: int) -> list[str]:
    """A process's architectures: every N-th of the sorted distinct texts, so every process
    derives the same split from the same command whatever the order of its input."""
    return sorted(set(archs))[process_id::num_processes]


@dataclasses.dataclass(frozen=True)
class Part:
    """The complete rows of one process's part file, and its sidecar."""

    name: str
    header: list[str]
    rows: list[list[str]]
    meta: dict[str, Any] | None

    @classmethod
    def read(cls, path: str | Path, header: Sequence[str] | None = None) -> Part:
        """A part file; `header` (default: the file's own first line) is checked."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"part file {path} does not exist")
        if header is None:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
        log = CsvLog(path, header, ResultsError, "it is a part of another configuration")
        return cls(str(path), list(header), log.rows(), read_meta(path))

    def to_bytes(self) -> bytes:
        """Compressed JSON, for the coordination service's key-value store."""
        return zlib.compress(json.dumps(dataclasses.asdict(self)).encode())

    @classmethod
    def from_bytes(cls, payload: bytes) -> Part:
        """The inverse of `to_bytes`."""
        return cls(**json.loads(zlib.decompress(payload)))


def _differences(meta: Mapping[str, Any], first: Mapping[str, Any]) -> list[str]:
    return [k for k in (*SAME_BATCH, "num_processes") if meta.get(k) != first.get(k)]


def check_parts(parts: Sequence[Part]) -> None:
    """Refuse parts that do not make one run: no sidecar, another batch or process count, a
    process missing or twice, or a share not finished."""
    if not parts:
        raise ValueError("no part file to merge")
    for part in parts:
        if part.meta is None or any(k not in part.meta for k in SHARE_KEYS):
            raise ResultsError(
                f"{part.name} has no part sidecar ({Path(part.name).name}.json): it is not a "
                "part of `wrcor-jax score --num-processes`"
            )
    first = parts[0]
    for part in parts[1:]:
        differs = _differences(part.meta, first.meta)
        if differs or part.header != first.header:
            what = ", ".join(f"{k} {part.meta.get(k)} vs {first.meta.get(k)}" for k in differs)
            raise ResultsError(
                f"{part.name} is a part of another configuration than {first.name} "
                f"({what or f'columns {part.header[1:]} vs {first.header[1:]}'})"
            )
    total = first.meta["num_processes"]
    ids = sorted(part.meta["process"] for part in parts)
    if ids != list(range(total)):
        raise ResultsError(
            f"the parts are processes {ids} of a {total}-process run: each of "
            f"0..{total - 1} must be given once"
        )
    for part in parts:
        if len(part.rows) < part.meta["share"]:
            raise ResultsError(
                f"{part.name} holds {len(part.rows)} of the {part.meta['share']} architectures "
                f"of its share: re-run process {part.meta['process']} with the same arguments "
                "to finish it"
            )


def merge_parts(parts: Sequence[Part], out: str | Path, votes: Sequence[VoteColumn] = ()) -> int:
    """Write the union of the parts' rows, and of `out`'s when it holds scores of the same
    configuration, into `out`, and fill the vote columns over all of them; returns the rows.

    The parts are checked first (`check_parts`); nothing is written when they are refused.
    """
    check_parts(parts)
    proxies = parts[0].header[1:]
    check_votes(votes, proxies)
    meta = {k: v for k, v in parts[0].meta.items() if k not in SHARE_KEYS}
    results = ResultsFile(out, proxies, [v.name for v in votes])
    existing = CsvLog(out, results.header, ResultsError, "choose another --out").rows()
    theirs = read_meta(out)
    if existing and theirs is not None and _differences(theirs, meta):
        raise ResultsError(f"{out} holds scores of another configuration: choose another --out")
    merged: dict[str, list[str]] = {}
    for row in [*existing, *(row for part in parts for row in part.rows)]:
        merged.setdefault(row[0], row[: 1 + len(proxies)] + [""] * len(votes))
    write_meta(out, meta)
    CsvLog(out, results.header).rewrite(list(merged.values()))
    if votes:
        results.fill_derived(lambda table: vote_scores(votes, proxies, table))
    return len(merged)


def _client():
    """The coordination service client of `jax.distributed` (what multihost_utils uses)."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialised")
    return distributed.global_state.client


def _failure(exc: Exception) -> str:
    """What a failed process publishes: its error's first line, which the others raise."""
    lines = str(exc).splitlines()
    return _ERROR + (lines[0] if lines else type(exc).__name__)


def _blocking_get(get, key: str, wait_s: float, what: str):
    try:
        return get(key, int(wait_s * 1000))
    except Exception as exc:  # JaxRuntimeError: DEADLINE_EXCEEDED or a peer's failure
        raise TimeoutError(f"waited {wait_s:g} s for {what}: {str(exc).splitlines()[0]}") from None


def _peer_payload(client, key: str, wait_s: float, process: int, what: str) -> bytes:
    """What another process published under `key`; its failure, published instead, is
    raised here."""
    payload = _blocking_get(client.blocking_key_value_get_bytes, key, wait_s, what)
    if payload.startswith(_ERROR.encode()):
        raise ResultsError(f"process {process} failed: {payload[len(_ERROR) :].decode()}")
    return payload


def score_share(
    archs: Sequence[str],
    config: ScoreConfig,
    out: str | Path,
    cluster: Cluster,
    progress: bool = True,
    votes: Sequence[VoteColumn] = (),
    wait_s: float = 86400.0,
) -> tuple[RunSummary, str]:
    """Score this process's share into its part file, then merge (process 0) or wait for the
    merge; returns the share's summary and the merge's outcome line.

    `wait_s` bounds each wait for another process (a part, the merge). A process that fails
    says so through the key-value store, so the others stop waiting and fail too.
    """
    rank, size = cluster.process_id, cluster.num_processes
    client = _client()
    try:
        try:
            check_votes(votes, config.proxies)
            space = get_space(config.space)
            texts = [space.format(space.read(a)) for a in archs]
            mine = share(texts, rank, size)
            part = part_path(out, rank, size)
            meta = {"process": rank, "num_processes": size, "share": len(mine)}
            summary = score_archs(mine, config, part, progress=progress, meta=meta)
            own = Part.read(part, ["arch", *config.proxies])
            if rank == 0:
                outcome = _lead(client, own, texts, config, out, size, votes, wait_s)
        except Exception as exc:  # any failure: the others would wait for this one's part
            if rank == 0:
                client.key_value_set(_OUTCOME_KEY, _failure(exc), True)
            else:
                client.key_value_set_bytes(_PART_KEY.format(rank), _failure(exc).encode(), True)
            raise
        if rank == 0:
            client.key_value_set(_OUTCOME_KEY, outcome, True)
            return summary, outcome
        client.key_value_set_bytes(_PART_KEY.format(rank), own.to_bytes(), True)
        outcome = _blocking_get(
            client.blocking_key_value_get, _OUTCOME_KEY, wait_s, "process 0's merge"
        )
        if outcome.startswith(_ERROR):
            raise ResultsError(f"process 0 failed: {outcome.removeprefix(_ERROR)}")
        return summary, outcome
    finally:
        _leave(client, cluster)


def _lead(
    client,
    own: Part,
    texts: Sequence[str],
    config: ScoreConfig,
    out: str | Path,
    size: int,
    votes: Sequence[VoteColumn],
    wait_s: float,
) -> str:
    """Process 0's part of the job: collect the others' parts, merge, check every
    architecture of the command is in `out`; returns the outcome line."""
    parts = [own]
    for other in range(1, size):
        payload = _peer_payload(
            client, _PART_KEY.format(other), wait_s, other, f"the part of process {other}"
        )
        parts.append(Part.from_bytes(payload))
    _check_same_batch(parts, config)
    rows = merge_parts(parts, out, votes)
    absent = set(texts) - ResultsFile(out, config.proxies, [v.name for v in votes]).done()
    if absent:
        raise ResultsError(f"the merged parts lack {len(absent)} architecture(s)")
    filled = f", {len(votes)} vote column(s) filled" if votes else ""
    return f"merged {rows} rows from {size} part(s) into {out}{filled}"


def _check_same_batch(parts: Sequence[Part], config: ScoreConfig) -> None:
    """Process 0 refuses a part another process scored with other arguments."""
    ours = batch_meta(config)
    for part in parts:
        differs = [k for k in SAME_BATCH if (part.meta or {}).get(k) != ours[k]]
        if differs:
            raise ResultsError(
                f"{part.name} was scored with "
                + ", ".join(f"{k} {part.meta.get(k)}" for k in differs)
                + ", process 0 with "
                + ", ".join(f"{k} {ours[k]}" for k in differs)
                + ": start every process with the same arguments"
            )


def leave() -> None:
    """Leave the `jax.distributed` job this process joined, however it joined (process 0
    last); nothing when it joined none."""
    import jax

    if jax.distributed.is_initialized():
        _leave(_client(), Cluster(jax.process_index(), jax.process_count()))


def _leave(client, cluster: Cluster) -> None:
    """Disconnect in order: process 0 hosts the service, so it leaves last (JAX aborts a
    process whose service vanishes before it disconnects). `get_live_nodes` returns once
    every other process has disconnected or died."""
    import jax

    if cluster.process_id == 0:
        client.get_live_nodes(list(range(cluster.num_processes)))
    jax.distributed.shutdown()


def search_dir(out: str | Path, process_id: int, num_processes: int) -> Path:
    """Where process I of N keeps its copy of a search: `--out` for process 0, else
    `OUT/process-I-of-N` (distinct even when the hosts share a filesystem)."""
    if process_id == 0:
        return Path(out)
    return Path(out) / f"process-{process_id}-of-{num_processes}"


class SharedFitness:
    """A search's fitness split over the processes of a job.

    Every process runs the same search program with the same seed, so all ask for the same
    batches in the same order: each scores its share of a batch (every N-th of its sorted
    distinct architectures, as `share`) with its own fitness and reads the other shares from
    the key-value store. Every process's search so sees the same scores as a one-process
    run. A batch's key is its content (and the fitness identity), so a process restarted
    behind the others reads back the batches they have finished instead of waiting.
    """

    def __init__(self, fitness: Any, cluster: Cluster, wait_s: float = 86400.0):
        self.fitness, self.cluster, self.wait_s = fitness, cluster, wait_s
        self.proxies, self.identity = fitness.proxies, fitness.identity
        self._client = _client()

    @property
    def space(self):
        """The fitness's space."""
        return self.fitness.space

    def score(self, candidates: Sequence[Any]) -> list[list[float]]:
        """One row of scores per candidate, the same in every process."""
        rank, size = self.cluster.process_id, self.cluster.num_processes
        texts = [self.space.format(arch) for arch in candidates]
        by_text = dict(zip(texts, candidates, strict=True))
        digest = hashlib.sha256("\n".join([self.identity, *sorted(by_text)]).encode())
        key = _BATCH_KEY.format(digest.hexdigest()[:24], "{}")
        mine = share(texts, rank, size)
        try:
            rows = self.fitness.score([by_text[text] for text in mine]) if mine else []
        except Exception as exc:  # any failure: the others would wait for this share
            self._client.key_value_set_bytes(key.format(rank), _failure(exc).encode(), True)
            raise
        self._client.key_value_set_bytes(key.format(rank), json.dumps(rows).encode(), True)
        table = dict(zip(mine, rows, strict=True))
        for other in range(size):
            if other == rank:
                continue
            payload = _peer_payload(
                self._client, key.format(other), self.wait_s, other, f"process {other}'s scores"
            )
            table.update(zip(share(texts, other, size), json.loads(payload), strict=True))
        return [table[text] for text in texts]
