"""The trainer's input pipeline: random-access sources read by grain, augmented on the host.

Sources are random access, so grain can shuffle, shard and checkpoint by index:
``tfds.data_source`` (ArrayRecord; records decode with Pillow or OpenCV, no TensorFlow at read
time) or a local ``.npz`` (`NpzSource`). One sampler orders every record of the run, the
same in every process; process r of N reads the positions r, r + N, r + 2N, ... of it
(``ShardByJaxProcess`` on the DataLoader), so the processes' local batches j together hold
exactly the records and augmentations of a one-process run's global batch j, whatever N. The
trainer assembles the global array with ``jax.make_array_from_process_local_data``.

Training records go through SPEC 9's augmentations (`train.augment`), each switchable in
`DataConfig`, driven by grain's per-record rng (a Philox generator keyed by the seed and the
record's position in the endless, per-epoch reshuffled order): the same seed gives the same
batches, and the iterator state restores them exactly. Evaluation resizes the shorter side to
res / crop_pct and takes the centre crop (`data.batch.fixed_size`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from wrcor_jax.data.batch import (
    _one_line,
    _open_tfds_source,
    _read_record,
    fixed_size,
    load_npz,
    normalize,
)
from wrcor_jax.data.datasets import DataError, DatasetInfo, get_dataset_info
from wrcor_jax.train import augment

__all__ = [
    "DataConfig",
    "EvalTransform",
    "NpzSource",
    "TrainTransform",
    "dataset_info",
    "eval_batches",
    "train_loader",
]

# The split evaluated on, per dataset this pipeline trains on (DatasetInfo names).
_EVAL_SPLIT = {"imagenet1k": "validation", "cifar10": "test", "cifar100": "test"}
_CROPS = ("resize_crop", "pad_crop")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how training images are augmented (SPEC 9)."""

    dataset: str = "imagenet2012"  # "imagenet2012" | "cifar10" (| "cifar100")
    # A local .npz (train_images, train_labels, test_images, test_labels; uint8 NHWC)
    # instead of tfds.
    data: str | None = None
    data_dir: str | None = None  # tfds data dir (None: tfds' default)
    resolution: int = 224  # train crop and eval crop size
    # "resize_crop": shorter side to res / crop_pct, random crop (SPEC 9; eval: centre crop).
    # "pad_crop": resize to res, zero-pad 4, random crop (CIFAR; eval: resize to res).
    crop: str = "resize_crop"
    crop_pct: float = 0.875
    flip: bool = True
    # brightness, contrast, saturation, hue (torchvision ColorJitter); None = off.
    color_jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.2)
    lighting: float = 0.1  # PCA lighting alphastd; 0 = off
    autoaugment: bool = True  # AutoAugment's ImageNet policy
    random_erasing: float = 0.25  # probability; 0 = off
    worker_count: int = 0  # grain worker processes (0: in the calling process)
    worker_buffer_size: int = 2  # batches prefetched per worker

    def __post_init__(self) -> None:
        if self.color_jitter is not None:  # a list from a JSON config: keep it hashable
            object.__setattr__(self, "color_jitter", tuple(float(v) for v in self.color_jitter))
            if len(self.color_jitter) != 4 or min(self.color_jitter) < 0:
                raise DataError(
                    "color_jitter must be 4 non-negative strengths (brightness, contrast, "
                    f"saturation, hue) or None, got {self.color_jitter}"
                )
        if self.crop not in _CROPS:
            raise DataError(f"crop must be one of {', '.join(_CROPS)}, got {self.crop!r}")
        if self.resolution < 1:
            raise DataError(f"resolution must be at least 1, got {self.resolution}")
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0 <= self.random_erasing <= 1:
            raise DataError(f"random_erasing must be a probability, got {self.random_erasing}")
        if self.lighting < 0 or self.worker_count < 0 or self.worker_buffer_size < 0:
            raise DataError("lighting, worker_count and worker_buffer_size must be >= 0")


# --------------------------------------------------------------------------- sources


