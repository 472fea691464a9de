"""`wrcor-jax train` and `wrcor-jax evaluate-checkpoint`.

    wrcor-jax train --space mbv2 --arch 'S@R' --dataset imagenet2012 --data-dir TFDS_DIR \\
        --workdir runs/NAME [--config NAME_OR_JSON] [--set key=value ...] \\
        [--epochs N | --steps N] [--batch-size B] [--resolution R] [--checkpoint-every N] \\
        [--seed S] [--coordinator HOST:PORT --num-processes N --process-id I | --distributed auto]
    wrcor-jax evaluate-checkpoint --workdir runs/NAME [--step N]

`register(commands)` adds both to wrcor-jax's subcommands; `python -m wrcor_jax.train.cli`
runs them on their own. Re-running the same `train` command resumes the run.

On many hosts every process runs the same `train` command in a `jax.distributed` job (the
options above, or $JAX_COORDINATOR_ADDRESS and JAX's cluster detection): each reads its share
of every global batch, and the run is the one-process run with the same --batch-size (to float
rounding). Process 0 writes metrics.jsonl; the workdir must be one directory for all (a shared
filesystem or a bucket), where every process saves its part of the checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from wrcor_jax.train import configs

DEFAULT_PRESET = {
    ("mbv2", "imagenet2012"): "imagenet_mbv2",
    ("mbv2", "cifar10"): "cifar10",
    ("nb201", "cifar10"): "nb201_cifar10",
}


def train_config(args: argparse.Namespace) -> configs.TrainConfig:
    """The run's config: the preset (or --config), then --set, then the explicit flags.

    mbv2 crops at the architecture's resolution; `--resolution R` sets both to R.
    """
    from wrcor_jax.spaces import get_space
    from wrcor_jax.train.models import arch_resolution, with_resolution

    arch = get_space(args.space).canonical(args.arch)
    preset = args.config or DEFAULT_PRESET.get((args.space, args.dataset))
    if preset is None:
        raise ValueError(f"no preset for {args.space} on {args.dataset}: give --config")
    config = configs.override(configs.load(preset), args.set)
    if args.resolution:
        arch = with_resolution(args.space, arch, args.resolution)
    resolution = args.resolution or arch_resolution(args.space, arch) or config.data.resolution
    data = {
        "dataset": args.dataset,
        "data": args.data,
        "data_dir": args.data_dir,
        "resolution": resolution,
    }
    fields = {"space": args.space, "arch": arch, "seed": args.seed}
    fields |= {"batch_size": args.batch_size, "checkpoint_every_steps": args.checkpoint_every}
    if args.epochs is not None:
        fields |= {"num_epochs": args.epochs, "num_steps": None}
    if args.steps is not None:
        fields["num_steps"] = args.steps
    given = {key: value for key, value in fields.items() if value is not None}
    data = dataclasses.replace(
        config.data, **{key: value for key, value in data.items() if value is not None}
    )
    return dataclasses.replace(config, data=data, **given)


def _train(args: argparse.Namespace) -> None:
    from wrcor_jax import distributed
    from wrcor_jax.cli import join_job

    join_job(args)
    from wrcor_jax.train.train import train_and_evaluate

    result = train_and_evaluate(train_config(args), args.workdir)
    print(json.dumps(result))
    distributed.leave()


def _evaluate_checkpoint(args: argparse.Namespace) -> None:
    from wrcor_jax.train.train import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.workdir, args.step)))


def register(commands: argparse._SubParsersAction) -> None:
    """Add `train` and `evaluate-checkpoint` to a subparsers object (handler in `run`)."""
    train = commands.add_parser("train", help="train an architecture (resumes its workdir)")
    train.add_argument("--space", default="mbv2", choices=["mbv2", "nb201"])
    train.add_argument("--arch", required=True, help="the architecture's text form")
    train.add_argument("--dataset", default="imagenet2012", choices=["imagenet2012", "cifar10"])
    train.add_argument("--data", help="local .npz of images (cifar10)")
    train.add_argument("--data-dir", help="tfds data_dir")
    train.add_argument("--workdir", required=True, help="config, checkpoints, metrics")
    train.add_argument(
        "--config", help=f"a preset ({', '.join(configs.PRESETS)}) or a JSON file of keys"
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (data.KEY for the input pipeline); repeatable",
    )
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float)
    length.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int, help="global batch size")
    train.add_argument("--resolution", type=int, help="crop (and mbv2 network) resolution")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    train.add_argument("--seed", type=int)
    from wrcor_jax.cli import add_hosts_options

    add_hosts_options(
        train,
        "every process runs the same command and reads its share of each global batch; "
        "without these options $JAX_COORDINATOR_ADDRESS or a multi-worker TPU slice still "
        "joins one",
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "evaluate-checkpoint", help="re-evaluate a training run's checkpoint"
    )
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--step", type=int, help="default: the latest checkpoint")
    evaluate.set_defaults(run=_evaluate_checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    """The two commands on their own, with wrcor-jax's error convention."""
    from wrcor_jax.cli import EXIT_ERROR

    parser = argparse.ArgumentParser(prog="wrcor-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as exc:
        print(f"wrcor-jax: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
