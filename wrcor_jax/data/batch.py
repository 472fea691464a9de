"""The one mini-batch a zero-shot proxy is computed on (SPEC section 2).

A batch is `batch_size` training images drawn at random without replacement, put through
the training transform (random crop with zero padding, random horizontal flip, scale to
[0, 1], per-channel normalisation), as float32 NHWC, with int32 labels.

Everything random comes from one `numpy.random.default_rng(seed)`, drawn in this order:
which images (`rng.choice(n, batch_size, replace=False)`, or for ImageNet16-120 from tfds
`rng.permutation(n)`, see below), then the crop offsets (`rng.integers(0, 2 * pad + 1,
size=(batch_size, 2))`, rows then columns), then the flips (`rng.random(batch_size) < 0.5`).
The same seed and source therefore always give the same batch, in the same order.

Two sources:

* a local ``.npz`` file with ``train_images`` (uint8, N x H x W x 3) and ``train_labels``
  (integers, N), the format of ``shared/data/cifar10_sample.npz``;
* tensorflow-datasets, read with ``tfds.data_source`` (random access, works without
  TensorFlow), record by record with ``source[i]``: ``cifar10``, ``cifar100``,
  ``imagenet16_120`` = tfds ``imagenet_resized/16x16`` restricted to labels 0..119, and
  ``imagenet1k`` (alias ``imagenet2012``) = tfds ``imagenet2012``, which tfds cannot
  download (a manual download, prepared once as ArrayRecord; the error says how). Its
  images differ in size; each is brought to 320 x 320 first (`fixed_size`).

ImageNet16-120 is NAS-Bench-201's subset of the 16x16 downsampled ImageNet-1k: it keeps the
images whose (0-based) label is below 120, labels unchanged. Finding all of them means
reading all 1.28M records, so instead the indices are visited in a seeded random order
(`rng.permutation(n)`) and the first `batch_size` records with a label below 120 are kept:
about 8.3 reads per kept image, an exact uniform sample without replacement of the subset.
A local ``.npz`` given for ``imagenet16_120`` is restricted the same way (all its rows are
read, so there the choice is made among the kept rows).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wrcor_jax.data.datasets import DataError, DatasetInfo, get_dataset_info

__all__ = ["load_batch", "load_npz", "normalize", "random_crop_flip", "train_transform"]


def load_batch(
    dataset: str,
    batch_size: int = 64,
    seed: int = 42,
    data: str | Path | None = None,
    data_dir: str | None = None,
    *,
    padding: int | None = None,
    download: bool = True,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Build the proxy batch: (images float32 [B, H, W, 3], labels int32 [B]).

    `data` is a local ``.npz`` file; without it the training split is read from
    tensorflow-datasets in `data_dir` (tfds' default when None), downloading it if it is
    absent and `download` is true. `padding` overrides the dataset's crop padding.
    `augment=False` skips the crop and flip (same images, only normalised): the batch the
    paper's MobileNetV2 numbers in shared/data/mbv2_reference_sample.csv were scored on.
    """
    info = get_dataset_info(dataset)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise DataError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    pad = info.crop_padding if padding is None else int(padding)
    if pad < 0:
        raise DataError(f"padding must be >= 0, got {pad}")

    rng = np.random.default_rng(seed)
    if data is not None:
        images, labels = _batch_from_npz(Path(data), info, batch_size, rng)
    else:
        images, labels = _batch_from_tfds(info, batch_size, rng, data_dir, download)
    if not augment:
        return normalize(images, info), labels
    return train_transform(images, info, rng, padding=pad), labels


