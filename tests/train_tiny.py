"""A tiny training run for the trainer's tests: a three-block mbv2 network at 16 x 16 on the
shared CIFAR-10 sample, as a config (in process) or as a `train` command (subprocess)."""

import sys

from conftest import SAMPLE, require

from wrcor_jax.train import configs

TINY = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,32,1,1)@16"


def tiny_config(steps: int, *assignments: str) -> configs.TrainConfig:
    """The cifar10 recipe for `steps` steps of batch 16, mixup on, checkpoints every 4."""
    return configs.override(
        configs.PRESETS["cifar10"],
        [
            f"arch={TINY}", f"data.data={require(SAMPLE)}", "data.resolution=16",
            "batch_size=16", f"num_steps={steps}", "checkpoint_every_steps=4",
            "keep_checkpoints=5", "log_every_steps=1", "mixup_alpha=0.4", *assignments,
        ],
    )  # fmt: skip


def train_command(workdir, steps: int, *extra: str) -> list[str]:
    """`python -m wrcor_jax.train.cli train` of the tiny run (checkpoints every 20 steps)."""
    return [
        sys.executable, "-m", "wrcor_jax.train.cli", "train", "--arch", TINY,
        "--dataset", "cifar10", "--data", str(require(SAMPLE)), "--workdir", str(workdir),
        "--steps", str(steps), "--batch-size", "16", "--checkpoint-every", "20",
        "--set", "log_every_steps=1", "--set", "eval_every_steps=100000", *extra,
    ]  # fmt: skip
