"""Host-side training augmentations of SPEC section 9, one image at a time.

Every op takes a uint8 H x W x 3 image (random erasing: the normalised float32 image) and a
`numpy.random.Generator`, and returns a new array of the same dtype. All randomness comes
from that generator, so one seed (grain's per-record rng) gives one output. An op switched
off (strength 0) draws nothing and returns its input unchanged.

The input pipeline applies them in this order: resize + random crop, flip, AutoAugment,
colour jitter, PCA lighting (all on uint8), then normalisation, then random erasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "IMAGENET_POLICY",
    "apply_op",
    "autoaugment",
    "color_jitter",
    "lighting",
    "pad_random_crop",
    "random_erasing",
    "random_flip",
    "resize_random_crop",
    "resize_shorter",
]

# --------------------------------------------------------------------------- geometry


def resize_shorter(image: np.ndarray, short: int) -> np.ndarray:
    """Resize (bicubic, as `data.batch.fixed_size` for eval) so the shorter side is `short`."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    new_h, new_w = max(short, round(h * scale)), max(short, round(w * scale))
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))


def resize_random_crop(
    image: np.ndarray, size: int, crop_pct: float, rng: np.random.Generator
) -> np.ndarray:
    """SPEC 9's train geometry: shorter side to ceil(size / crop_pct), a random size x size
    crop. The eval geometry is the same resize with the centre crop (`fixed_size`)."""
    resized = resize_shorter(image, math.ceil(size / crop_pct))
    h, w = resized.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return resized[top : top + size, left : left + size]


def pad_random_crop(
    image: np.ndarray, size: int, padding: int, rng: np.random.Generator
) -> np.ndarray:
    """The CIFAR geometry: resize to size x size, zero-pad, random size x size crop."""
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    return padded[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


# --------------------------------------------------------------------------- colour


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` of a turn, in PIL's 8-bit HSV (torchvision's PIL path)."""
    h, s, v = img.convert("HSV").split()
    hue = (np.asarray(h, dtype=np.int16) + int(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_jitter(
    image: np.ndarray,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """torchvision's ColorJitter on a PIL image: factors uniform in [max(0, 1 - s), 1 + s]
    (hue: shift uniform in [-hue, hue]), the non-zero adjustments in a random order."""
    enhancers: dict[str, Callable[[Image.Image, float], Image.Image]] = {
        "brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
        "contrast": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
        "saturation": lambda img, f: ImageEnhance.Color(img).enhance(f),
        "hue": _adjust_hue,
    }
    strengths = {
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
        "hue": hue,
    }
    active = [name for name, strength in strengths.items() if strength > 0]
    if not active:
        return image
    img = Image.fromarray(image)
    for k in rng.permutation(len(active)):
        name = active[k]
        strength = strengths[name]
        if name == "hue":
            value = rng.uniform(-strength, strength)
        else:
            value = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        img = enhancers[name](img, value)
    return np.asarray(img)


# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (Krizhevsky et al. 2012; the values of
# fb.resnet.torch and the reference's Lighting transform): eigenvalues and eigenvectors
# (columns).
_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_EIGVEC = np.array(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)


def lighting(image: np.ndarray, alphastd: float, rng: np.random.Generator) -> np.ndarray:
    """AlexNet's PCA lighting noise: add eigvec @ (alpha * eigval), alpha ~ N(0, alphastd),
    one RGB offset for the whole image (in [0, 1] units; clipped and rounded to uint8)."""
    if alphastd <= 0:
        return image
    alpha = rng.normal(0.0, alphastd, size=3)
    offset = 255.0 * (_EIGVEC @ (alpha * _EIGVAL))
    return np.clip(np.rint(image + offset), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- AutoAugment

_FILL = (128, 128, 128)  # grey, as the paper's reference code fills rotated-in corners


def _shear_x(img: Image.Image, shear: float) -> Image.Image:
    """x' = x + shear * (y - h/2): a horizontal shear about the image's middle row."""
    h = img.size[1]
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        (1.0, shear, -shear * h / 2.0, 0.0, 1.0, 0.0),
        resample=Image.Resampling.BILINEAR,
        fillcolor=_FILL,
    )


# Each op: (value at magnitude 0, value at magnitude 9, signed, function). Magnitudes 0..9
# are 10 uniformly spaced values over the paper's range (Cubuk et al. 2019, Table 6);
# "signed" ops are negated with probability 1/2.
_OPS: dict[str, tuple[float, float, bool, Callable[[Image.Image, float], Image.Image]]] = {
    "ShearX": (0.0, 0.3, True, _shear_x),
    "Rotate": (
        0.0,
        30.0,
        True,
        lambda img, v: img.rotate(v, resample=Image.Resampling.BILINEAR, fillcolor=_FILL),
    ),
    "AutoContrast": (0.0, 0.0, False, lambda img, _: ImageOps.autocontrast(img)),
    "Equalize": (0.0, 0.0, False, lambda img, _: ImageOps.equalize(img)),
    "Invert": (0.0, 0.0, False, lambda img, _: ImageOps.invert(img)),
    "Solarize": (256.0, 0.0, False, lambda img, v: ImageOps.solarize(img, round(v))),
    "Posterize": (8.0, 4.0, False, lambda img, v: ImageOps.posterize(img, round(v))),
    "Color": (0.1, 1.9, False, lambda img, v: ImageEnhance.Color(img).enhance(v)),
    "Contrast": (0.1, 1.9, False, lambda img, v: ImageEnhance.Contrast(img).enhance(v)),
    "Sharpness": (0.1, 1.9, False, lambda img, v: ImageEnhance.Sharpness(img).enhance(v)),
}

# The ImageNet policy of Cubuk et al. 2019 (appendix): 25 sub-policies of two
# (operation, probability, magnitude) steps.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def apply_op(image: np.ndarray, name: str, magnitude: int, negate: bool = False) -> np.ndarray:
    """One AutoAugment operation at magnitude 0..9 (`negate` flips a signed op's direction)."""
    start, stop, signed, op = _OPS[name]
    value = start + (stop - start) * magnitude / 9.0
    if signed and negate:
        value = -value
    return np.asarray(op(Image.fromarray(image), value))


def autoaugment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """AutoAugment's ImageNet policy: one sub-policy drawn uniformly, each of its two steps
    applied with its probability."""
    for name, probability, magnitude in IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]:
        if rng.random() < probability:
            image = apply_op(image, name, magnitude, negate=bool(rng.random() < 0.5))
    return image


# --------------------------------------------------------------------------- erasing


def random_erasing(
    image: np.ndarray,
    probability: float,
    rng: np.random.Generator,
    area: tuple[float, float] = (0.02, 1.0 / 3.0),
    min_ratio: float = 0.3,
) -> np.ndarray:
    """Random erasing (Zhong et al. 2020) of a normalised float image: with `probability`,
    one rectangle of `area` fraction and aspect ratio in [min_ratio, 1 / min_ratio]
    (log-uniform, as timm) is filled with N(0, 1) noise per pixel and channel (timm's
    'pixel' mode, i.e. noise at the dataset's own statistics). Up to 10 draws for a
    rectangle that fits; none fits: unchanged."""
    if probability <= 0 or rng.random() >= probability:
        return image
    h, w, c = image.shape
    log_ratio = (math.log(min_ratio), -math.log(min_ratio))
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        ratio = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < eh < h and 0 < ew < w:
            top = int(rng.integers(0, h - eh + 1))
            left = int(rng.integers(0, w - ew + 1))
            out = image.copy()
            out[top : top + eh, left : left + ew] = rng.standard_normal((eh, ew, c))
            return out
    return image
