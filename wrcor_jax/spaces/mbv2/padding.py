"""The padded shapes of the MobileNetV2 engine (`engine`): buckets for widths and rows, the
row tiles of the 1x1 pieces, and the parameters padded to them.

- channels are rounded up to a power of two (at least 32; above 256 also 3/4 of one: 384,
  768, 1536), but a sub-block's expanded width on images of 4,096 padded rows or more to a
  multiple of 64 where that is narrower (`wide_bucket`); padded weights, BN scales and
  biases are 0, so padded channels stay exactly 0 forward and backward;
- activations live as rows, (N, P, C) with P the per-image pixel count h*h rounded up to a
  power of two (above 8192 also 3/4 of one); the real side h is a run-time argument;
- the 1x1 pieces run over tiles of those rows (`tile_rows`: the same for every image above
  a size), so that they are keyed by the tile and their widths, not by the image's size;
- depthwise kernels are stored as 7 x 7 with the architecture's k x k at their centre.
"""

from __future__ import annotations

import jax
import numpy as np

from wrcor_jax.spaces.mbv2.arch import MBV2Arch, ResBlock
from wrcor_jax.spaces.mbv2.network import block_name, layer_name

MIN_CHANNELS = 32
"""The narrowest bucket. Widths below 32 (16 and 24 in the space) occur in a few early blocks,
and giving them buckets of their own multiplied the keys met rarely: at least 8, 40 sampled
architectures met 1.34x the keys of the first 20 (issue 12 asks for at most 1.3x), at least
32, 1.26x, for ~2% more padded work (docs/mbv2_engine.md)."""


FINE_CHANNELS = 256
FINE_ROWS = 8192
"""Above these sizes a bucket may also be 3/4 of a power of two. Wide tensors at the first
stages held most of the memory at batch 64 (a 144 x 144 image's 20,736 rows padded to 32,768
and 288 channels to 512 stored 2.8x the real expand output), and they are few enough in
kind that the extra keys are rare (docs/mbv2_engine.md)."""


def bucket(size: int, least: int, fine_from: int) -> int:
    """The next power of two at least `least`, or 3/4 of it when that is above `fine_from`
    and still holds `size`."""
    power = max(least, 1 << (size - 1).bit_length())
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters > fine_from and size <= three_quarters else power


def channel_bucket(channels: int) -> int:
    """Padded width: the next power of two, at least `MIN_CHANNELS`, or 3/4 of one above
    `FINE_CHANNELS`."""
    return bucket(channels, MIN_CHANNELS, FINE_CHANNELS)


def rows_bucket(pixels: int) -> int:
    """Padded pixels per image: the next power of two, or 3/4 of one above `FINE_ROWS`."""
    return bucket(pixels, 1, FINE_ROWS)


TILE_ROWS = 128
WHOLE_FROM = 4096
"""The 1x1 pieces run over tiles of 128 rows per image, but for images of at most 128 or at
least 4,096 padded rows, which they take whole. Keyed by their rows, the 1x1 pieces met
1.32x the keys of the first 20 of 40 sampled architectures (mean over 20 samples; 13 of 20
over issue 12's 1.3x); keyed so, 1.22x, at most 1.28x. Large images are few in kind, and
tiled they slowed the depthwise piece, which joined and split the tiles; tiles of 64 rows
made more calls for slightly fewer keys. Large images in tiles of 1,024 rows, their
padding-only tiles skipped, still lost more in the depthwise piece (+2.0 s over seeds 0-5,
before it read tiles natively; +0.5 s in its forward after) than the 1x1 pieces gained
(docs/mbv2_engine.md)."""


def tile_rows(p: int) -> int:
    """Rows per image of the tiles a 1x1 piece runs over, on images of `p` padded rows."""
    return p if p <= TILE_ROWS or p >= WHOLE_FROM else TILE_ROWS


WIDE_STEP = 64
"""A sub-block's expanded (depthwise) width on images of at least `WHOLE_FROM` padded rows
is padded to a multiple of this where that is narrower than its bucket (144 channels to 192,
not 256; 288 to 320, not 384): those tensors carry most of an architecture's memory
traffic, and they are few in kind, so the keys stay about as many (docs/mbv2_engine.md)."""


