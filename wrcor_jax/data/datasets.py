"""Per-dataset constants of the proxy batch (SPEC section 2).

The mean/std values are the ones the reference code normalises with, so that JAX scores
can be compared number for number with the PyTorch ones. They are stored in [0, 1] units
(the published pixel values divided by 255), i.e. applied after scaling images to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A batch could not be built; the message says why in one line."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the proxy batch needs to know about one dataset."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # tfds name the training images are read from (None: only a local .npz is supported).
    tfds_name: str | None
    # Zero padding of the random crop (SPEC section 2 says 4 pixels for every dataset).
    crop_padding: int = 4
    # Keep only labels below this bound (ImageNet16-120 = the first 120 ImageNet classes).
    label_limit: int | None = None
    # tfds images of varying sizes are brought to image_size x image_size first (see
    # `data.batch.fixed_size`); False: the dataset's images all have that size already.
    resize: bool = False
    # How to prepare a tfds dataset that cannot be downloaded ({data_dir} is filled in);
    # None: `tfds.data_source` downloads and prepares it.
    prepare: str | None = None


def _div255(values: tuple[float, float, float]) -> tuple[float, float, float]:
    return (values[0] / 255.0, values[1] / 255.0, values[2] / 255.0)


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_size=32,
        mean=_div255((125.3, 123.0, 113.9)),
        std=_div255((63.0, 62.1, 66.7)),
        tfds_name="cifar10",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        image_size=32,
        mean=_div255((129.3, 124.1, 112.4)),
        std=_div255((68.2, 65.4, 70.4)),
        tfds_name="cifar100",
    ),
    # NAS-Bench-201's ImageNet16-120: the 16x16 downsampled ImageNet-1k training set,
    # restricted to the images whose label is one of the first 120 classes (0..119).
    # NB: NAS-Bench-201's own training pipeline crops 16x16 images with 2 pixels of padding;
    # SPEC section 2 says 4 for every dataset, which is the default here (pass padding=2
    # to load_batch for the other convention).
    "imagenet16_120": DatasetInfo(
        name="imagenet16_120",
        num_classes=120,
        image_size=16,
        mean=_div255((122.68, 116.66, 104.01)),
        std=_div255((63.22, 61.26, 65.09)),
        tfds_name="imagenet_resized/16x16",
        label_limit=120,
    ),
    # ImageNet-1k (MobileNetV2 space): tfds imagenet2012 (a manual download) or a local
    # .npz; the constants are the usual torchvision ones, already in [0, 1] units. Images
    # are read at 320 x 320, the size the reference's ImageNet pipeline feeds every
    # architecture of the space (`batch.fixed_size`).
    "imagenet1k": DatasetInfo(
        name="imagenet1k",
        num_classes=1000,
        image_size=320,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        tfds_name="imagenet2012",
        resize=True,
        prepare=(
            "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
            "{data_dir}/downloads/manual/ and run `tfds build imagenet2012 --data_dir "
            "{data_dir} --file_format array_record` (building needs TensorFlow; reading "
            "does not)"
        ),
    ),
}

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "imagenet16-120": "imagenet16_120",
    "imagenet16": "imagenet16_120",
    "imagenet-1k": "imagenet1k",
    "imagenet": "imagenet1k",
    "imagenet2012": "imagenet1k",
}


def get_dataset_info(dataset: str) -> DatasetInfo:
    """Look a dataset up by name (case-insensitive; 'ImageNet16-120' style names accepted)."""
    key = dataset.strip().lower()
    key = _ALIASES.get(key, key).replace("-", "_")
    try:
        return DATASETS[key]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"unknown dataset {dataset!r}: expected one of {known}") from None
