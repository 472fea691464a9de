"""Experiment: wrcor_jax's MobileNetV2-space scores beside the paper's own numbers, the twelve
architectures of shared/data/mbv2_reference_sample.csv that its code (kunjing96/ZSNAS-WRCor)
scored (issue #12 item 2).

The CSV's protocol (shared/data/README.md): the 10-class network of each architecture,
weights from `torch.manual_seed(42)`, one batch of 64 CIFAR-10 images chosen by
`default_rng(42).choice`, normalised, no crop or flip. We score the same batch
(`load_batch(..., augment=False)`, which draws exactly those indices) with `MBV2Scorer` and
our own PyTorch-default initialisation from seed 42 (`init_params`: torch's distributions,
not its random stream), so per-architecture values differ and ranks are compared: Spearman
and Kendall per proxy against the CSV's column, and the same for the hard vote of the three
(the paper's pairwise majority, `hard_vote_ranks`). FLOPs and parameters of the 1000-class
network must equal the CSV's exactly.

The bar for those correlations is the paper's code against itself: with `--reference-code
DIR --reference-seeds 43,42` it is rerun here, unmodified, with `torch.manual_seed(S)` on
the same batch; seed 43 gives its seed-to-seed agreement, seed 42 how far the CSV itself
reproduces on this machine.

    nice -n 10 python experiments/mbv2_reference_check.py --out results/mbv2_reference_check \\
        --reference-code /path/to/ZSNAS-WRCor --reference-seeds 43,42

OUT/report.json holds the command, the machine, every score and the correlations (rewritten
after each stage, so a stopped run keeps what it finished); the markdown table goes to
stdout and OUT/table.md; progress to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from search_nb201 import machine

from wrcor_jax import allocator
from wrcor_jax.benchmarks import rank_correlations
from wrcor_jax.jsonio import write_json
from wrcor_jax.spaces.mbv2.arch import MBV2Arch, format_arch, parse
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.vote import hard_vote_ranks

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_CSV = SHARED / "mbv2_reference_sample.csv"
DEFAULT_DATA = SHARED / "cifar10_sample.npz"
CSV_COLUMNS = {"wrcor": "wrcor_10cls", "synflow": "synflow_10cls", "jacob_cov": "jacob_cov_10cls"}
VOTE = ("synflow", "jacob_cov", "wrcor")
RESUME_KEYS = ("archs", "batch_size", "proxies")
Scorer = Callable[[MBV2Arch], list[float]]
NUM_CLASSES = 10
SEED = 42


def read_reference(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The CSV's rows (the first `limit`), the architecture parsed and numbers as numbers."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    return [
        {
            "arch": parse(row["arch"]),
            "flops": int(row["flops_1000cls"]),
            "params": int(row["params_1000cls"]),
            **{name: float(row[column]) for name, column in CSV_COLUMNS.items()},
        }
        for row in rows
    ]


def proxy_batch(data: Path, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The CSV's batch: `default_rng(42).choice` of the training images, only normalised."""
    from wrcor_jax.data import load_batch

    return load_batch("cifar10", batch_size, SEED, data=data, augment=False)


def jax_scorer(batch: tuple[np.ndarray, np.ndarray], proxies: Sequence[str], data: Path) -> Scorer:
    """`MBV2Scorer`'s scores of `proxies` on `batch`, one architecture per call.

    The scorer draws SPEC 2's augmented batch itself (the one searches use); for the CSV's
    protocol its batch (images, labels and the measurer holding them) is replaced by `batch`.
    The executables are released after each architecture: kept, the programs compiled for
    these twelve took the process to 17 GB and the OOM killer after six of them at batch 64.
    """
    import jax.numpy as jnp

    from wrcor_jax.compilation import release_executables
    from wrcor_jax.scoring import ScoreConfig
    from wrcor_jax.spaces.mbv2.measures import MBV2Measurer
    from wrcor_jax.spaces.mbv2.space import MBV2Scorer

    images, labels = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    config = ScoreConfig("mbv2", "cifar10", tuple(proxies), SEED, len(labels), str(data))
    scorer = MBV2Scorer(config)
    scorer.images, scorer.labels = images, labels
    scorer.measurer = MBV2Measurer(images, labels, NUM_CLASSES, SEED)

    def score(arch: MBV2Arch) -> list[float]:
        row = scorer.score([arch])[0]
        release_executables()
        return row

    return score


def paper_code_scorer(
    root: Path, batch: tuple[np.ndarray, np.ndarray], proxies: Sequence[str], seed: int
) -> Scorer:
    """The paper's code, unmodified, one architecture per call, with `torch.manual_seed(seed)`
    before building its network (its weights from torch's stream)."""
    import torch

    from wrcor_jax.torch_ref.paper_code import import_paper_code, paper_network, paper_scores

    code = import_paper_code(root)

    def score(arch: MBV2Arch) -> list[float]:
        torch.manual_seed(seed)
        net = paper_network(code, arch, NUM_CLASSES)
        values = paper_scores(code, net, *batch, NUM_CLASSES, proxies)
        return [values[name] for name in proxies]

    return score