def wide_bucket(channels: int, rows: int) -> int:
    """Padded expanded width of a sub-block whose input has `rows` padded rows per image."""
    bucketed = channel_bucket(channels)
    if rows >= WHOLE_FROM:
        return min(bucketed, -(-channels // WIDE_STEP) * WIDE_STEP)
    return bucketed


def side_after(side, stride: int):
    """The side of a stride-1 or stride-2 'same' conv's output (an odd side rounds up);
    `side` an int, or traced (stride 1 adds nothing to the trace)."""
    return (side + 1) // 2 if stride == 2 else side


MAX_KERNEL = 7
"""Depthwise kernels are stored padded to this size, centred (`pad_params`)."""


def _pad_axes(
    leaf: np.ndarray, axes: tuple[int, ...], expanded: int | None = None, rows: int = 0
) -> np.ndarray:
    """Zero-pad the given axes of a leaf to their channel buckets, the `expanded` axis (a
    sub-block's expanded width, its input `rows` padded rows per image) to `wide_bucket`."""
    pads = [(0, 0)] * leaf.ndim
    for axis in axes:
        size = leaf.shape[axis]
        padded = wide_bucket(size, rows) if axis == expanded else channel_bucket(size)
        pads[axis] = (0, padded - size)
    return np.pad(np.asarray(leaf), pads)


def _pad_kernel(kernel: np.ndarray) -> np.ndarray:
    """A depthwise kernel's k x k centred in `MAX_KERNEL` x `MAX_KERNEL` zeros."""
    edge = (MAX_KERNEL - kernel.shape[0]) // 2
    return np.pad(kernel, ((edge, edge), (edge, edge), (0, 0), (0, 0)))


def _expanded_axis(keys: list[str], leaf: np.ndarray) -> int | None:
    """Which axis of a sub-block's leaf holds its expanded width, if one does."""
    if keys[2] in ("expand", "depthwise") or keys[2:4] == ["se", "restore"]:
        return leaf.ndim - 1
    if keys[-1] == "kernel" and (keys[2] == "project" or keys[2:4] == ["se", "reduce"]):
        return 2
    return None


def input_rows(arch: MBV2Arch) -> dict[tuple[str, str], int]:
    """Padded rows per image of each sub-block's input, by (block, layer) name."""
    stem, *rest = arch.blocks
    side, rows = side_after(arch.resolution, stem.stride), {}
    for index, block in enumerate(rest, start=1):
        if not isinstance(block, ResBlock):  # a 1x1 conv block: stride 1, no expanded width
            continue
        for j in range(block.layers):
            rows[block_name(index), layer_name(j)] = rows_bucket(side * side)
            side = side_after(side, block.stride if j == 0 else 1)
    return rows


def pad_params(params: dict, rows: dict[tuple[str, str], int] | None = None) -> dict:
    """The parameter tree with every width padded to its bucket with zeros, and depthwise
    kernels to `MAX_KERNEL`, centred. The stem keeps its 3 input channels, a depthwise
    kernel its 1, the classifier its classes. `rows` (`input_rows`) gives each sub-block's
    input rows, for its expanded width's `wide_bucket`; without it that is a bucket too."""

    def pad(path: tuple, leaf: np.ndarray) -> np.ndarray:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] == "classifier":
            return _pad_axes(leaf, (0,) if keys[-1] == "kernel" else ())
        expanded, rows_in = None, 0
        if rows and (keys[0], keys[1]) in rows:
            expanded, rows_in = _expanded_axis(keys, leaf), rows[keys[0], keys[1]]
        if leaf.ndim == 1:
            return _pad_axes(leaf, (0,), expanded, rows_in)
        if "depthwise" in keys:
            return _pad_kernel(_pad_axes(leaf, (3,), expanded, rows_in))
        if keys[0] == block_name(0) and leaf.shape[2] == 3:
            return _pad_axes(leaf, (3,))
        return _pad_axes(leaf, (2, 3), expanded, rows_in)

    return jax.tree_util.tree_map_with_path(pad, params)


def unpad(grads: dict, params: dict) -> dict:
    """A padded gradient tree cut back to the shapes of `params`, as NumPy: channels from the
    start, a conv kernel's two spatial axes (padded only for depthwise kernels) centred."""

    def cut(p: np.ndarray, g: jax.Array) -> np.ndarray:
        spatial = 2 if np.ndim(p) == 4 else 0
        starts = [(g.shape[a] - n) // 2 if a < spatial else 0 for a, n in enumerate(np.shape(p))]
        return np.asarray(g)[
            tuple(slice(s, s + n) for s, n in zip(starts, np.shape(p), strict=True))
        ]

    return jax.tree.map(cut, params, jax.device_get(grads))
