"""The proxy batch: local .npz and tfds sources, the seeded transform, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wrcor_jax.data import DataError, get_dataset_info, load_batch, load_npz
from wrcor_jax.data.batch import fixed_size

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
SAMPLE = SHARED_DATA / "cifar10_sample.npz"

needs_sample = pytest.mark.skipif(
    not SAMPLE.exists(), reason=f"CIFAR-10 sample not found at {SAMPLE} (shared/ data absent)"
)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    if not SAMPLE.exists():
        pytest.skip(f"CIFAR-10 sample not found at {SAMPLE}")
    with np.load(SAMPLE) as archive:
        return archive["train_images"], archive["train_labels"]


def _to_uint8(batch: np.ndarray, dataset: str) -> np.ndarray:
    """Undo the normalisation (exact up to float rounding)."""
    info = get_dataset_info(dataset)
    pixels = (batch * np.asarray(info.std) + np.asarray(info.mean)) * 255.0
    return np.rint(pixels).astype(np.uint8)


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------- constants


def test_dataset_constants() -> None:
    c10 = get_dataset_info("cifar10")
    assert (c10.num_classes, c10.image_size) == (10, 32)
    np.testing.assert_allclose(np.asarray(c10.mean) * 255, [125.3, 123.0, 113.9])
    np.testing.assert_allclose(np.asarray(c10.std) * 255, [63.0, 62.1, 66.7])
    assert get_dataset_info("CIFAR-100").num_classes == 100
    im16 = get_dataset_info("ImageNet16-120")
    assert (im16.num_classes, im16.image_size, im16.label_limit) == (120, 16, 120)
    assert get_dataset_info("imagenet1k").mean == (0.485, 0.456, 0.406)
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        get_dataset_info("svhn")


# --------------------------------------------------------------------------- .npz source


@needs_sample
def test_npz_batch_shapes_and_dtypes() -> None:
    images, labels = load_batch("cifar10", data=SAMPLE)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (64,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10
    assert np.isfinite(images).all()


@needs_sample
def test_npz_batch_is_roughly_normalised() -> None:
    # Without padding the crop is the identity: statistics are those of the data set.
    images, _ = load_batch("cifar10", batch_size=2000, data=SAMPLE, padding=0)
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=0.05)
    # With 4 pixels of zero padding, black borders pull the mean down a little.
    images, _ = load_batch("cifar10", batch_size=500, data=SAMPLE)
    assert np.all(np.abs(images.mean(axis=(0, 1, 2))) < 0.4)
    assert np.all((images.std(axis=(0, 1, 2)) > 0.8) & (images.std(axis=(0, 1, 2)) < 1.4))


@needs_sample
def test_npz_batch_is_deterministic_per_seed() -> None:
    a_images, a_labels = load_batch("cifar10", data=SAMPLE, seed=3)
    b_images, b_labels = load_batch("cifar10", data=SAMPLE, seed=3)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    c_images, c_labels = load_batch("cifar10", data=SAMPLE, seed=4)
    assert not np.array_equal(a_images, c_images)
    assert not np.array_equal(a_labels, c_labels)


@needs_sample
def test_npz_labels_belong_to_their_images(sample) -> None:
    """Without padding, each output is a source image or its mirror: find it by content."""
    train_images, train_labels = sample
    images, labels = load_batch("cifar10", batch_size=32, data=SAMPLE, seed=7, padding=0)
    pixels = _to_uint8(images, "cifar10")
    flat = train_images.reshape(len(train_images), -1)
    chosen = []
    for k in range(len(pixels)):
        matches = []
        for candidate in (pixels[k], pixels[k][:, ::-1]):
            matches += list(np.flatnonzero((flat == candidate.reshape(-1)).all(axis=1)))
        assert matches, f"batch image {k} is not a (mirrored) training image"
        assert all(train_labels[j] == labels[k] for j in matches)
        chosen.append(matches[0])
    assert len(set(chosen)) == len(chosen), "images are drawn without replacement"


@needs_sample
def test_unaugmented_batch_is_the_chosen_images_normalised(sample) -> None:
    """augment=False: the images of rng.choice as they are (shared/data README's protocol)."""
    train_images, train_labels = sample
    images, labels = load_batch("cifar10", batch_size=64, data=SAMPLE, seed=42, augment=False)
    index = np.random.default_rng(42).choice(len(train_images), 64, replace=False)
    np.testing.assert_array_equal(labels, train_labels[index])
    np.testing.assert_array_equal(_to_uint8(images, "cifar10"), train_images[index])


@needs_sample
def test_npz_transform_follows_documented_draws(sample) -> None:
    """Recompute the batch from the documented order of random draws, without augmenting."""
    train_images, train_labels = sample
    seed, batch_size, pad = 11, 16, 4
    images, labels = load_batch("cifar10", batch_size=batch_size, data=SAMPLE, seed=seed)
    rng = np.random.default_rng(seed)
    index = rng.choice(len(train_images), batch_size, replace=False)
    offsets = rng.integers(0, 2 * pad + 1, size=(batch_size, 2))
    flips = rng.random(batch_size) < 0.5
    np.testing.assert_array_equal(labels, train_labels[index])
    pixels = _to_uint8(images, "cifar10")
    for k, j in enumerate(index):
        padded = np.pad(train_images[j], ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = offsets[k]
        expected = padded[dy : dy + 32, dx : dx + 32]
        if flips[k]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(pixels[k], expected)
    assert flips.any() and not flips.all()


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_batch("cifar10", data=tmp_path / "nope.npz")


def test_npz_garbled_file(tmp_path: Path) -> None:
    path = tmp_path / "garbled.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
    with pytest.raises(DataError, match=r"not a valid \.npz"):
        load_batch("cifar10", data=path)
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    with pytest.raises(DataError, match=r"not a valid \.npz"):
        load_batch("cifar10", data=text)


def test_npz_missing_key(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "x.npz", train_images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="lacks key\\(s\\) train_labels"):
        load_batch("cifar10", batch_size=2, data=path)


def test_npz_single_array_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"not a \.npz archive"):
        load_batch("cifar10", batch_size=2, data=path)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), "must be uint8"),
        (np.zeros((4, 8, 8), np.uint8), "N x H x W x 3"),
        (np.zeros((4, 3, 8, 8), np.uint8), "N x H x W x 3"),
    ],
)
def test_npz_wrong_images(tmp_path: Path, images: np.ndarray, message: str) -> None:
    path = _write_npz(tmp_path / "x.npz", train_images=images, train_labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=message):
        load_batch("cifar10", batch_size=2, data=path)


