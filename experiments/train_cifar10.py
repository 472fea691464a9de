"""Train the searched architecture on real CIFAR-10 images with our trainer, then the same
steps in the PyTorch twin (eager), side by side (issue 13, item 7).

    python experiments/train_cifar10.py --out results/train_cifar10 --minutes 20

EA_our_vote_600M (SPEC 8) at `--resolution` (32 by default: the network resizes its input to
the architecture's resolution, so this sets both) on the shared sample (10k train, 2k test),
with the trainer's `cifar10` recipe (`--config`, `--set key=value` as `wrcor-jax train`).
Three phases, each in its own interpreter (its own peak RSS), one after another:

1. plan: the number of steps. `--steps N` or `--epochs E` fix it; otherwise a few jitted
   trainer steps are timed and the run gets as many whole epochs as `--minutes` of JAX
   training allow (fewer than one epoch: as many steps). Saved in OUT/plan.json with the
   config, so a rerun trains the same run.
2. jax: `train_and_evaluate(config, OUT/jax)`, the trainer itself (metrics.jsonl with one
   line per step, a checkpoint per epoch, eval per epoch, curves.png).
3. torch_eager: `torch_ref.train` on the same config: the same initial weights (the
   trainer's `create_train_state`, loaded into the twin), the same batches in the same order
   (the trainer's grain loader with the same seed), the same learning rate per step and
   mixup draws, the same eval batches; `--torch-threads` threads (default: the cores).

Rows (OUT/report.json, rewritten after every phase; a rerun skips finished phases and resumes
an interrupted one from its last checkpoint): `impl`, `images_per_s` (steady steps: loading
the batch and the step), `step_median_s`, `step_p90_s`, `first_step_s` (compilation
included for jax), `steps`, `epochs`, `test_top1`, `peak_rss_mb`, `wall_s`,
`ratio_vs_torch_eager` (torch eager's median step over this row's), plus the machine and its
load averages (the cores are shared). OUT/curves.png holds both curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_sample.npz"
IMPLS = ("jax", "torch_eager")
PLAN_FILE, REPORT_FILE, CURVES_FILE = "plan.json", "report.json", "curves.png"
RESULT_FILE = "result.json"
TORCH_CHECKPOINT = "checkpoint.pt"
NUM_CLASSES = 10  # CIFAR-10


# --------------------------------------------------------------------------- plan


def plan_steps(step_s: float, eval_s: float, steps_per_epoch: int, budget_s: float) -> int:
    """Steps that fit `budget_s` at `step_s` a step and `eval_s` an evaluation per epoch:
    whole epochs when at least one fits, else as many steps as fit (at least 1)."""
    epochs = math.floor(budget_s / (steps_per_epoch * step_s + eval_s))
    if epochs >= 1:
        return epochs * steps_per_epoch
    return max(1, math.floor((budget_s - eval_s) / step_s))


def _base_config(args: argparse.Namespace):
    """The run's config before its length: the preset, --set, then this experiment's
    choices (arch at --resolution, the .npz, batch, seed, a log line per step)."""
    from wrcor_jax.spaces import get_space
    from wrcor_jax.spaces.mbv2.arch import LANDMARKS
    from wrcor_jax.train import configs
    from wrcor_jax.train.models import with_resolution

    arch = get_space("mbv2").canonical(LANDMARKS.get(args.arch, args.arch))
    arch = with_resolution("mbv2", arch, args.resolution)
    config = configs.override(configs.load(args.config), args.set)
    data = dataclasses.replace(
        config.data, dataset="cifar10", data=str(args.data), resolution=args.resolution
    )
    return dataclasses.replace(
        config,
        space="mbv2",
        arch=arch,
        data=data,
        batch_size=args.batch_size,
        seed=args.seed,
        log_every_steps=1,
        eval_every_steps=None,
    )


def _calibrate(config, count: int) -> dict:
    """Median seconds of the trainer's jitted step (batch loading included) over `count`
    steps after the first, and the first (compilation)."""
    import functools

    import jax

    from wrcor_jax.train import input_pipeline, train
    from wrcor_jax.train.models import build_network

    num_train, _, num_classes = input_pipeline.dataset_info(config.data)
    network = build_network(config.space, config.arch, num_classes, config.compute_dtype)
    schedule = train.create_learning_rate_fn(config, num_train // config.batch_size, 1000)
    state = train.create_train_state(config, network, schedule)
    step_fn = jax.jit(
        functools.partial(
            train.train_step, network=network, config=config, learning_rate_fn=schedule
        ),
        donate_argnums=0,
    )
    batches = iter(input_pipeline.train_loader(config.data, config.batch_size, config.seed))
    seconds = []
    for _ in range(count + 1):
        start = time.perf_counter()
        state, metrics = step_fn(state, next(batches))
        float(metrics["loss"])
        seconds.append(time.perf_counter() - start)
    return {"first_step_s": seconds[0], "step_s": statistics.median(seconds[1:])}


def _plan_worker(args: argparse.Namespace) -> dict:
    from wrcor_jax.train import input_pipeline

    config = _base_config(args)
    num_train, num_eval, _ = input_pipeline.dataset_info(config.data)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} exceeds the {num_train} train images")
    calibration = None
    if args.steps:
        steps = args.steps
    elif args.epochs:
        steps = math.ceil(args.epochs * steps_per_epoch)
    else:
        calibration = _calibrate(config, args.calibration_steps)
        # An evaluation: the forward pass alone over the eval split, about a third of a step
        # per batch (an estimate: the plan only sizes the run).
        eval_s = math.ceil(num_eval / config.batch_size) * calibration["step_s"] / 3
        calibration["eval_s_estimate"] = eval_s
        steps = plan_steps(calibration["step_s"], eval_s, steps_per_epoch, 60 * args.minutes)
    config = dataclasses.replace(
        config, num_steps=steps, checkpoint_every_steps=min(steps_per_epoch, steps)
    )
    return {
        "config": json.loads(config.to_json()),
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "num_train": num_train,
        "num_eval": num_eval,
        "minutes": None if (args.steps or args.epochs) else args.minutes,
        "calibration": calibration,
    }


# --------------------------------------------------------------------------- workers


def _load_plan(out: Path):
    from wrcor_jax.train import configs

    plan = json.loads((out / PLAN_FILE).read_text())
    return plan, configs.from_json(json.dumps(plan["config"]))


def _jax_worker(args: argparse.Namespace) -> dict:
    from wrcor_jax.train.train import train_and_evaluate

    _, config = _load_plan(args.out)
    return train_and_evaluate(config, args.out / "jax")


def _torch_worker(args: argparse.Namespace) -> dict:
    import torch

    from wrcor_jax.torch_ref.train import create_trainer, train_loop
    from wrcor_jax.train import input_pipeline, metrics, train
    from wrcor_jax.train.models import build_network

    torch.set_num_threads(args.torch_threads)
    plan, config = _load_plan(args.out)
    workdir = args.out / "torch_eager"
    workdir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = plan["steps_per_epoch"]
    _, _, num_classes = input_pipeline.dataset_info(config.data)
    network = build_network(config.space, config.arch, num_classes, config.compute_dtype)
    schedule = train.create_learning_rate_fn(config, steps_per_epoch, plan["steps"])
    initial = train.create_train_state(config, network, schedule)  # the JAX run's step 0
    trainer = create_trainer(config, initial.params, num_classes, schedule)
    batches = iter(input_pipeline.train_loader(config.data, config.batch_size, config.seed))
    checkpoint = workdir / TORCH_CHECKPOINT
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        trainer.load_state_dict(saved["trainer"])
        batches.set_state(saved["data"])
    log = metrics.MetricsLog(workdir / train.METRICS_FILE, trainer.step)

    def save(step: int) -> None:
        del step
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        torch.save({"trainer": trainer.state_dict(), "data": batches.get_state()}, tmp)
        tmp.replace(checkpoint)

    result = train_loop(
        trainer,
        batches,
        plan["steps"],
        eval_every=steps_per_epoch,
        eval_batches=lambda: input_pipeline.eval_batches(config.data, config.batch_size),
        on_record=log.write,
        on_eval=save,
    )
    if not result:  # restored after the last step: its evaluation is in the log
        result = [r for r in metrics.read(workdir / train.METRICS_FILE) if "eval_top1" in r][-1]
    return {key: value for key, value in result.items() if key != "step"}


WORKERS = {"plan": _plan_worker, "jax": _jax_worker, "torch_eager": _torch_worker}


def _run_worker(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    result = {"result": WORKERS[args.worker](args)}
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.worker_out).write_text(json.dumps(result))


def _spawn(args: argparse.Namespace, name: str, out: Path) -> dict:
    """Run one phase in a fresh interpreter; its result (with the load around it) is saved
    to `out`, which marks the phase done."""
    command = [sys.executable, __file__, *args.argv, "--worker", name, "--worker-out", str(out)]
    load = os.getloadavg()
    subprocess.run(command, check=True, timeout=args.timeout)
    result = json.loads(out.read_text())
    result["load_average_before_after"] = [load, os.getloadavg()]
    out.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- report


def _records(impl_dir: Path) -> tuple[list[dict], list[dict]]:
    """An implementation's per-step records and its eval records (its metrics.jsonl)."""
    from wrcor_jax.train import metrics

    records = metrics.read(impl_dir / "metrics.jsonl")
    return [r for r in records if "loss" in r], [r for r in records if "eval_top1" in r]


