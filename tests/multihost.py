"""Real `jax.distributed` jobs for the tests: local processes of one `wrcor-jax` command, the
coordinator on 127.0.0.1 at a free port, each process bounded in time and killed at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

LIMIT_S = 240  # a bound for any one process; each takes ~20 s on a quiet 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """Processes of one command, their stderr in files; `kill_all` ends what still runs."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.logs = tmp, [], []

    def start(self, args: list[str], name: str, **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.{len(self.logs)}.log"
        env = os.environ | {"JAX_PLATFORMS": "cpu"} | env
        with log.open("w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wrcor_jax.cli", *args], stderr=f, stdout=f, env=env
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def launch(self, args: list[str], port: int, rank: int, n: int = 2) -> subprocess.Popen:
        hosts = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
        return self.start([*args, *hosts, "--process-id", str(rank)], f"p{rank}")

    def finish(self, proc: subprocess.Popen, limit: float = LIMIT_S) -> tuple[int, str]:
        """Exit code and the lines of stderr that are not JAX's own logging."""
        code = proc.wait(timeout=limit)
        text = self.logs[self.procs.index(proc)].read_text()
        return code, "\n".join(line for line in text.splitlines() if line[:1] not in "IWE")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
