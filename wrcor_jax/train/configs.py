"""Training recipes: one frozen dataclass, named presets, JSON files and `key=value` overrides.

`imagenet_mbv2` is SPEC 9 (the paper's recipe, from Zen-NAS's MobileNetV2 script);
`cifar10` is a short proof-run recipe; `nb201_cifar10` is NAS-Bench-201's 200-epoch recipe.
A run saves its config beside its checkpoints, so a restart can refuse another recipe.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from wrcor_jax.train.input_pipeline import DataConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers (the architecture included)."""

    space: str = "mbv2"
    arch: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    num_epochs: float = 480
    num_steps: int | None = None
    """Overrides `num_epochs` when set."""
    batch_size: int = 256
    """Global: split over every device of every process."""
    learning_rate: float = 0.1
    """Per `lr_batch_size` images, scaled linearly to `batch_size`."""
    lr_batch_size: int = 256
    warmup_epochs: float = 0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 4e-5
    decay_bn_and_bias: bool = True
    """False: decay only conv and linear kernels (Zen-NAS's scripts)."""
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.4
    """0 turns mixup off."""
    clip_norm: float | None = 5.0
    teacher_workdir: str | None = None
    """Knowledge distillation from the last checkpoint of another run of this trainer."""
    kd_ratio: float = 0.5
    """The teacher's share of the loss: (1 - r) CE(targets) + r CE(teacher's softmax)."""
    compute_dtype: str = "float32"
    """`bfloat16` on accelerators; parameters and BatchNorm statistics stay float32."""
    seed: int = 0
    log_every_steps: int = 50
    eval_every_steps: int | None = None
    """None: once per epoch (and always at the end)."""
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


CIFAR10_DATA = DataConfig(
    dataset="cifar10",
    resolution=32,
    crop="pad_crop",
    color_jitter=None,
    lighting=0.0,
    autoaugment=False,
    random_erasing=0.0,
)
"""CIFAR-10 as the NB201 and proof-run recipes read it: pad-and-crop and flip only."""

PRESETS: dict[str, TrainConfig] = {
    "imagenet_mbv2": TrainConfig(),
    "cifar10": TrainConfig(
        data=CIFAR10_DATA,
        num_epochs=30,
        batch_size=128,
        weight_decay=5e-4,
        label_smoothing=0.0,
        mixup_alpha=0.0,
        log_every_steps=10,
    ),
    "nb201_cifar10": TrainConfig(
        space="nb201",
        data=CIFAR10_DATA,
        num_epochs=200,
        nesterov=True,
        weight_decay=5e-4,
        label_smoothing=0.0,
        mixup_alpha=0.0,
        clip_norm=None,
        log_every_steps=10,
    ),
}


def _build(cls: type, values: dict, where: str) -> Any:
    """A dataclass from a JSON object, nested dataclasses included; unknown keys refused."""
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {', '.join(sorted(unknown))}")
    fields = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            fields[name] = _build(hints[name], value, f"{where}.{name}")
        else:
            fields[name] = _coerce(value, hints[name], f"{where}.{name}")
    return cls(**fields)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """`value` (from JSON or parsed text) checked against the field type `kind`."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{key} may not be null")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            item = typing.get_args(option)[0]
            return tuple(_coerce(v, item, key) for v in value)
    raise ValueError(f"{key}: expected {_type_name(kind)}, got {value!r}")


def _type_name(kind: Any) -> str:
    return str(kind).replace("typing.", "").replace("<class '", "").replace("'>", "")


_BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _parse_text(text: str, kind: Any, key: str) -> Any:
    """A `--set` value read as the field type `kind` (`none` for an optional field, a comma
    list for a tuple)."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for option in options:
        try:
            if option is bool:
                return _BOOLEANS[text.lower()]
            if option in (int, float, str):
                return option(text)
            if typing.get_origin(option) is tuple:
                item = typing.get_args(option)[0]
                return tuple(_parse_text(part.strip(), item, key) for part in text.split(","))
        except (KeyError, ValueError):
            continue
    raise ValueError(f"--set {key}={text}: expected {_type_name(kind)}")


def load(name_or_path: str) -> TrainConfig:
    """A preset by name, or a JSON file of (some of) TrainConfig's keys over the defaults."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    return _build(TrainConfig, values, str(path))


def override(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """`config` with `key=value` assignments applied (dotted keys reach into `data`)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"--set {assignment!r}: expected key=value")
        config = _assign(config, key.strip().split("."), text.strip(), key.strip())
    return config


def _assign(node: Any, path: list[str], text: str, key: str) -> Any:
    """`node` (a config dataclass) with the field at `path` set from `text`."""
    hints = typing.get_type_hints(type(node))
    name = path[0]
    if name not in hints or dataclasses.is_dataclass(hints[name]) != (len(path) > 1):
        raise ValueError(f"--set {key}: unknown config key")
    if len(path) > 1:
        value = _assign(getattr(node, name), path[1:], text, key)
    else:
        value = _parse_text(text, hints[name], key)
    return dataclasses.replace(node, **{name: value})


def flatten(config: TrainConfig) -> dict[str, Any]:
    """The config's values by dotted key (`data.resolution`)."""
    flat = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            flat |= {f"{key}.{inner}": v for inner, v in value.items()}
        else:
            flat[key] = value
    return flat


def from_json(text: str) -> TrainConfig:
    """The config a run saved (`TrainConfig.to_json`)."""
    return _build(TrainConfig, json.loads(text), "saved config")