# --------------------------------------------------------------------------- transform


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Random crop of the zero-padded image back to its size, then a random horizontal flip.

    Works on uint8 pixels, so padded pixels are black before normalisation, as torchvision's
    RandomCrop(padding=...) on a PIL image does.
    """
    n, h, w, _ = images.shape
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    if padding:
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    else:
        padded = images
    out = np.empty_like(images)
    for i in range(n):
        dy, dx = offsets[i]
        crop = padded[i, dy : dy + h, dx : dx + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def normalize(images: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """uint8 pixels -> float32, scaled to [0, 1], minus the dataset mean, over its std."""
    mean = np.asarray(info.mean, dtype=np.float32)
    std = np.asarray(info.std, dtype=np.float32)
    scaled = images.astype(np.float32) / np.float32(255.0)
    return ((scaled - mean) / std).astype(np.float32)


def train_transform(
    images: np.ndarray, info: DatasetInfo, rng: np.random.Generator, padding: int | None = None
) -> np.ndarray:
    """The training transform of SPEC section 2 on uint8 NHWC images."""
    pad = info.crop_padding if padding is None else padding
    return normalize(random_crop_flip(images, rng, pad), info)


def fixed_size(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """A uint8 HWC image of any size as `size` x `size`: the shorter side resized (bicubic)
    to ceil(size / crop_fraction), then the centre crop.

    This is the geometry of the reference's ImageNet pipeline at size 320 (resize to 366,
    crop 320; its random crop and colour augmentations are left to SPEC 2's transform,
    which follows). 320 is the largest resolution of the MobileNetV2 space and the size
    the reference feeds every architecture; the network resizes (bilinear) to its own
    resolution, so no architecture sees upsampled pixels and all share one batch.
    """
    from PIL import Image

    h, w = image.shape[:2]
    short = math.ceil(size / crop_fraction)
    scale = short / min(h, w)
    new_h, new_w = max(short, round(h * scale)), max(short, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


# --------------------------------------------------------------------------- .npz source


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate ``train_images`` / ``train_labels`` of a local .npz file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a valid .npz file ({_one_line(exc)})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not a .npz archive")
    with archive:
        missing = [key for key in ("train_images", "train_labels") if key not in archive.files]
        if missing:
            raise DataError(
                f"{path} lacks key(s) {', '.join(missing)} (has: {', '.join(archive.files)})"
            )
        try:
            images = archive["train_images"]
            labels = archive["train_labels"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path} is not a valid .npz file ({_one_line(exc)})") from exc
    if images.dtype != np.uint8:
        raise DataError(f"{path}: train_images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{path}: train_images must be N x H x W x 3 (NHWC, RGB), got shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: train_labels must be a 1-D integer array, got {labels.dtype} "
            f"of shape {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: {images.shape[0]} train_images but {labels.shape[0]} train_labels"
        )
    return images, labels


def _batch_from_npz(
    path: Path, info: DatasetInfo, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_npz(path)
    if info.label_limit is not None:
        keep = np.flatnonzero(labels < info.label_limit)
        images, labels = images[keep], labels[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(
            f"{path}: labels span {labels.min()}..{labels.max()}, outside 0..{info.num_classes - 1}"
            f" of {info.name}"
        )
    available = images.shape[0]
    if batch_size > available:
        raise DataError(
            f"batch_size {batch_size} is larger than the {available} images available in {path}"
        )
    chosen = rng.choice(available, size=batch_size, replace=False)
    return images[chosen], labels[chosen].astype(np.int32)


# --------------------------------------------------------------------------- tfds source


def _open_tfds_source(info: DatasetInfo, data_dir: str | None, download: bool) -> Sequence[Any]:
    """`tfds.data_source` of the training split, downloading it only when it is absent.

    The prepared dataset is tried first without any network access. Before tfds is asked to
    download, every host it would reach is resolved and connected to with a timeout of a few
    seconds (`_unreachable_host`): offline, tfds' own downloader retries a failed name
    resolution 10 times with exponential backoff (3.5 minutes) before it gives up.
    """
    if info.tfds_name is None:
        raise DataError(
            f"dataset {info.name} is not read from tensorflow-datasets here: "
            "pass --data PATH.npz for local images"
        )
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError(
            "tensorflow-datasets is not installed: pass --data PATH.npz for local images"
        ) from exc
    where = f"data_dir {data_dir}" if data_dir is not None else "the tfds default data_dir"
    download = download and info.prepare is None  # a manual download cannot be fetched
    absl = logging.getLogger("absl")  # tfds warns of an absent dataset before it fails
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        try:
            return tfds.data_source(
                info.tfds_name, split="train", data_dir=data_dir, download=False
            )
        except Exception as exc:  # tfds raises many kinds here: not found, formats
            if not download:
                raise _not_found(info, data_dir, where, _one_line(exc)) from exc
        unreachable = _unreachable_host(_download_urls(tfds, info.tfds_name, data_dir))
        if unreachable is not None:
            raise _not_found(info, data_dir, where, unreachable)
        try:
            return tfds.data_source(info.tfds_name, split="train", data_dir=data_dir, download=True)
        except Exception as exc:  # not found, network, formats
            raise _not_found(info, data_dir, where, _one_line(exc)) from exc
    finally:
        absl.setLevel(level)


def _not_found(info: DatasetInfo, data_dir: str | None, where: str, reason: str) -> DataError:
    """The one-line error of an absent tfds dataset: what happened and what to do."""
    if info.prepare is not None:
        steps = info.prepare.format(data_dir=data_dir or "~/tensorflow_datasets")
        return DataError(
            f"dataset {info.tfds_name} is not prepared (as ArrayRecord) in {where}: {steps}"
        )
    return DataError(
        f"dataset {info.tfds_name} not found in {where} and could not be downloaded "
        f"({reason}): pass --data PATH.npz for local images, or --data-dir DIR where "
        f"`tfds build {info.tfds_name} --data_dir DIR --file_format array_record` has "
        "prepared it on a machine with network access"
    )


# Seconds one download host may take to resolve and accept a TCP connection.
HOST_CHECK_TIMEOUT = 5.0


def _download_urls(tfds: Any, name: str, data_dir: str | None) -> list[str]:
    """The URLs tfds would download `name` from (its registered checksums); [] if unknown."""
    try:
        return sorted(tfds.builder(name, data_dir=data_dir).url_infos or {})
    except Exception:  # no checksums registered: leave the check to tfds itself
        return []


def _unreachable_host(urls: Sequence[str], timeout: float | None = None) -> str | None:
    """None when every host of `urls` (or the proxy configured for it) resolves and accepts
    a TCP connection within `timeout` seconds (`HOST_CHECK_TIMEOUT` by default); otherwise
    why not, in a few words."""
    timeout = HOST_CHECK_TIMEOUT if timeout is None else timeout
    seen: set[tuple[str, int]] = set()
    for url in urls:
        target = _connect_target(url)
        if target is None or target in seen:
            continue
        seen.add(target)
        problem = _check_host(*target, timeout=timeout)
        if problem is not None:
            return problem
    return None


def _connect_target(url: str) -> tuple[str, int] | None:
    """(host, port) a download of `url` connects to first: its proxy's when one applies."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default_port = 443 if parts.scheme == "https" else 80
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            return proxy_parts.hostname, proxy_parts.port or 80
    return parts.hostname, parts.port or default_port