def test_npz_wrong_labels(tmp_path: Path) -> None:
    images = np.zeros((4, 8, 8, 3), np.uint8)
    path = _write_npz(tmp_path / "a.npz", train_images=images, train_labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="4 train_images but 3 train_labels"):
        load_batch("cifar10", batch_size=2, data=path)
    path = _write_npz(tmp_path / "b.npz", train_images=images, train_labels=np.full(4, 10))
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        load_batch("cifar10", batch_size=2, data=path)


def test_npz_batch_larger_than_available(tmp_path: Path) -> None:
    images = np.zeros((4, 8, 8, 3), np.uint8)
    path = _write_npz(tmp_path / "x.npz", train_images=images, train_labels=np.arange(4))
    with pytest.raises(DataError, match="batch_size 5 is larger than the 4 images"):
        load_batch("cifar10", batch_size=5, data=path)
    with pytest.raises(DataError, match="at least 1"):
        load_batch("cifar10", batch_size=0, data=path)


def test_npz_imagenet16_keeps_first_120_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 16, 16, 3), dtype=np.uint8)
    path = _write_npz(tmp_path / "x.npz", train_images=images, train_labels=np.arange(300))
    batch, labels = load_batch("imagenet16_120", batch_size=120, data=path)
    assert batch.shape == (120, 16, 16, 3)
    assert sorted(labels.tolist()) == list(range(120))
    with pytest.raises(DataError, match="larger than the 120 images"):
        load_batch("imagenet16_120", batch_size=121, data=path)


def test_load_npz_returns_raw_arrays(sample) -> None:
    images, labels = load_npz(SAMPLE)
    np.testing.assert_array_equal(images, sample[0])
    np.testing.assert_array_equal(labels, sample[1])


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_batch("mnist", data=SAMPLE)


