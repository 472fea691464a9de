"""Recipes: the presets say what SPEC 9 and NB201 say; `--set` and JSON files are typed, and
an unknown key or a bad value is a one-line error; the CLI's flags land in the config."""

import argparse
import dataclasses
import json

import pytest

from wrcor_jax.train import configs
from wrcor_jax.train.cli import register, train_config

MBV2_600M = (
    "SuperConvK3BNRELU(3,48,2,1)SuperResIDWE2K7(48,32,2,40,2)SuperResIDWE2K7(32,32,2,48,3)"
    "SuperResIDWE6K7(32,64,1,40,3)SuperResIDWE6K7(64,88,2,40,4)SuperResIDWE6K7(88,104,1,56,6)"
    "SuperResIDWE6K5(104,152,2,192,6)SuperResIDWE6K5(152,240,1,136,2)"
    "SuperConvK1BNRELU(240,1264,1,1)@224"
)


def test_imagenet_preset_is_spec_9():
    c = configs.PRESETS["imagenet_mbv2"]
    assert (c.learning_rate, c.lr_batch_size, c.batch_size, c.momentum) == (0.1, 256, 256, 0.9)
    assert (c.weight_decay, c.label_smoothing, c.mixup_alpha, c.clip_norm) == (4e-5, 0.1, 0.4, 5)
    assert (c.num_epochs, c.warmup_epochs, c.nesterov, c.decay_bn_and_bias) == (480, 0, False, True)
    d = c.data
    assert (d.dataset, d.crop, d.crop_pct, d.flip, d.autoaugment) == (
        "imagenet2012",
        "resize_crop",
        0.875,
        True,
        True,
    )
    assert (d.color_jitter, d.lighting, d.random_erasing) == ((0.4, 0.4, 0.4, 0.2), 0.1, 0.25)


def test_nb201_preset():
    c = configs.PRESETS["nb201_cifar10"]
    assert (c.space, c.num_epochs, c.nesterov, c.weight_decay) == ("nb201", 200, True, 5e-4)
    assert (c.learning_rate, c.batch_size, c.data.dataset) == (0.1, 256, "cifar10")


def test_set_parses_to_the_field_types():
    c = configs.override(
        configs.PRESETS["imagenet_mbv2"],
        [
            "num_steps=7",
            "learning_rate=0.2",
            "nesterov=true",
            "clip_norm=none",
            "data.color_jitter=0.1,0.2,0.3,0.4",
            "data.data_dir=/x",
            "compute_dtype=bfloat16",
            "num_epochs=3",
        ],
    )
    assert (c.num_steps, c.learning_rate, c.nesterov, c.clip_norm) == (7, 0.2, True, None)
    assert c.data.color_jitter == (0.1, 0.2, 0.3, 0.4) and c.data.data_dir == "/x"
    assert c.compute_dtype == "bfloat16" and c.num_epochs == 3.0


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("lerning_rate=1", "unknown config key"),
        ("data.nope=1", "unknown config key"),
        ("data=1", "unknown config key"),
        ("num_steps=many", "expected int"),
        ("nesterov=maybe", "expected bool"),
        ("momentum", "expected key=value"),
    ],
)
def test_set_errors_are_one_line(assignment, message):
    with pytest.raises(ValueError, match=message) as info:
        configs.override(configs.PRESETS["cifar10"], [assignment])
    assert "\n" not in str(info.value)


def test_json_file_over_the_defaults_and_round_trip(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"batch_size": 64, "data": {"dataset": "cifar10"}}))
    c = configs.load(str(path))
    assert c.batch_size == 64 and c.data.dataset == "cifar10" and c.num_epochs == 480
    assert configs.from_json(c.to_json()) == c
    path.write_text(json.dumps({"batch_size": "big"}))
    with pytest.raises(ValueError, match="batch_size"):
        configs.load(str(path))
    with pytest.raises(ValueError, match="neither a preset"):
        configs.load(str(tmp_path / "absent.json"))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "--workdir", "w", *argv])


def test_cli_flags_override_the_preset():
    c = train_config(_args("--arch", MBV2_600M, "--data-dir", "/tfds", "--steps", "9"))
    assert c.data.resolution == 224 and c.data.data_dir == "/tfds" and c.num_steps == 9
    assert c == dataclasses.replace(configs.PRESETS["imagenet_mbv2"], arch=c.arch, num_steps=9,
                                    data=c.data)  # fmt: skip
    c = train_config(
        _args("--arch", MBV2_600M, "--dataset", "cifar10", "--resolution", "32",
              "--batch-size", "64", "--epochs", "2", "--seed", "3", "--set", "mixup_alpha=0.2")
    )  # fmt: skip
    assert c.arch.endswith("@32") and c.data.resolution == 32 and c.data.crop == "pad_crop"
    assert (c.batch_size, c.num_epochs, c.seed, c.mixup_alpha) == (64, 2.0, 3, 0.2)
    nb201 = (
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|none~2|"
    )
    c = train_config(_args("--space", "nb201", "--arch", nb201, "--dataset", "cifar10"))
    assert c.space == "nb201" and c.num_epochs == 200 and c.data.resolution == 32


def test_cli_bad_arch_is_a_value_error():
    with pytest.raises(ValueError, match="expected 3 nodes"):
        train_config(_args("--space", "nb201", "--arch", "|conv~0|", "--dataset", "cifar10"))