def _check_host(host: str, port: int, timeout: float) -> str | None:
    """Resolve `host` and open a TCP connection to `port`, all within `timeout` seconds.

    `socket.getaddrinfo` takes no timeout (an unreachable resolver can block it for tens of
    seconds), so it runs in a daemon thread that is abandoned when the time is up.
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )[0]
        except (OSError, UnicodeError) as exc:
            outcome.append(f"cannot resolve {host}: {_one_line(exc)}; no network?")
            return
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
        except OSError as exc:
            outcome.append(f"cannot connect to {host}:{port}: {_one_line(exc)}; no network?")
            return
        outcome.append(None)

    thread = threading.Thread(target=attempt, name=f"check {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout:g} s; no network?"
    return outcome[0]


def _read_record(source: Sequence[Any], index: int) -> tuple[np.ndarray, int]:
    """One tfds record as (uint8 HWC image, label). `source[i]`, not `__getitems__`."""
    try:
        record = source[index]
    except Exception as exc:  # a corrupt shard surfaces as any exception type
        raise DataError(f"could not read record {index}: {_one_line(exc)}") from exc
    try:
        image = np.asarray(record["image"])
        label = int(np.asarray(record["label"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"record {index} has no usable 'image'/'label': {_one_line(exc)}") from exc
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(
            f"record {index}: expected a uint8 H x W x 3 image, got {image.dtype} {image.shape}"
        )
    return image, label


def _batch_from_tfds(
    info: DatasetInfo,
    batch_size: int,
    rng: np.random.Generator,
    data_dir: str | None,
    download: bool,
) -> tuple[np.ndarray, np.ndarray]:
    source = _open_tfds_source(info, data_dir, download)
    n = len(source)
    if info.label_limit is None:
        if batch_size > n:
            raise DataError(
                f"batch_size {batch_size} is larger than the {n} training images of {info.name}"
            )
        records = [_read_record(source, int(i)) for i in rng.choice(n, batch_size, replace=False)]
    else:
        # Visit records in a seeded random order; keep the first batch_size in the subset.
        records = []
        for i in rng.permutation(n):
            image, label = _read_record(source, int(i))
            if label < info.label_limit:
                records.append((image, label))
                if len(records) == batch_size:
                    break
        if len(records) < batch_size:
            raise DataError(
                f"batch_size {batch_size} is larger than the {len(records)} training images "
                f"of {info.name} (labels < {info.label_limit} of {info.tfds_name})"
            )
    if info.resize:
        records = [(fixed_size(image, info.image_size), label) for image, label in records]
    shapes = {image.shape for image, _ in records}
    if len(shapes) != 1:
        raise DataError(f"{info.tfds_name} images differ in shape: {sorted(shapes)}")
    images = np.stack([image for image, _ in records])
    labels = np.asarray([label for _, label in records], dtype=np.int32)
    return images, labels


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