def _step_seconds(record: dict, batch_size: int) -> float:
    """A step's seconds: torch logs them, the trainer logs images/s over the step."""
    return record["step_s"] if "step_s" in record else batch_size / record["images_per_s"]


def summarise(name: str, raw: dict, impl_dir: Path, plan: dict) -> dict:
    """One implementation's row from its metrics and its worker's result."""
    import numpy as np

    batch_size = plan["config"]["batch_size"]
    steps, evals = _records(impl_dir)
    steady = [_step_seconds(r, batch_size) for r in steps if r["step"] > 1]
    first = [_step_seconds(r, batch_size) for r in steps if r["step"] == 1]
    last_epoch = [r["loss"] for r in steps[-plan["steps_per_epoch"] :]]
    return {
        "impl": name,
        "images_per_s": batch_size * len(steady) / sum(steady) if steady else None,
        "step_median_s": statistics.median(steady) if steady else None,
        "step_p90_s": float(np.percentile(steady, 90)) if steady else None,
        "first_step_s": first[0] if first else None,
        "steps": len(steps),
        "epochs": len(steps) / plan["steps_per_epoch"],
        "test_top1": raw["result"].get("eval_top1"),
        "test_top5": raw["result"].get("eval_top5"),
        "final_train_loss": statistics.mean(last_epoch) if last_epoch else None,
        "peak_rss_mb": raw["peak_rss_mb"],
        "wall_s": raw["seconds"],
        "load_average_before_after": raw["load_average_before_after"],
        "curve": [{"step": r["step"], "test_top1": r["eval_top1"]} for r in evals],
    }