# --------------------------------------------------------------------------- tfds source


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(("dataset", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_tfds_batch(tfds, dataset: str, classes: int, tmp_path: Path) -> None:
    with tfds.testing.mock_data(num_examples=24):
        images, labels = load_batch(dataset, batch_size=8, seed=1, data_dir=str(tmp_path))
        again, again_labels = load_batch(dataset, batch_size=8, seed=1, data_dir=str(tmp_path))
        with pytest.raises(DataError, match="batch_size 25 is larger than the 24"):
            load_batch(dataset, batch_size=25, data_dir=str(tmp_path))
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (8,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < classes
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)


def _fake_imagenet16(num: int):
    """A stand-in for tfds imagenet_resized/16x16: label = index mod 1000, image = label."""

    def as_data_source(*args, **kwargs):
        return [
            {"image": np.full((16, 16, 3), i % 256, np.uint8), "label": np.int64(i % 1000)}
            for i in range(num)
        ]

    return as_data_source


def test_tfds_imagenet16_120_keeps_labels_below_120(tfds, tmp_path: Path) -> None:
    with tfds.testing.mock_data(as_data_source_fn=_fake_imagenet16(3000)):
        images, labels = load_batch("imagenet16_120", batch_size=32, data_dir=str(tmp_path))
        again, _ = load_batch("imagenet16_120", batch_size=32, data_dir=str(tmp_path))
        # 3 x 120 images have a label below 120.
        with pytest.raises(DataError, match="larger than the 360 training images"):
            load_batch("imagenet16_120", batch_size=361, data_dir=str(tmp_path))
    assert images.shape == (32, 16, 16, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.max() < 120
    np.testing.assert_array_equal(images, again)


def test_tfds_missing_dataset_offline(tfds, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found in data_dir .* could not be downloaded"):
        load_batch("cifar10", batch_size=4, data_dir=str(tmp_path), download=False)


def test_imagenet2012_unprepared_says_how_to_prepare(tfds, tmp_path: Path) -> None:
    """A manual download is never attempted; the one-line error says how to prepare it."""
    with pytest.raises(DataError) as error:
        load_batch("imagenet2012", batch_size=4, data_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "not prepared (as ArrayRecord)" in message
    assert f"{tmp_path}/downloads/manual/" in message
    assert f"tfds build imagenet2012 --data_dir {tmp_path} --file_format array_record" in message
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_tfds_imagenet2012_batch_is_read_at_320(tfds, tmp_path: Path) -> None:
    """tfds' mock (no TensorFlow needed) gives images of random sizes; every one is brought
    to 320 x 320, normalised with ImageNet's constants, labels in 0..999."""
    info = get_dataset_info("imagenet2012")
    assert (info.name, info.num_classes, info.image_size) == ("imagenet1k", 1000, 320)
    with tfds.testing.mock_data(num_examples=12):
        images, labels = load_batch("imagenet2012", batch_size=6, seed=3, data_dir=str(tmp_path))
        again, again_labels = load_batch("ImageNet", batch_size=6, seed=3, data_dir=str(tmp_path))
    assert images.shape == (6, 320, 320, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 1000
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)


@pytest.mark.parametrize(("height", "width"), [(480, 640), (500, 375), (40, 30), (366, 366)])
def test_fixed_size_resizes_the_shorter_side_then_crops_the_centre(height, width) -> None:
    rows = np.linspace(0, 255, height).astype(np.uint8)[:, None, None]
    image = np.broadcast_to(rows, (height, width, 3)).copy()
    out = fixed_size(image, 320)
    assert out.shape == (320, 320, 3) and out.dtype == np.uint8
    # The shorter side becomes 366 = ceil(320 / 0.875); the crop keeps the middle rows.
    scale = 366 / min(height, width)
    kept = 320 / (height * scale)  # the fraction of the rows kept, centred
    middle = out[:, :, 0].mean(axis=1)
    assert abs(middle[0] - 255 * (1 - kept) / 2) < 4 and abs(middle[-1] - 255 * (1 + kept) / 2) < 4