def agreement(
    scores: Sequence[Sequence[float]], target: Sequence[Sequence[float]], proxies: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Spearman and Kendall of each proxy's column, and of the hard-vote rankings when the
    three voting proxies are all there."""
    ours, theirs = np.asarray(scores, np.float64), np.asarray(target, np.float64)
    out = {name: rank_correlations(ours[:, i], theirs[:, i]) for i, name in enumerate(proxies)}
    if set(VOTE) <= set(proxies):
        columns = [list(proxies).index(name) for name in VOTE]
        out["vote"] = rank_correlations(
            hard_vote_ranks(ours[:, columns]), hard_vote_ranks(theirs[:, columns])
        )
    return out


def cost_check(reference: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`describe`'s 1000-class FLOPs and parameters against the CSV's, row by row."""
    mismatches = []
    for row in reference:
        ours = describe(row["arch"], 1000)
        if (ours.flops, ours.params) != (row["flops"], row["params"]):
            mismatches.append(
                {
                    "arch": format_arch(row["arch"]),
                    "flops": [ours.flops, row["flops"]],
                    "params": [ours.params, row["params"]],
                }
            )
    return {
        "equal": len(reference) - len(mismatches),
        "of": len(reference),
        "mismatches": mismatches,
    }


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per proxy (and the vote): Spearman / Kendall of each scorer against the CSV."""
    sources = list(report["agreement"])
    lines = [
        "| proxy | "
        + " | ".join(f"{source} vs CSV: Spearman / Kendall" for source in sources)
        + " |",
        "|---|" + "---|" * len(sources),
    ]
    for name in report["agreement"][sources[0]]:
        cells = []
        for source in sources:
            result = report["agreement"][source][name]
            cells.append(f"{result['spearman']:.3f} / {result['kendall']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cost = report["cost"]
    lines.append("")
    lines.append(
        f"FLOPs and parameters (1000 classes) equal the CSV's for {cost['equal']} of"
        f" {cost['of']} architectures; {report['num_archs']} architectures, batch"
        f" {report['batch_size']}, {report['machine']}."
    )
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(f"[mbv2_reference_check] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="the paper's numbers")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 .npz sample")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="only the first N architectures")
    parser.add_argument(
        "--proxies",
        default=",".join(VOTE),
        type=lambda text: tuple(text.split(",")),
        help=f"comma-separated, of {', '.join(CSV_COLUMNS)}",
    )
    parser.add_argument("--reference-code", type=Path, help="a ZSNAS-WRCor checkout to rerun")
    parser.add_argument(
        "--reference-seeds",
        default=(),
        type=lambda text: tuple(int(s) for s in text.split(",")),
        help="torch seeds to rerun the paper's code with (needs --reference-code)",
    )
    parser.add_argument("--torch-threads", type=int, default=2, help="as the CSV was scored")
    args = parser.parse_args(argv)
    unknown = [name for name in args.proxies if name not in CSV_COLUMNS]
    if unknown:
        parser.error(f"unknown proxy {unknown[0]!r}; the CSV has {', '.join(CSV_COLUMNS)}")
    if args.reference_seeds and args.reference_code is None:
        parser.error("--reference-seeds needs --reference-code")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # torch's OpenMP pool fights other jobs on a shared machine unless idle threads sleep.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    reference = read_reference(args.csv, args.limit)
    archs = [row["arch"] for row in reference]
    target = [[row[name] for name in args.proxies] for row in reference]
    batch = proxy_batch(args.data, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    command = sys.argv[1:] if argv is None else list(argv)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "experiments/mbv2_reference_check.py", *command]),
        "machine": machine(),
        "num_archs": len(archs),
        "batch_size": args.batch_size,
        "proxies": list(args.proxies),
        "archs": [format_arch(arch) for arch in archs],
        "csv_scores": target,
        "cost": cost_check(reference),
        "scores": {},
        "seconds": {},
        "agreement": {},
    }

    path = args.out / "report.json"
    if path.exists():  # a stopped run of the same check continues where it stopped
        previous = json.loads(path.read_text())
        if all(previous.get(key) == report[key] for key in RESUME_KEYS):
            report["scores"], report["seconds"] = previous["scores"], previous["seconds"]

    def stage(source: str, make_scorer: Callable[[], Scorer]) -> None:
        """Score the archs `source` has not scored yet, saving the report after each."""
        scores = report["scores"].setdefault(source, [])
        seconds = report["seconds"].setdefault(source, [])
        score = make_scorer() if len(scores) < len(archs) else None
        for arch in archs[len(scores) :]:
            start = time.perf_counter()
            scores.append(score(arch))
            seconds.append(time.perf_counter() - start)
            _progress(f"{source} {len(scores)}/{len(archs)}: {seconds[-1]:.1f} s")
            report["agreement"][source] = agreement(scores, target[: len(scores)], args.proxies)
            write_json(path, report, indent=2)
        report["agreement"][source] = agreement(scores, target, args.proxies)

    stage("wrcor_jax", lambda: jax_scorer(batch, args.proxies, args.data))
    if args.reference_seeds:
        import torch

        torch.set_num_threads(args.torch_threads)
        report["torch_threads"] = args.torch_threads
    for seed in args.reference_seeds:
        make = partial(paper_code_scorer, args.reference_code, batch, args.proxies, seed)
        stage(f"paper code seed {seed}", make)
    write_json(path, report, indent=2)
    table = markdown_table(report)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    allocator.reexec_tuned()  # as the command line does: docs/timing.md
    main()
