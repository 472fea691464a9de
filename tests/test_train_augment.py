"""The host-side training augmentations (SPEC 9): shapes, dtypes, ranges, switches, the
AutoAugment policy and random erasing."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from wrcor_jax.train import augment


def _image(height: int = 29, width: int = 41, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    "op",
    [
        lambda im, r: augment.resize_random_crop(im, 24, 0.875, r),
        lambda im, r: augment.pad_random_crop(im, 24, 4, r),
        lambda im, r: augment.random_flip(augment.resize_random_crop(im, 24, 1.0, r), r),
        lambda im, r: augment.color_jitter(im[:24, :24], 0.4, 0.4, 0.4, 0.2, r),
        lambda im, r: augment.lighting(im[:24, :24], 0.1, r),
        lambda im, r: augment.autoaugment(im[:24, :24].copy(), r),
    ],
    ids=["resize_crop", "pad_crop", "flip", "color_jitter", "lighting", "autoaugment"],
)
def test_uint8_ops_keep_shape_dtype_and_range(op) -> None:
    for seed in range(8):
        out = op(_image(seed=seed), _rng(seed))
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(("height", "width"), [(29, 41), (64, 30), (24, 24), (7, 9)])
def test_resize_random_crop_is_a_window_of_the_resized_image(height: int, width: int) -> None:
    image = _image(height, width)
    resized = augment.resize_shorter(image, 28)  # ceil(24 / 0.875)
    assert min(resized.shape[:2]) == 28
    out = augment.resize_random_crop(image, 24, 0.875, _rng(3))
    windows = np.lib.stride_tricks.sliding_window_view(resized, (24, 24, 3))[..., 0, :, :, :]
    assert (windows == out).all(axis=(-3, -2, -1)).any()


def test_pad_random_crop_shifts_at_most_the_padding() -> None:
    image = _image(32, 32)
    for seed in range(10):
        out = augment.pad_random_crop(image, 32, 4, _rng(seed))
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        assert any(
            np.array_equal(out, padded[dy : dy + 32, dx : dx + 32])
            for dy in range(9)
            for dx in range(9)
        )


def test_flip_mirrors_or_keeps() -> None:
    image = _image()
    outs = [augment.random_flip(image, _rng(seed)) for seed in range(20)]
    assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, image[:, ::-1]) for o in outs)


def test_strength_zero_is_identity_and_draws_nothing() -> None:
    image = _image()
    rng = _rng(1)
    assert augment.color_jitter(image, 0, 0, 0, 0, rng) is image
    assert augment.lighting(image, 0.0, rng) is image
    normalised = image.astype(np.float32)
    assert augment.random_erasing(normalised, 0.0, rng) is normalised
    assert rng.random() == _rng(1).random()


def test_brightness_jitter_is_torchvision_semantics() -> None:
    """Brightness only: one factor uniform in [0.6, 1.4], applied by ImageEnhance."""
    image = _image()
    out = augment.color_jitter(image, 0.4, 0, 0, 0, _rng(7))
    rng = _rng(7)
    rng.permutation(1)
    factor = rng.uniform(0.6, 1.4)
    expected = np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))
    np.testing.assert_array_equal(out, expected)


def test_hue_jitter_rotates_hue_and_keeps_grey() -> None:
    grey = np.full((8, 8, 3), 100, np.uint8)
    np.testing.assert_array_equal(augment.color_jitter(grey, 0, 0, 0, 0.5, _rng(2)), grey)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    assert not np.array_equal(augment.color_jitter(red, 0, 0, 0, 0.5, _rng(2)), red)


def test_lighting_adds_one_offset_per_channel() -> None:
    image = np.full((6, 5, 3), 128, np.uint8)
    out = augment.lighting(image, 0.1, _rng(4)).astype(int) - 128
    assert (out == out[0, 0]).all() and out.any()
    assert np.abs(out).max() < 40  # 255 * 3 sigma * 0.2175 ~ 17 on the first component


def _subpolicy_outcomes(image: np.ndarray) -> list[np.ndarray]:
    """Every image one sub-policy can produce: each subset of its two steps, each sign."""
    outcomes = []
    for subpolicy in augment.IMAGENET_POLICY:
        for applied in itertools.product([False, True], repeat=2):
            for signs in itertools.product([False, True], repeat=2):
                out = image
                for (name, _, magnitude), on, negate in zip(subpolicy, applied, signs, strict=True):
                    if on:
                        out = augment.apply_op(out, name, magnitude, negate)
                outcomes.append(out)
    return outcomes


def test_autoaugment_applies_a_subpolicy_of_the_imagenet_policy() -> None:
    assert len(augment.IMAGENET_POLICY) == 25
    image = _image(20, 20)
    outcomes = _subpolicy_outcomes(image)
    changed = 0
    for seed in range(30):
        out = augment.autoaugment(image, _rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert any(np.array_equal(out, o) for o in outcomes)
        changed += not np.array_equal(out, image)
        np.testing.assert_array_equal(out, augment.autoaugment(image, _rng(seed)))
    assert changed > 10


def _chroma(image: np.ndarray) -> float:
    """Mean spread between a pixel's channels: 0 for a grey image."""
    return float(np.ptp(image.astype(int), axis=-1).mean())


@pytest.mark.parametrize(
    ("name", "magnitude", "check"),
    [
        ("Invert", 4, lambda im, out: np.array_equal(out, 255 - im)),
        ("Solarize", 0, lambda im, out: np.array_equal(out, im)),  # threshold 256
        ("Solarize", 9, lambda im, out: np.array_equal(out, 255 - im)),  # threshold 0
        ("Posterize", 0, lambda im, out: np.array_equal(out, im)),  # 8 bits
        ("Posterize", 9, lambda im, out: np.array_equal(out, im & 0xF0)),  # 4 bits
        ("Rotate", 0, lambda im, out: np.array_equal(out, im)),
        ("ShearX", 0, lambda im, out: np.array_equal(out, im)),
        ("Color", 0, lambda im, out: _chroma(out) < _chroma(im) / 4),  # factor 0.1: near grey
    ],
)
def test_operation_magnitudes_follow_the_papers_ranges(name, magnitude, check) -> None:
    image = _image(16, 16)
    assert check(image, augment.apply_op(image, name, magnitude))


def test_random_erasing_changes_one_rectangle_only() -> None:
    image = np.zeros((40, 30, 3), np.float32)
    for seed in range(20):
        out = augment.random_erasing(image, 1.0, _rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        rows, cols = np.nonzero((out != image).any(axis=-1))
        assert rows.size, "p=1 always erases on an image this size"
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert rows.size == (bottom - top) * (right - left)  # a full rectangle
        area = (bottom - top) * (right - left) / (40 * 30)
        assert 0.015 <= area <= 0.36
        ratio = (bottom - top) / (right - left)
        assert 0.25 <= ratio <= 4.0
        noise = out[top:bottom, left:right]
        assert abs(noise.mean()) < 0.5 and 0.5 < noise.std() < 1.5  # N(0, 1) fill
    assert augment.random_erasing(image, 1.0, _rng(0)) is not image