class NpzSource:
    """One split of a local .npz as a grain random-access source of (uint8 HWC, label).

    Pickles as its path alone (grain worker processes load the arrays themselves)."""

    def __init__(self, path: str | Path, split: str, num_classes: int) -> None:
        self._path = Path(path)
        self._split = split
        self._images, self._labels = _load_split(self._path, split)
        self._length = len(self._labels)
        if self._length and (self._labels.min() < 0 or self._labels.max() >= num_classes):
            raise DataError(
                f"{self._path}: {split}_labels span {self._labels.min()}..{self._labels.max()}, "
                f"outside 0..{num_classes - 1}"
            )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if self._images is None:
            with np.load(self._path, allow_pickle=False) as archive:
                self._images = archive[f"{self._split}_images"]
                self._labels = archive[f"{self._split}_labels"]
        return self._images[index], int(self._labels[index])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_labels": None}

    def __repr__(self) -> str:
        return f"NpzSource({str(self._path)!r}, {self._split!r}, {self._length} records)"


def _load_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 NHWC images and integer labels of one split, validated."""
    images, labels = load_npz(path)  # checks the file and its train arrays
    if split == "train":
        return images, labels
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in archive.files]
        if missing:
            raise DataError(f"{path} lacks key(s) {', '.join(missing)} for evaluation")
        images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: {split}_images must be uint8 N x H x W x 3, got {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels must be {images.shape[0]} integers")
    return images, labels


@dataclass(frozen=True)
class _TfdsRecords:
    """A tfds data source as (uint8 HWC, label) records, validated as the proxy batch's."""

    source: Sequence[Any]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return _read_record(self.source, index)


def _dataset(cfg: DataConfig) -> DatasetInfo:
    info = get_dataset_info(cfg.dataset)
    if info.name not in _EVAL_SPLIT:
        raise DataError(f"the trainer reads {', '.join(sorted(_EVAL_SPLIT))}, not {cfg.dataset!r}")
    return info


def _open(cfg: DataConfig, info: DatasetInfo, split: str) -> Sequence[tuple[np.ndarray, int]]:
    """The train split or the eval split ("eval") of the configured dataset."""
    if cfg.data is not None:
        return NpzSource(cfg.data, "train" if split == "train" else "test", info.num_classes)
    train = _open_tfds_source(info, cfg.data_dir, download=True)  # one-line DataError
    if split == "train":
        return _TfdsRecords(train)
    import tensorflow_datasets as tfds

    name = _EVAL_SPLIT[info.name]
    try:
        return _TfdsRecords(tfds.data_source(info.tfds_name, split=name, data_dir=cfg.data_dir))
    except Exception as exc:  # the train split opened, so the dataset is prepared
        raise DataError(
            f"split {name!r} of {info.tfds_name} could not be read: {_one_line(exc)}"
        ) from exc


def dataset_info(cfg: DataConfig) -> tuple[int, int, int]:
    """(number of training images, number of eval images, number of classes)."""
    info = _dataset(cfg)
    return len(_open(cfg, info, "train")), len(_open(cfg, info, "eval")), info.num_classes


def _worker_ready(cfg: DataConfig) -> None:
    """grain's worker processes read absl flags (its profiler switch), which raise unless
    parsed; a program not started by absl.app (our CLI, pytest) has them at their defaults."""
    if cfg.worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _local_batch_size(global_batch_size: int) -> int:
    count = jax.process_count()
    if global_batch_size < 1 or global_batch_size % count:
        raise DataError(
            f"the global batch size {global_batch_size} must be a positive multiple of the "
            f"{count} JAX process(es)"
        )
    return global_batch_size // count


# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """SPEC 9's training augmentation of one (uint8 image, label) record."""

    cfg: DataConfig
    info: DatasetInfo

    def random_map(self, element: tuple[np.ndarray, int], rng: np.random.Generator) -> dict:
        image, label = element
        cfg = self.cfg
        if cfg.crop == "resize_crop":
            image = augment.resize_random_crop(image, cfg.resolution, cfg.crop_pct, rng)
        else:
            image = augment.pad_random_crop(image, cfg.resolution, self.info.crop_padding, rng)
        if cfg.flip:
            image = augment.random_flip(image, rng)
        if cfg.autoaugment:
            image = augment.autoaugment(np.ascontiguousarray(image), rng)
        if cfg.color_jitter is not None:
            image = augment.color_jitter(np.ascontiguousarray(image), *cfg.color_jitter, rng=rng)
        image = augment.lighting(image, cfg.lighting, rng)
        normalised = normalize(image, self.info)
        normalised = augment.random_erasing(normalised, cfg.random_erasing, rng)
        return {"image": normalised, "label": np.int32(label)}


@dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Resize the shorter side to res / crop_pct, centre crop, normalise."""

    resolution: int
    crop_pct: float
    info: DatasetInfo

    def map(self, element: tuple[np.ndarray, int, bool]) -> dict:
        image, label, mask = element
        image = fixed_size(np.ascontiguousarray(image), self.resolution, self.crop_pct)
        return {"image": normalize(image, self.info), "label": np.int32(label), "mask": mask}


# --------------------------------------------------------------------------- loaders


def train_loader(cfg: DataConfig, global_batch_size: int, seed: int) -> grain.DataLoader:
    """Endless shuffled training batches of this process's share, `global_batch_size //
    jax.process_count()` each: {"image": float32 (B, R, R, 3), "label": int32 (B,)}.

    The sampler is global: one endless sequence, every epoch a reshuffle of all the records
    from `seed`, each element with its own augmentation rng (keyed by `seed` and its position
    in the sequence). Process r of N reads positions r, r + N, ... (grain's DataLoader reads
    sampler index i * N + r for its i-th element), so row k of its local batch j is row
    N * k + r of the one-process global batch j: the N local batches interleave into it,
    records and augmentations alike. `iter(loader)` has get_state/set_state and works with
    grain.checkpoint.CheckpointSave / CheckpointRestore in orbax."""
    info = _dataset(cfg)
    batch = _local_batch_size(global_batch_size)
    source = _open(cfg, info, "train")
    _worker_ready(cfg)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.NoSharding(),
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[TrainTransform(cfg, info), grain.transforms.Batch(batch, drop_remainder=True)],
        worker_count=cfg.worker_count,
        worker_buffer_size=cfg.worker_buffer_size,
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
    )


@dataclass(frozen=True)
class _EvalShare:
    """Records process_index, process_index + process_count, ... of a source, as
    (image, label, True), then (black image, 0, False) up to `length`."""

    source: Sequence[tuple[np.ndarray, int]]
    process_index: int
    process_count: int
    length: int
    pad_size: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, bool]:
        position = self.process_index + index * self.process_count
        if position < len(self.source):
            image, label = self.source[position]
            return image, label, True
        return np.zeros((self.pad_size, self.pad_size, 3), np.uint8), 0, False


def eval_batches(cfg: DataConfig, global_batch_size: int) -> Iterator[dict]:
    """One pass over this process's share of the eval split, in order, in batches of
    `global_batch_size // jax.process_count()`: {"image", "label", "mask"}.

    Every process yields the same number of batches (the global eval step needs them all);
    the padding examples have mask False. Crop "pad_crop" evaluates the whole image resized
    to res (CIFAR), "resize_crop" the centre crop of the image resized to res / crop_pct."""
    info = _dataset(cfg)
    batch = _local_batch_size(global_batch_size)
    source = _open(cfg, info, "eval")
    count = jax.process_count()
    per_process = math.ceil(len(source) / count)
    length = max(1, math.ceil(per_process / batch)) * batch
    share = _EvalShare(source, jax.process_index(), count, length, cfg.resolution)
    crop_pct = cfg.crop_pct if cfg.crop == "resize_crop" else 1.0
    _worker_ready(cfg)
    loader = grain.DataLoader(
        data_source=share,
        sampler=grain.samplers.IndexSampler(num_records=length, shuffle=False, num_epochs=1),
        operations=[
            EvalTransform(cfg.resolution, crop_pct, info),
            grain.transforms.Batch(batch, drop_remainder=False),
        ],
        worker_count=cfg.worker_count,
        worker_buffer_size=cfg.worker_buffer_size,
        shard_options=grain.sharding.NoSharding(),
    )
    return iter(loader)