def _machine(args: argparse.Namespace) -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    packages = ("jax", "jaxlib", "flax", "optax", "grain", "numpy", "torch")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{package: version(package) for package in packages},
        "torch_threads": args.torch_threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "shared": "the cores are shared with other jobs: see the load averages",
    }


def plot_curves(rows: list[dict], out: Path, png: Path, plan: dict) -> None:
    """Training loss (a running mean), the gradient's norm before clipping, and test top-1
    against the epoch, both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_per_epoch = plan["steps_per_epoch"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for row in rows:
        steps, evals = _records(out / row["impl"])
        window = max(1, min(steps_per_epoch, len(steps) // 10))
        losses = [r["loss"] for r in steps]
        smooth = [
            statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(steps))
        ]
        epochs = [r["step"] / steps_per_epoch for r in steps]
        left.plot(epochs, smooth, label=f"{row['impl']} (mean of {window} steps)")
        middle.semilogy(epochs, [r["grad_norm"] for r in steps], label=row["impl"])
        right.plot(
            [r["step"] / steps_per_epoch for r in evals],
            [100 * r["eval_top1"] for r in evals],
            "o-",
            label=row["impl"],
        )
    clip = plan["config"]["clip_norm"]
    if clip:
        middle.axhline(clip, color="grey", linestyle=":", label=f"clip norm {clip:g}")
    right.axhline(100 / NUM_CLASSES, color="grey", linestyle=":", label="chance")
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    middle.set(xlabel="epoch", ylabel="gradient norm", title="gradient norm (before clipping)")
    right.set(
        xlabel="epoch", ylabel="test top-1 (%)", title=f"test top-1 ({plan['num_eval']} images)"
    )
    for axes in (left, middle, right):
        axes.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def build_report(args: argparse.Namespace, plan: dict, raws: dict) -> dict:
    """The report of the phases finished so far."""
    rows = [summarise(name, raws[name], args.out / name, plan) for name in IMPLS if name in raws]
    baseline = next((r for r in rows if r["impl"] == "torch_eager"), None)
    for row in rows:
        if baseline and baseline["step_median_s"] and row["step_median_s"]:
            row["ratio_vs_torch_eager"] = baseline["step_median_s"] / row["step_median_s"]
    by_impl = {row["impl"]: row for row in rows}
    comparison = {}
    if {"jax", "torch_eager"} <= set(by_impl):
        p = (by_impl["jax"]["test_top1"] + by_impl["torch_eager"]["test_top1"]) / 2
        comparison = {
            "test_top1_difference": by_impl["jax"]["test_top1"]
            - by_impl["torch_eager"]["test_top1"],
            # Two standard errors of the difference of two accuracies on the same number of
            # test images, from test sampling alone (seed-to-seed training noise is extra).
            "test_top1_difference_2se": 2 * math.sqrt(2 * p * (1 - p) / plan["num_eval"]),
        }
    return {
        "command": " ".join(["python", "experiments/train_cifar10.py", *args.argv]),
        "machine": {**_machine(args), "load_average_now": list(os.getloadavg())},
        "arch": plan["config"]["arch"],
        "plan": {key: value for key, value in plan.items() if key != "config"},
        "config": plan["config"],
        "same_initial_weights": True,
        "same_data_order": True,
        "ratio_baseline": "torch_eager" if baseline else None,
        **comparison,
        "implementations": rows,
    }


def _markdown(rows: list[dict]) -> str:
    columns = [
        "impl",
        "images_per_s",
        "step_median_s",
        "step_p90_s",
        "first_step_s",
        "steps",
        "epochs",
        "test_top1",
        "peak_rss_mb",
        "ratio_vs_torch_eager",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append(
            "| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="plan, workdirs, report")
    parser.add_argument("--minutes", type=float, default=20.0, help="JAX training budget")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="instead of --minutes")
    length.add_argument("--steps", type=int, help="instead of --minutes")
    parser.add_argument("--arch", default="EA_our_vote_600M", help="a SPEC 8 name or arch text")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 .npz")
    parser.add_argument("--config", default="cifar10", help="a trainer preset or JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", help="comma-separated of jax,torch_eager (default: both)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per phase")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.names = args.only.split(",") if args.only else list(IMPLS)
    unknown = [name for name in args.names if name not in IMPLS]
    if unknown:
        parser.error(f"--only: unknown implementation {unknown[0]!r}; known: {', '.join(IMPLS)}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Plan, train each implementation, report; returns the report (None in a worker)."""
    # As the scoring timing study: spinning thread pools fight other jobs on shared cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parse_args(argv)
    if args.worker:
        _run_worker(args)
        return None
    from wrcor_jax.jsonio import write_json

    args.out.mkdir(parents=True, exist_ok=True)
    plan_path = args.out / PLAN_FILE
    if not plan_path.exists():
        print("[train_cifar10] plan ...", file=sys.stderr, flush=True)
        planned = _spawn(args, "plan", args.out / "plan_result.json")
        write_json(plan_path, planned["result"] | {"plan_s": planned["seconds"]}, indent=2)
        (args.out / "plan_result.json").unlink()
    plan = json.loads(plan_path.read_text())
    print(f"[train_cifar10] {plan['steps']} steps", file=sys.stderr, flush=True)
    raws = {}
    for name in args.names:
        done = args.out / name / RESULT_FILE
        if not done.exists():
            print(f"[train_cifar10] {name} ...", file=sys.stderr, flush=True)
            (args.out / name).mkdir(parents=True, exist_ok=True)
            _spawn(args, name, done)
        raws[name] = json.loads(done.read_text())
        report = build_report(args, plan, raws)
        write_json(args.out / REPORT_FILE, report, indent=2)
    plot_curves(report["implementations"], args.out, args.out / CURVES_FILE, plan)
    print(_markdown(report["implementations"]))
    return report


if __name__ == "__main__":
    main()
