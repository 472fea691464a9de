"""A run's metrics: JSON lines in `WORKDIR/metrics.jsonl` and a PNG of the curves.

Train lines carry `step`, `loss`, `lr`, `grad_norm`, `images_per_s`; eval lines `step`,
`eval_top1`, `eval_top5`, `eval_loss`. A resumed run first drops the lines written after
the step it resumes from, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def read(path: Path) -> list[dict]:
    """The records of a metrics file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to `path`, after dropping those later than `resume_step`."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = [record for record in read(path) if record["step"] <= resume_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Throughput:
    """Images per second over the steps since the last reading; `pause_ended` leaves the
    time of an evaluation out."""

    def __init__(self, batch_size: int, step: int):
        self.batch_size, self.step, self.time = batch_size, step, time.perf_counter()

    def read(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.batch_size / (now - self.time)
        self.step, self.time = step, now
        return rate

    def pause_ended(self) -> None:
        self.time = time.perf_counter()


def plot(path: Path, png: Path) -> None:
    """Training loss and eval top-1/top-5 accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_top1" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="training loss", title="loss")
    for key in ("eval_top1", "eval_top5"):
        right.plot([r["step"] for r in evals], [100 * r[key] for r in evals], "o-", label=key)
    right.set(xlabel="step", ylabel="accuracy (%)", title="evaluation")
    right.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
