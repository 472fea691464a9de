"""Compile-bounded MobileNetV2-space responses: padded pieces composed at run time.

`capture.site_sums` traces one program per architecture, and almost no two sampled
architectures share every shape, so a search compiles all the time (30-45 s each at batch
64). Here each sub-block runs as compiled pieces -- 1x1 convs with BatchNorm (expand,
project, shortcut, the final 1x1 conv), depthwise conv + squeeze-excite, head -- chained in
Python (docs/mbv2_engine.md), and every piece sees padded shapes:

- channels are rounded up to a power of two (at least 32; above 256 also 3/4 of one: 384,
  768, 1536), but a sub-block's expanded width on images of 4,096 padded rows or more to a
  multiple of 64 where that is narrower (`wide_bucket`); padded weights, BN scales and
  biases are 0, so padded channels stay exactly 0 forward and backward;
- activations live as rows, (N, P, C) with P the per-image pixel count h*h rounded up to a
  power of two (above 8192 also 3/4 of one), and the real side h is a run-time argument:
  BatchNorm statistics, SE and head pooling, and every correlation count only the real rows
  and channels, and the depthwise conv reads its taps as dynamic row offsets with column
  masks (on CPU a C++ custom call, `depthwise_cpu`, that sums only the taps inside the
  image);
- the 1x1 pieces run over tiles of those rows (`tile_rows`: the same for every image above
  a size), so that they are keyed by the tile and their widths, not by the image's size;
  their BatchNorm statistics are running sums over the tiles, and tiles of padding rows
  only are skipped (zeros stand in for their outputs).

The depthwise kernel is stored as 7 x 7 with the architecture's k x k at its centre, and its
radius is a run-time argument too: the piece holds one branch per kernel size and runs the
architecture's. A piece is then keyed by (P or its tile, channel buckets, stride) and never
by the resolution, the kernel size or the exact widths, so compilations stop growing after
the first few dozen architectures.
Padding changes no result beyond float32 summation order (tests/test_mbv2_engine.py).
The stem (block 0, a k x k conv on the resized images) runs exactly in NHWC, keyed by the
resolution; it is the only place the resolution enters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.compilation import RetainedJit, register_switch
from wrcor_jax.layers import batch_norm, conv2d
from wrcor_jax.responses import KINDS, SiteSums
from wrcor_jax.spaces.mbv2 import depthwise_cpu, folded_cpu, gated_cpu, gram_cpu, stem_cpu
from wrcor_jax.spaces.mbv2.arch import ConvBlock, MBV2Arch, ResBlock
from wrcor_jax.spaces.mbv2.measures import batch_halves
from wrcor_jax.spaces.mbv2.network import (
    BN_EPS,
    block_name,
    layer_name,
    resize_bilinear,
    se_channels,
)
from wrcor_jax.spaces.nb201_measures import _min_channel_eigenvalue, log_sqrt_or_zero
from wrcor_jax.spaces.nb201_pieces import cross_entropy

HIGHEST = jax.lax.Precision.HIGHEST
SE_KINDS = ("act", "act_grad")  # the squeeze-excite ReLU: the reference's sites
BLOCK_KINDS = ("block_act", "block_act_grad")  # every other ReLU


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


# --------------------------------------------------------------------------- masked maths


def _row_mask(p: int, rows: jax.Array) -> jax.Array:
    """(P, 1): which of P stored rows are real."""
    return (jnp.arange(p) < rows)[:, None]


def _channel_mask(c: int, channels: jax.Array) -> jax.Array:
    return jnp.arange(c) < channels


def _mask_weights(mask: jax.Array, dtype) -> jax.Array:
    """A boolean mask as 1s and 0s, for sums weighted by it. Such a sum reads the summed
    array once: XLA:CPU's YNNPACK sums fuse products with broadcast arrays, but not a select
    nor a comparison, and with the mask itself (or this product's comparison, fused into the
    sum) in the way, the summed operand was written out full size first (1 GB at the widest
    depthwise output; docs/mbv2_engine.md). The barrier keeps the comparison out of the sum."""
    return jax.lax.optimization_barrier(mask.astype(dtype))


def _row_weights(p: int, rows: jax.Array, dtype) -> jax.Array:
    """(P, 1): 1 for the real rows of P stored rows, 0 for the padded ones (`_mask_weights`)."""
    return _mask_weights(_row_mask(p, rows), dtype)


def masked_abs_corrcoef(x: jax.Array, mask: jax.Array, count: jax.Array) -> tuple:
    """|corrcoef| between samples of x over its real entries (`mask`, `count` of them per
    sample), and whether it is defined; numpy's corrcoef of the unpadded rows."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.sum(axis=1, keepdims=True) / count
    centred = (flat - mean) * jnp.broadcast_to(mask, x.shape[1:]).reshape(1, -1)
    gram = jax.lax.dot_general(centred, centred, (((1,), (1,)), ((), ())), precision=HIGHEST)
    norms = jnp.sqrt(jnp.diagonal(gram))
    valid = jnp.all(norms > 0)
    safe = jnp.where(norms > 0, norms, 1.0)
    corr = jnp.clip(gram / safe[:, None] / safe[None, :], -1.0, 1.0)
    return jnp.where(valid, jnp.abs(corr), 0.0), valid.astype(jnp.int32)


def row_moments(y: jax.Array, rows: jax.Array) -> jax.Array:
    """(2, C): the sum of (N, P, C) rows y over the real rows (those of y must be 0: every
    producer masks them) and the sum of squares about their mean."""
    total = y.sum(axis=(0, 1))
    # a barrier, so that this y - mean is not the normalisation's: one array read by a
    # YNNPACK sum and by a loop fusion was written out full size (docs/mbv2_engine.md)
    centre = jax.lax.optimization_barrier(total / (y.shape[0] * rows))
    weights = _row_weights(y.shape[1], rows, y.dtype)
    return jnp.stack([total, (jnp.square(y - centre) * weights).sum(axis=(0, 1))])


def _batch_norm_rows_rstd(y: jax.Array, moments: jax.Array, w: dict, rows: jax.Array) -> tuple:
    """Training-mode BatchNorm of (N, P, C) rows over the real rows, given their
    `row_moments` (padded rows come out 0), and the 1 / std it divided by."""
    n = y.shape[0] * rows
    mean = moments[0] / n
    rstd = jax.lax.rsqrt(moments[1] / n + BN_EPS)
    return ((y - mean) * rstd * w["scale"] + w["bias"]) * _row_mask(y.shape[1], rows), rstd


def _matmul_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(N, P, C) @ (C, D) as one 2-D product: autodiff of the 3-D einsum gave a weight
    gradient contracting two axes, which XLA:CPU ran several times slower."""
    n, p, c = x.shape
    return (x.reshape(n * p, c) @ kernel).reshape(n, p, -1)


def _shifted_taps(x: jax.Array, side: jax.Array, r: int, sign: int = 1):
    """For each tap (dy, dx) of a (2r+1)^2 window: its indices and x read sign x (dy * side +
    dx) rows away, zero where that crosses the image's left or right edge or the ends."""
    tap = _tap_reader(x, side, r, sign)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yield dy + r, dx + r, tap(dy, dx)


def _tap_reader(x: jax.Array, side: jax.Array, r: int, sign: int = 1) -> Callable:
    """(dy, dx) -> x shifted by one tap of a (2r+1)^2 window (`_shifted_taps`); dy and dx
    may be traced, so that a loop over the taps reads one at a time."""
    p = x.shape[1]
    pad = r * (math.isqrt(p) + 1)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    column = jnp.arange(p) % side

    def tap(dy, dx) -> jax.Array:
        start = pad + sign * (dy * side + dx)
        shifted = jax.lax.dynamic_slice_in_dim(padded, start, p, axis=1)
        inside = ((column + sign * dx >= 0) & (column + sign * dx < side))[None, :, None]
        return jnp.where(inside, shifted, 0.0)

    return tap


def _radius(kernel: jax.Array) -> int:
    return (kernel.shape[0] - 1) // 2


@jax.custom_vjp
def depthwise_rows(x: jax.Array, kernel: jax.Array, side: jax.Array) -> jax.Array:
    """Stride-1 k x k depthwise conv (zero padding (k-1)/2) of square images of side `side`
    stored as rows: the sum over taps of a row-shifted copy times a column mask. Output rows
    beyond side**2 are not meaningful (callers mask them).

    Its backward is written out as the same sum with the shifts reversed: left to autodiff,
    the transposed dynamic slices (one dynamic-update-slice into zeros per tap) made the
    depthwise + SE backward 15x slower than its forward."""
    return sum(kernel[i, j, 0] * t for i, j, t in _shifted_taps(x, side, _radius(kernel)))


def _depthwise_rows_fwd(x: jax.Array, kernel: jax.Array, side: jax.Array) -> tuple:
    return depthwise_rows(x, kernel, side), (x, kernel, side)


def _depthwise_rows_bwd(residuals: tuple, g: jax.Array) -> tuple:
    x, kernel, side = residuals
    r = _radius(kernel)
    dx = sum(kernel[i, j, 0] * t for i, j, t in _shifted_taps(g, side, r, sign=-1))
    return dx, _tap_sums(x, g, side, r, jnp.zeros_like(kernel)), None


depthwise_rows.defvjp(_depthwise_rows_fwd, _depthwise_rows_bwd)


def _tap_sums(
    x: jax.Array, g: jax.Array, side: jax.Array, r: int, into: jax.Array, offset: int = 0
) -> jax.Array:
    """A depthwise kernel's cotangent: `into` with entry (offset + i, offset + j, 0) set, for
    each tap (i, j) of the (2r+1)^2 window, to x shifted by the tap times the output's
    cotangent g, summed over images and rows. A loop over the taps: unrolled, XLA:CPU
    kept every tap's shifted copy at once (49 copies of x at k = 7, 41 GB for a 7 x 7
    stride-2 block at 128 px and batch 64) and ran 1.5-3.4x slower."""
    tap, k = _tap_reader(x, side, r), 2 * r + 1
    dy, dx = (d.ravel() - r for d in jnp.indices((k, k)))
    sums = jax.lax.map(lambda d: (tap(*d) * g).sum(axis=(0, 1)), (dy, dx))
    return into.at[offset : offset + k, offset : offset + k, 0].set(sums.reshape(k, k, -1))


def _out_side(side, stride: int):
    """The side of a stride-1 or stride-2 'same' conv's output (an odd side rounds up);
    `side` an int, or traced (stride 1 adds nothing to the trace)."""
    return (side + 1) // 2 if stride == 2 else side


def subsample_rows(x: jax.Array, side: jax.Array, p_out: int) -> jax.Array:
    """Every other row and column (what a stride-2 conv centred on even pixels reads):
    side s -> ceil(s / 2), stored in p_out rows, padded rows 0."""
    out_side = _out_side(side, 2)
    q = jnp.arange(p_out)
    source = 2 * (q // out_side) * side + 2 * (q % out_side)
    inside = q < out_side * out_side
    taken = jnp.take(x, jnp.where(inside, source, 0), axis=1)
    return jnp.where(inside[None, :, None], taken, 0.0)


MAX_KERNEL = 7
"""Depthwise kernels are stored padded to this size, centred (`pad_params`)."""
RADII = tuple(range(1, MAX_KERNEL // 2 + 1))  # k = 3, 5, 7


def _centre(kernel: jax.Array, r: int) -> jax.Array:
    """The (2r+1)^2 centre of a `MAX_KERNEL`-padded kernel."""
    centre = MAX_KERNEL // 2
    return kernel[centre - r : centre + r + 1, centre - r : centre + r + 1]


def _taps_branches(stride: int, p_out: int) -> list[Callable]:
    """Per radius r, the stride-`stride` depthwise conv of ReLU(x) (x: the input's tiles,
    joined here) with the centre (2r+1)^2 of a `MAX_KERNEL`-padded kernel as XLA's sum of
    taps, its padded rows zeroed. The ReLU is inside the branch so that it fuses into the
    taps' padded copy: outside, ReLU(x) was one more full-size array (1 GB at the widest)."""

    def at_radius(r: int) -> Callable:
        def conv(x: tuple, kernel: jax.Array, side: jax.Array) -> jax.Array:
            y = depthwise_rows(jax.nn.relu(_whole(x)), _centre(kernel, r), side)
            if stride == 2:
                return subsample_rows(y, side, p_out)
            return jnp.where(_row_mask(y.shape[1], side * side), y, 0.0)

        return conv

    return [at_radius(r) for r in RADII]


NATIVE_CALLS = (depthwise_cpu, gram_cpu, folded_cpu, stem_cpu, gated_cpu)
"""The depthwise conv, the expand's centred gram and its folded conv's backward, the stem's
first conv and the project's gated product, as C++ custom calls on CPU."""


def native_cpu() -> bool:
    """Whether the pieces trace the native custom calls of `NATIVE_CALLS` (else XLA's own
    forms): on CPU where they are built and the process has one local device (the calls have
    no sharding rule: a batch split over local devices would be gathered). Other processes'
    devices do not count: a `jax.distributed` job's processes each score their own
    architectures on their own device. A switch of the stored programs' keys, which also
    registers the calls' targets before a stored program runs them."""
    on_cpu = jax.default_backend() == "cpu" and jax.local_device_count() == 1
    return on_cpu and all(module.available() for module in NATIVE_CALLS)


register_switch(native_cpu)


def _conv_branches(
    stride: int, p_out: int, transposed: bool, moments: bool = False
) -> list[Callable]:
    """Per radius, the conv (x, kernel, side) (with `moments`, and its output's
    `row_moments`), or with `transposed` (x, kernel, side, g) -> the cotangent at x, x and
    the output's cotangent g as tiles (and x's cotangent): on CPU `depthwise_cpu`'s custom
    call where it is built and the process sees one device, which reads and writes the
    tiles where they lie (joining and splitting them cost ~2% of WRCor) and sums the
    moments while each output row is in cache, elsewhere (and there otherwise) XLA's taps.
    The choice is made when tracing, for the default backend: `lax.platform_dependent`
    traced the taps as well, and tracing the taps' branches (and their vjp) was most of
    the time an architecture with new shapes spent before its programs ran."""
    if native_cpu():
        return [_native_branch(r, stride, p_out, transposed, moments) for r in RADII]
    taps = _taps_branches(stride, p_out)
    if transposed:
        return [_taps_backward(conv) for conv in taps]
    if moments:
        return [_with_moments(conv, stride) for conv in taps]
    return taps


def _native_branch(r: int, stride: int, p_out: int, transposed: bool, moments: bool) -> Callable:
    """`_conv_branches`' branch at radius r on `depthwise_cpu`'s custom call."""

    def forward(x: tuple, kernel: jax.Array, side: jax.Array):
        rows = p_out if stride == 2 else _rows(x)
        out = depthwise_cpu.depthwise(
            x, _centre(kernel, r), side, (), rows, 1, stride, False, moments
        )
        return out if moments else out[0]

    def backward(x: tuple, kernel: jax.Array, side: jax.Array, g: tuple) -> tuple:
        return depthwise_cpu.depthwise(
            g, _centre(kernel, r), side, x, _rows(x), len(x), stride, True
        )

    return backward if transposed else forward


def _taps_backward(conv: Callable) -> Callable:
    """The cotangent at x of a taps branch, by its vjp."""

    def backward(x: tuple, kernel: jax.Array, side: jax.Array, g: tuple) -> tuple:
        return jax.vjp(lambda x: conv(x, kernel, side), x)[1](_whole(g))[0]

    return backward


def _with_moments(conv: Callable, stride: int) -> Callable:
    """A taps branch that also returns its output's `row_moments`."""

    def forward(x: tuple, kernel: jax.Array, side: jax.Array) -> tuple:
        y = conv(x, kernel, side)
        out_side = _out_side(side, stride)
        return y, row_moments(y, out_side * out_side)

    return forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def depthwise_strided_rows(
    x: tuple, kernel: jax.Array, geometry: jax.Array, stride: int, p_out: int
) -> jax.Array:
    """The depthwise conv of ReLU(x) with the stride (subsampling rows), its padded rows
    zeroed, for a kernel padded to `MAX_KERNEL`; x: the input as tiles of consecutive rows;
    geometry: (side, radius), both known only at run time. On XLA:CPU it is
    `depthwise_cpu`'s custom call where that is built, 1.5-6x faster than XLA's taps and
    2-14x in the backward (docs/mbv2_engine.md).

    The conv is a `lax.switch` over the radii, so one program serves k = 3, 5 and 7: keyed
    by k, the depthwise + SE piece met 1.3x the keys of the first 20 sampled architectures
    at 40 (issue 12 asks for at most 1.3x), and a conditional's result is written out once,
    which XLA:CPU needs anyway: it otherwise fuses the taps into every pass that reads the
    output, BatchNorm's three included. Its backward is a switch of each branch's input
    cotangent and another of the kernel's, which XLA drops where no one reads it (WRCor,
    jacob_cov): autodiff of the switch would store every branch's residuals."""
    side, radius = geometry[0], geometry[1]
    return jax.lax.switch(radius - 1, _conv_branches(stride, p_out, False), x, kernel, side)


def _depthwise_strided_fwd(x, kernel, geometry, stride: int, p_out: int) -> tuple:
    return depthwise_strided_rows(x, kernel, geometry, stride, p_out), (x, kernel, geometry)


def depthwise_strided_moments(
    x: tuple, kernel: jax.Array, geometry: jax.Array, stride: int, p_out: int
) -> tuple[jax.Array, jax.Array]:
    """`depthwise_strided_rows` and its output's `row_moments`, for the forward pass alone
    (the backward reads the forward's output back: `batch_norm_saved`)."""
    branches = _conv_branches(stride, p_out, False, moments=True)
    return jax.lax.switch(geometry[1] - 1, branches, x, kernel, geometry[0])


def depthwise_strided_transposed(
    x: tuple,
    kernel: jax.Array,
    geometry: jax.Array,
    g: tuple,
    stride: int,
    p_out: int,
    kernel_grad: bool = True,
) -> tuple:
    """The cotangents at x (as its tiles) and at the kernel of `depthwise_strided_rows`,
    from its output's cotangent g, given as tiles too (the depthwise + SE piece's backward
    keeps its output in the project's tiles). Without `kernel_grad` the kernel's is zeros:
    for a caller that discards it, since tracing the taps' kernel gradient for three radii
    cost seconds per new shape even where XLA then dropped it."""
    side, branch = geometry[0], geometry[1] - 1
    d_x = jax.lax.switch(branch, _conv_branches(stride, p_out, True), x, kernel, side, g)
    if not kernel_grad:
        return d_x, jnp.zeros_like(kernel)
    branches = _kernel_cotangents(stride, p_out)
    return d_x, jax.lax.switch(branch, branches, x, kernel, side, g)


def _kernel_cotangents(stride: int, p_out: int) -> list[Callable]:
    """Per radius r, (x, kernel, side, g) -> the cotangent at the `MAX_KERNEL`-padded kernel
    of `_conv_branches`' conv at r (x and g as tiles): each tap's shifted ReLU(x) times the
    output's cotangent, summed over images and output pixels. On CPU `depthwise_cpu`'s
    custom call where the forward's is (10-30x faster than the taps, which read x and g
    once per tap), elsewhere the taps at full resolution, as the conv's vjp computes it;
    written out because tracing that vjp (the conv, its data cotangent too, for three
    radii) was most of the time a synflow pass spent on an architecture's new shapes
    before its programs ran: 2-3 s per architecture of a search."""

    def at_radius(r: int) -> Callable:
        inner = MAX_KERNEL // 2 - r

        def native(x: tuple, kernel: jax.Array, side: jax.Array, g: tuple) -> jax.Array:
            small = depthwise_cpu.kernel_cotangent(x, g, _centre(kernel, r), side, stride)
            return jnp.pad(small, ((inner, inner), (inner, inner), (0, 0), (0, 0)))

        def taps(x: tuple, kernel: jax.Array, side: jax.Array, g: tuple) -> jax.Array:
            h, g = jax.nn.relu(_whole(x)), _whole(g)
            if stride == 2:  # the subsample's transpose: g back on the even rows and columns
                g = jax.vjp(lambda y: subsample_rows(y, side, p_out), h)[1](g)[0]
            else:
                g = jnp.where(_row_mask(g.shape[1], side * side), g, 0.0)
            return _tap_sums(h, g, side, r, jnp.zeros_like(kernel), inner)

        return native if native_cpu() else taps

    return [at_radius(r) for r in RADII]


def _depthwise_strided_bwd(stride: int, p_out: int, residuals: tuple, g: jax.Array) -> tuple:
    return (*depthwise_strided_transposed(*residuals, (g,), stride, p_out), None)


depthwise_strided_rows.defvjp(_depthwise_strided_fwd, _depthwise_strided_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def batch_norm_saved(
    transposed: Callable, x, w: dict, geometry: jax.Array, rows: jax.Array, z: tuple, rstd
) -> tuple:
    """BatchNorm of a conv of x with w["kernel"] over its `rows` real rows, for the backward
    pass, given what the forward pass computed: its output z, as tiles of rows, and 1 / std.
    Returns z; its backward is BatchNorm's closed form, reading the conv output's normalised
    value back from z tile by tile, then the conv's `transposed` (x, kernel, geometry, the
    output's cotangent as tiles) -> (x's cotangent, the kernel's), which reads x only for
    the kernel's gradient. Recomputed under autodiff instead, XLA:CPU fused a depthwise
    conv's nine taps into each of the six passes that read its output (the depthwise + SE
    backward took ~2.4x longer); joined, the tiles and their cotangents were two copies of
    the output. A zero BN scale gets a zero gradient (padded channels; PyTorch's default
    BatchNorm scale is 1)."""
    del transposed, x, w, geometry, rows, rstd
    return z


def _batch_norm_saved_fwd(transposed: Callable, x, w, geometry, rows, z, rstd) -> tuple:
    return z, (x, w, geometry, rows, z, rstd)


def _batch_norm_saved_bwd(transposed: Callable, residuals: tuple, g: tuple) -> tuple:
    x, w, geometry, rows, z, rstd = residuals
    n = z[0].shape[0] * rows
    scale = w["scale"]
    live = scale != 0  # a zero scale (padded channels) passes no gradient to y
    masks = [_tile_mask(z_t.shape[1], t, rows) for t, z_t in enumerate(z)]
    normed = [
        jnp.where(m & live, (z_t - w["bias"]) / jnp.where(live, scale, 1.0), 0.0)
        for m, z_t in zip(masks, z, strict=True)
    ]
    g = [jnp.where(m, g_t, 0.0) for m, g_t in zip(masks, g, strict=True)]
    d_bias = sum(g_t.sum(axis=(0, 1)) for g_t in g)
    d_scale = sum((g_t * y).sum(axis=(0, 1)) for g_t, y in zip(g, normed, strict=True))
    d_y = tuple(
        jnp.where(m, scale * rstd * (g_t - d_bias / n - y * (d_scale / n)), 0.0)
        for m, g_t, y in zip(masks, g, normed, strict=True)
    )
    d_x, d_kernel = transposed(x, w["kernel"], geometry, d_y)
    d_w = {"kernel": d_kernel, "scale": d_scale, "bias": d_bias}
    return d_x, d_w, None, None, None, None


batch_norm_saved.defvjp(_batch_norm_saved_fwd, _batch_norm_saved_bwd)


# --------------------------------------------------------------------------- pieces
#
# A piece function maps (w, inputs, dims) to (outputs, sites); `dims` holds the run-time
# sizes (int32), sites maps a site's name to (value, mask, count) and its kinds. A probe
# adds a perturbation at each site so that one vjp yields the gradients there too.

Sites = dict[str, tuple[jax.Array, jax.Array, jax.Array]]


def _norm(y: jax.Array, w: dict, norm: bool) -> jax.Array:
    """BatchNorm over the batch (the SE's N x C values), or nothing when switched off."""
    return batch_norm(y, w["scale"], w["bias"], eps=BN_EPS) if norm else y


BN_SITE = "bn_"
"""Prefix of the sites where zen's pass records a BatchNorm input's per-channel variance."""


def _record_variance(probe, name: str, variance: jax.Array, channels) -> None:
    """Record, as site `bn_<name>`, the batch variance per channel of a BatchNorm's input,
    of which the first `channels` are real (Zen-score's sigma terms read it)."""
    probe(BN_SITE + name, variance, _channel_mask(variance.shape[-1], channels), channels)


def _variance(rstd: jax.Array) -> jax.Array:
    """The batch variance that BatchNorm's 1 / std came from."""
    return 1 / jnp.square(rstd) - BN_EPS


# The 1x1 pieces run over row tiles: (N, R, C), rows t*R .. (t+1)*R - 1 of every image, R set
# by the padded rows alone (`tile_rows`), so that their keys hold the tile, not the image's
# size. BatchNorm couples the tiles: its statistics are running sums over them (one piece
# call per tile, the total passed on), read by the tile's conv or normalisation. Reverse mode
# runs the same chain backwards, each call's vjp taking the summed cotangent of the totals
# it read (`MBV2Engine._backward` sums the cotangents of arrays read several times).


def _tile_mask(r: int, t: jax.Array, rows: jax.Array) -> jax.Array:
    """(R, 1): which of tile t's R rows are real."""
    return (t * r + jnp.arange(r) < rows)[:, None]


def _rows_sum(w, inputs, dims, probe, norm: bool, zen: bool):
    """The running sum over the tiles' rows (padded rows are 0): a mean's numerator. It
    serves the expand's input; `_conv_rows` sums its own output."""
    del w, dims, probe, norm, zen
    x, total = inputs
    return (total + x.sum(axis=(0, 1)),)


@jax.custom_vjp
def gram_matrix(flat: jax.Array) -> jax.Array:
    """flat^T flat, whose backward is one product, flat (g + g^T): autodiff took two and
    added them."""
    return jnp.dot(flat.T, flat, precision=HIGHEST)


def _gram_fwd(flat: jax.Array) -> tuple:
    return gram_matrix(flat), flat


def _gram_bwd(flat: jax.Array, g: jax.Array) -> tuple:
    return (jnp.dot(flat, g + g.T, precision=HIGHEST),)


gram_matrix.defvjp(_gram_fwd, _gram_bwd)


def _centred_gram(w, inputs, dims, probe, norm: bool, zen: bool):
    """The running C x C product of the real rows centred on the batch mean (the sum
    `total`): the covariance's numerator; on CPU `gram_cpu`'s custom call. dims: side, real
    channels, tile index."""
    del w, probe, norm, zen
    x, total, running = inputs
    rows = dims[0] * dims[0]
    mean = total / (x.shape[0] * rows)
    if native_cpu():
        return (running + gram_cpu.centred_gram(x, mean, rows, dims[2]),)
    centred = (x - mean) * _tile_mask(x.shape[1], dims[2], rows)
    return (running + gram_matrix(centred.reshape(-1, centred.shape[-1])),)


def _centred_squares(w, inputs, dims, probe, norm: bool, zen: bool):
    """The running sum of squares of the real rows about the batch mean (the sum `total`):
    the variance's numerator. dims: side, real channels, tile index."""
    del w, probe, norm, zen
    y, total, squares = inputs
    rows = dims[0] * dims[0]
    centred = (y - total / (y.shape[0] * rows)) * _tile_mask(y.shape[1], dims[2], rows)
    return (squares + jnp.square(centred).sum(axis=(0, 1)),)


@jax.custom_vjp
def folded_conv_saved(
    centred: jax.Array, kernel: jax.Array, scale: jax.Array, bias: jax.Array, mask, z
) -> jax.Array:
    """`folded_conv` for the backward pass, given its forward output z. Its backward reads
    the scale's gradient from z, sum(g (z - bias)) / scale, where autodiff contracted the
    rows of the centred input with g (a product as large as the conv, so the expand's
    backward took two where one serves); the kernel's gradient is that product, computed
    only where asked for (XLA drops it otherwise). A zero scale (padded channels) gets a
    zero gradient, as in `batch_norm_saved`. The cotangent at `centred`'s padded rows is not
    0 in XLA's form (the caller's mask drops it): masking the incoming cotangent wrote it out
    twice, once per reader, where the sums weight it by the mask instead. On CPU the sums and
    the product are `folded_cpu`'s custom call, one read of the cotangent."""
    del centred, kernel, scale, bias, mask
    return z


def _folded_conv_saved_fwd(centred, kernel, scale, bias, mask, z) -> tuple:
    return z, (centred, kernel, scale, bias, mask, z)


def _folded_conv_saved_bwd(residuals: tuple, g: jax.Array) -> tuple:
    centred, kernel, scale, bias, mask, z = residuals
    live = scale != 0
    # the sums and the product in one read of g, over the kernel's unpadded block only
    # (`folded_cpu`): 1.4-3.3x XLA's on the search's padded tiles
    if native_cpu():
        d_centred, (scaled, d_bias) = folded_cpu.folded_conv_cotangent(
            g, z, kernel * scale, bias, mask
        )
    else:
        weights = _mask_weights(mask, g.dtype)
        scaled = (g * (z - bias) * weights).sum(axis=(0, 1))
        d_centred = _matmul_rows(g, (kernel * scale).T)
        d_bias = (g * weights).sum(axis=(0, 1))
    d_scale = scaled / jnp.where(live, scale, 1.0)
    # centred's padded rows are 0: the kernel's gradient needs no mask
    d_kernel = (centred.reshape(-1, centred.shape[-1]).T @ g.reshape(-1, g.shape[-1])) * scale
    return d_centred, d_kernel, jnp.where(live, d_scale, 0.0), d_bias, None, None


folded_conv_saved.defvjp(_folded_conv_saved_fwd, _folded_conv_saved_bwd)


def folded_conv(centred, kernel, scale, bias, mask, saved: jax.Array | None) -> jax.Array:
    """The expand's conv with BatchNorm folded in, (centred @ (kernel * scale) + bias) on
    the real rows `mask` (`centred` is 0 elsewhere); `saved`: its output from the forward
    pass (`folded_conv_saved`), None to compute it. The bias is the product's last term,
    the mask times a last kernel row: added and masked after it, the wide output took one
    more pass (the 64 -> 384 expand of a 64 x 128-row tile: 2.9 -> 2.0 ms). On CPU it is
    `folded_cpu`'s call, over the real rows and the kernel's unpadded block, and is
    differentiated as `folded_conv_saved` of its output."""
    if saved is None and native_cpu():
        saved = folded_cpu.folded_conv(centred, kernel * scale, bias, mask)
    if saved is not None:
        return folded_conv_saved(centred, kernel, scale, bias, mask, saved)
    ones = jnp.broadcast_to(mask.astype(centred.dtype), (*centred.shape[:2], 1))
    augmented = jnp.concatenate([centred, ones], axis=-1)
    return _matmul_rows(augmented, jnp.concatenate([kernel * scale, bias[None]]))


def _expand(w, inputs, dims, probe, norm: bool, zen: bool, relu: bool, saved=None):
    """A tile's 1x1 conv and BatchNorm, its statistics taken from the input: mean(y) = mean(x)
    W and var(y) = diag(W^T cov(x) W), from x's running sum and centred product over all
    tiles. The normalisation folds into the kernel, so the wide output is written once (as
    BatchNorm of the conv output it took 4x the conv's time: XLA:CPU keeps BN's reductions
    and elementwise passes apart); its backward reads that output back (`saved`) for the
    scale's gradient, but where the piece applies the ReLU (`relu`: a 1x1 conv block; a
    sub-block's depthwise piece applies it). For outputs narrower than the input the
    product costs more than the conv: `_conv_rows` and `_batch_norm_tile` serve those.
    dims: side, real output channels, tile index."""
    del norm  # run only with BatchNorm (`MBV2Engine._pointwise`)
    x, total, gram = inputs
    side, channels, t = dims[0], dims[1], dims[2]
    rows = side * side
    kernel = w["kernel"][0, 0]
    n = x.shape[0] * rows
    variance = jnp.sum(kernel * ((gram / n) @ kernel), axis=0)
    scale = w["scale"] * jax.lax.rsqrt(variance + BN_EPS)
    mask = _tile_mask(x.shape[1], t, rows)
    # centred before the product, so that the reverse pass's sums over rows are centred too
    # (the mean folded into a bias left the scale's gradient a difference of two large sums:
    # 1% off in float32 where ReLU outputs have a large mean)
    # with the ReLU applied here the saved output is not z, so z is recomputed
    z_saved = None if relu or saved is None else saved[0]
    z = folded_conv((x - total / n) * mask, kernel, scale, w["bias"], mask, z_saved)
    if zen:
        _record_variance(probe, "out", variance, channels)
    z = probe("out", z, _real(z, rows, channels, t), rows * channels)
    return (jax.nn.relu(z) if relu else z,)


@jax.custom_vjp
def gated_matmul(h: jax.Array, gate: jax.Array, kernel: jax.Array) -> jax.Array:
    """(ReLU(h) x gate) @ kernel for (N, P, C) rows h and an (N, C) gate. Its backward is
    written out: autodiff's took the gate's gradient through a select whose zeros XLA:CPU
    wrote out full size (a 384 -> 64 tile of 64 x 128 rows: 6.1 ms, 5.3 so; the product
    alone takes 1.6)."""
    return _matmul_rows(jax.nn.relu(h) * gate[:, None, :], kernel)


def _gated_matmul_fwd(h: jax.Array, gate: jax.Array, kernel: jax.Array) -> tuple:
    return gated_matmul(h, gate, kernel), (h, gate, kernel)


def _gated_matmul_bwd(residuals: tuple, g: jax.Array) -> tuple:
    h, gate, kernel = residuals
    d_gated = _matmul_rows(g, kernel.T)
    d_h = jnp.where(h > 0, d_gated * gate[:, None, :], 0.0)
    # ReLU(h) = (h + |h|) / 2 exactly, a sum that fuses; jnp.maximum(h, 0) wrote its 0 out
    d_gate = (d_gated * (h + jnp.abs(h))).sum(axis=1) / 2
    gated = (jax.nn.relu(h) * gate[:, None, :]).reshape(-1, h.shape[-1])
    d_kernel = gated.T @ g.reshape(-1, g.shape[-1])
    return d_h, d_gate, d_kernel


gated_matmul.defvjp(_gated_matmul_fwd, _gated_matmul_bwd)


def _conv_rows(w, inputs, dims, probe, norm: bool, zen: bool, gated: bool):
    """A tile's 1x1 conv (with its bias where it has one: the shortcut's), of ReLU(h) times
    the SE gate when `gated` (the project: h is the depthwise piece's pre-ReLU output).
    With BatchNorm the last input is the running sum of the earlier tiles' outputs, and the
    second output adds this tile's: summed here, while the tile is in cache, where a piece
    of its own read it back and wrote its cotangent out again. The sum of squares is
    another piece's (it needs every tile's sum first). The cotangents reaching y from the
    statistics and from the normalisation add up elementwise before the kernel's gradient
    contracts the rows: contracted first, they cancelled there in float32 (zico's project
    kernels 0.4% off). dims: side, real channels, tile index."""
    del probe, zen
    x, *rest = inputs
    kernel = w["kernel"][0, 0]
    if gated and native_cpu():
        y, total = gated_cpu.gated_product(x, rest[0], kernel)
        return (y, rest[-1] + total) if norm else (y,)
    y = gated_matmul(x, rest[0], kernel) if gated else _matmul_rows(x, kernel)
    if "bias" in w:
        y = (y + w["bias"]) * _tile_mask(y.shape[1], dims[2], dims[0] * dims[0])
    return (y, rest[-1] + y.sum(axis=(0, 1))) if norm else (y,)


@jax.custom_vjp
def normalized_tile(y, total, squares, scale, bias, weights, n) -> jax.Array:
    """BatchNorm of a tile of rows y, from the running sum `total` and sum of squares about
    the mean `squares` over all `n` real rows, on the rows `weights` (1s and 0s) keeps. Its
    backward is written out: autodiff's wrote the centred tile and the masked cotangent out
    full size before summing their product (a 128-wide tile of 64 x 128 rows: 3.0 ms),
    where XLA:CPU's YNNPACK sum fuses a product with a broadcast difference."""
    rstd = jax.lax.rsqrt(squares / n + BN_EPS)
    return ((y - total / n) * rstd * scale + bias) * weights


def _normalized_tile_fwd(y, total, squares, scale, bias, weights, n) -> tuple:
    residuals = (y, total, squares, scale, weights, n)
    return normalized_tile(y, total, squares, scale, bias, weights, n), residuals


def _normalized_tile_bwd(residuals: tuple, g: jax.Array) -> tuple:
    y, total, squares, scale, weights, n = residuals
    rstd = jax.lax.rsqrt(squares / n + BN_EPS)
    # a barrier, so that the sums read y - mean inside the product, not written out first
    mean = jax.lax.optimization_barrier(total / n)
    d_y = g * (rstd * scale) * weights
    # the statistics' gradients sum d_y, 0 on the padded rows: summed with the weights'
    # broadcast, that was written out full size too
    d_total = -d_y.sum(axis=(0, 1)) / n
    d_squares = -(d_y * (y - mean)).sum(axis=(0, 1)) * jnp.square(rstd) / (2 * n)
    d_scale = (g * (y - mean) * weights).sum(axis=(0, 1)) * rstd
    d_bias = (g * weights).sum(axis=(0, 1))
    return d_y, d_total, d_squares, d_scale, d_bias, None, None


normalized_tile.defvjp(_normalized_tile_fwd, _normalized_tile_bwd)


def _batch_norm_tile(w, inputs, dims, probe, norm: bool, zen: bool, relu: bool, site: bool):
    """BatchNorm of a tile of `_conv_rows`'s output from the running sum and sum of squares
    over all tiles, plus the residual when one is given (the project's; Zen-NAS's network
    has none), then the ReLU when `relu`; `site`: its output is a ReLU's input (expand,
    project). dims: side, real channels, tile index."""
    side, channels, t = dims[0], dims[1], dims[2]
    rows = side * side
    y, *rest = inputs
    if norm:
        total, squares, *residual = rest
        n = y.shape[0] * rows
        weights = _mask_weights(_tile_mask(y.shape[1], t, rows), y.dtype)
        z = normalized_tile(y, total, squares, w["scale"], w["bias"], weights, n)
        if zen and site:
            _record_variance(probe, "out", squares / n, channels)
    else:
        z, residual = y, rest
    if residual:
        z = z + residual[0]
    if site:
        z = probe("out", z, _real(z, rows, channels, t), rows * channels)
    return (jax.nn.relu(z) if relu else z,)


def _real(z: jax.Array, rows: jax.Array, channels: jax.Array, tile: jax.Array = 0) -> jax.Array:
    """(R, C): which entries of tile `tile` of (N, R, C) rows are real (tile 0 of one: all)."""
    return _tile_mask(z.shape[1], tile, rows) & _channel_mask(z.shape[2], channels)


def _tiles(x: jax.Array, count: int) -> tuple:
    """(N, P, C) rows as `count` tiles of consecutive rows."""
    return tuple(jnp.split(x, count, axis=1))


def _whole(tiles: Sequence[jax.Array]) -> jax.Array:
    return tiles[0] if len(tiles) == 1 else jnp.concatenate(tiles, axis=1)


def _rows(tiles: Sequence[jax.Array]) -> int:
    """Rows per image of the array the tiles make up."""
    return sum(tile.shape[1] for tile in tiles)


def _depthwise_se(
    w,
    inputs,
    dims,
    probe,
    norm: bool,
    zen: bool,
    stride: int,
    p_out: int,
    tiles: int,
    saved=None,
    weights: bool = True,
):
    """ReLU (of the expand's output, given as its tiles), k x k depthwise conv with the stride,
    BatchNorm, then the squeeze-excite gate from the real rows' mean of its ReLU. Returns the
    pre-ReLU output as `tiles` tiles (the project piece applies the ReLU), the gate and, with
    BatchNorm, its 1 / std: given back as `saved`, these spare the backward the conv and its
    statistics, and the backward keeps the output in its tiles (and, without `weights`,
    leaves the kernel's gradient out). dims: input side, real depthwise and SE channels,
    kernel radius."""
    side, channels, mid = dims[0], dims[1], dims[2]
    out_side = _out_side(side, stride)
    rows = out_side * out_side
    x = tuple(inputs)  # the conv applies the ReLU and reads the tiles where they lie
    geometry = jnp.stack([side, dims[3]])
    kernel = w["depthwise"]["kernel"]
    if norm and saved is not None:
        transposed = functools.partial(
            depthwise_strided_transposed, stride=stride, p_out=p_out, kernel_grad=weights
        )
        rstd = (saved[-1],)
        z = batch_norm_saved(transposed, x, w["depthwise"], geometry, rows, saved[:tiles], *rstd)
    elif norm:
        y, moments = depthwise_strided_moments(x, kernel, geometry, stride, p_out)
        z, rstd = _batch_norm_rows_rstd(y, moments, w["depthwise"], rows)
        z, rstd = (z,), (rstd,)
    else:
        z, rstd = (depthwise_strided_rows(x, kernel, geometry, stride, p_out),), ()
    if zen:
        _record_variance(probe, "depthwise", _variance(rstd[0]), channels)
    if len(z) == 1:  # a site only where the output is whole (`MBV2Engine._tile_count`)
        z = (probe("depthwise", z[0], _real(z[0], rows, channels), rows * channels),)
    pooled = sum(relu_row_sums(z_t) for z_t in z) / rows
    se = w["se"]
    s = pooled @ se["reduce"]["kernel"][0, 0]
    if zen:
        _record_variance(probe, "se_reduce", jnp.var(s, axis=0), mid)
    s = _norm(s, se["reduce"], norm)
    s = jax.nn.relu(probe("se", s, _channel_mask(s.shape[1], mid), mid))
    s = s @ se["restore"]["kernel"][0, 0]
    if zen:
        _record_variance(probe, "se_restore", jnp.var(s, axis=0), channels)
    s = _norm(s, se["restore"], norm)
    return *(z if len(z) == tiles else _tiles(z[0], tiles)), jax.nn.sigmoid(s), *rstd


@jax.custom_jvp
def relu_row_sums(z: jax.Array) -> jax.Array:
    """ReLU(z) summed over the rows of (N, P, C), as (z + |z|) / 2 (the same floats): a sum
    XLA:CPU's YNNPACK fuses, where relu's zero was an operand written out full size in the
    backward, which recomputes it (67 MB for 64 images of 1,024 rows x 256 channels)."""
    return (z + jnp.abs(z)).sum(axis=1) / 2


@relu_row_sums.defjvp
def _relu_row_sums_jvp(primals: tuple, tangents: tuple) -> tuple:
    (z,), (t,) = primals, tangents
    return relu_row_sums(z), jnp.where(z > 0, t, 0.0).sum(axis=1)


def _subsample(w, inputs, dims, probe, norm: bool, zen: bool, p_out: int, tiles: int):
    """A stride-2 shortcut's input, every other row and column, as `tiles` tiles (its 1x1
    conv then runs over them). dims: input side."""
    del w, probe, norm, zen
    return _tiles(subsample_rows(_whole(inputs), dims[0], p_out), tiles)


def _stem(
    w,
    inputs,
    dims,
    probe,
    norm: bool,
    zen: bool,
    layers: int,
    stride: int,
    resolution: int,
    p_out: int,
    tiles: int,
):
    """Block 0 on the images, exactly in NHWC: resize, (conv, BN, ReLU) x layers (the first
    conv, on the images' channels, `stem_cpu`'s custom call on CPU); then the output as
    padded rows, in `tiles` tiles. dims: real output channels."""
    (images,) = inputs
    x = resize_bilinear(images, resolution)
    for j in range(layers):
        layer = w[layer_name(j)]
        conv = stem_cpu.stem_conv if j == 0 and native_cpu() else conv2d
        y = conv(x, layer["kernel"], stride if j == 0 else 1)
        if zen:
            _record_variance(probe, f"layer_{j}", jnp.var(y, axis=(0, 1, 2)), dims[0])
        y = _norm(y, layer, norm)
        mask = _channel_mask(y.shape[-1], dims[0])
        x = jax.nn.relu(probe(f"layer_{j}", y, mask, y.shape[1] * y.shape[2] * dims[0]))
    n, h, _, c = x.shape
    rows = x.reshape(n, h * h, c)
    return _tiles(jnp.pad(rows, ((0, 0), (0, p_out - h * h), (0, 0))), tiles)


def _head(w, inputs, dims, probe, norm: bool, zen: bool):
    """Mean over the real rows (of every tile), then the linear classifier: the logits."""
    del probe, norm, zen
    total = sum(x.sum(axis=1) for x in inputs)
    return ((total / (dims[0] * dims[0])) @ w["kernel"] + w["bias"],)


SE_SITES = ("se",)


def _log_mean_std(variance: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
    """log sqrt(mean over the real channels of a BatchNorm input's batch variance)."""
    return log_sqrt_or_zero(jnp.where(mask, variance, 0.0).sum() / count)


def _kind(site: str, backward: bool) -> str | None:
    """The response kind a site's terms add to (None for zen's variance sites)."""
    if site.startswith(BN_SITE):
        return None
    kinds = SE_KINDS if site in SE_SITES else BLOCK_KINDS
    return kinds[backward]


def _site_activations(sites: dict) -> dict:
    """What naswot and meco read at a piece's sites (every ReLU's input): at an SE site the
    Hamming kernel of the batch's codes (x > 0) over the real channels, elsewhere the first
    image's ReLU output with the mask of its real entries (the host cuts it out)."""
    out = {}
    for name, (x, mask, _) in sites.items():
        if name.startswith(BN_SITE):
            continue
        if name in SE_SITES:
            real = jnp.broadcast_to(mask, x.shape[1:]).reshape(1, -1).astype(jnp.float32)
            codes = (x.reshape(x.shape[0], -1) > 0).astype(jnp.float32)
            on, off = codes * real, (1 - codes) * real
            agree = jnp.dot(on, on.T, precision=HIGHEST) + jnp.dot(off, off.T, precision=HIGHEST)
            out[name] = jnp.round(agree).astype(jnp.int32)
        else:
            out[name] = (jax.nn.relu(x[0]), jnp.broadcast_to(mask, x.shape[1:]))
    return out


class Piece:
    """A piece's compiled forward (outputs, its sites' forward correlation terms and, with
    `activations`, what naswot and meco read there) and compiled backward (input
    cotangents, the sites' gradient terms and, with `weights`, the gradient of its
    weights), both for a static set of kinds to reduce and BatchNorm on or off (`norm`).
    The backward recomputes the piece's forward (given its forward outputs as `saved` when
    `saves`, for the piece to reuse; with `tells_weights`, whether the weights' gradient is
    wanted, as `weights`) and adds to each input's cotangent the one `carried`
    from other readers of that input (None: none), so no eager add compiles per shape
    outside the pieces; an output's cotangent None is 0. `kinds` are the gradient kinds its
    sites add to (`MBV2Engine._backward` skips the backwards that reach none asked for), and
    `output_kinds` those upstream of each output, where they are not all (the last entries
    name the last outputs, the first every output before them: a piece's tiles; an output's
    cotangent reaches only those). The backward's `frozen` names the inputs whose
    cotangents nothing reads: they come back None, and XLA drops the work only they needed
    (for WRCor, the first SE's depthwise conv and BatchNorm backward, and the first
    project's cotangent of the depthwise output).
    """

    def __init__(
        self,
        fn: Callable,
        static: Sequence[str] = (),
        saves: bool = False,
        kinds: Sequence[str] = (),
        tells_weights: bool = False,
        output_kinds: Sequence[Sequence[str]] = (),
    ):
        self.fn = fn
        self.saves = saves
        self.tells_weights = tells_weights
        self.kinds = frozenset(kinds)
        self._output_kinds = tuple(frozenset(k) for k in output_kinds)
        names, stored_as = ("kinds", "norm", "zen", *static), f"{fn.__module__}.{fn.__name__}"
        self.forward = RetainedJit(
            self._forward, (*names, "activations"), name=f"{stored_as}/forward"
        )
        self.backward = RetainedJit(
            self._backward, (*names, "weights", "frozen"), name=f"{stored_as}/backward"
        )

    def output_kinds(self, index: int, count: int) -> frozenset:
        """The gradient kinds of the sites upstream of output `index` of `count`."""
        if not self._output_kinds:
            return self.kinds
        leading = count - len(self._output_kinds) + 1
        return self._output_kinds[max(0, index - leading + 1)]

    @staticmethod
    def _terms(sites: dict, kinds: frozenset, backward: bool) -> dict:
        terms: dict[str, tuple[jax.Array, jax.Array]] = {}
        for name, (value, mask, count) in sites.items():
            kind = _kind(name, backward)
            if kind not in kinds:
                continue
            corr, valid = masked_abs_corrcoef(value, mask, count)
            total, n = terms.get(kind, (0.0, 0))
            terms[kind] = (total + corr, n + valid)
        return terms

    def _forward(self, w, inputs, dims, kinds: frozenset, activations: bool, **static):
        sites: dict = {}

        def probe(name, x, mask, count):
            sites[name] = (x, mask, count)
            return x

        outputs = self.fn(w, inputs, dims, probe, **static)
        reads = _site_activations(sites) if activations else {}
        if static["zen"]:
            reads |= {
                name: _log_mean_std(*sites[name]) for name in sites if name.startswith(BN_SITE)
            }
        return outputs, self._terms(sites, kinds, backward=False), reads

    def _backward(
        self,
        w,
        inputs,
        dims,
        outputs,
        cotangents,
        carried,
        kinds: frozenset,
        weights: bool,
        frozen: tuple[int, ...] = (),
        **static,
    ):
        if self.saves:
            static["saved"] = outputs
        if self.tells_weights:
            static["weights"] = weights
        cotangents = tuple(
            jnp.zeros_like(o) if c is None else c for o, c in zip(outputs, cotangents, strict=True)
        )
        meta: dict = {}

        def shapes_probe(name, x, mask, count):
            meta[name] = x
            return x

        jax.eval_shape(lambda: self.fn(w, inputs, dims, shapes_probe, **static))
        # perturb only the sites whose gradient terms are asked for: a zero perturbation
        # elsewhere is a full-size array of zeros that XLA writes and reads
        zeros = {
            name: jnp.zeros(x.shape, x.dtype)
            for name, x in meta.items()
            if _kind(name, backward=True) in kinds
        }
        masks: dict = {}

        def run(w, live, perturbations):
            """The piece of `live` inputs (None where frozen: those are not differentiated)."""

            def probe(name, x, mask, count):
                if name not in perturbations:
                    return x
                masks[name] = (mask, count)
                return x + perturbations[name]

            whole = tuple(inputs[i] if i in frozen else x for i, x in enumerate(live))
            return self.fn(w, whole, dims, probe, **static)

        live = tuple(None if i in frozen else x for i, x in enumerate(inputs))
        if weights:
            d_w, d_live, d_sites = jax.vjp(run, w, live, zeros)[1](cotangents)
        else:
            d_live, d_sites = jax.vjp(lambda i, p: run(w, i, p), live, zeros)[1](cotangents)
            d_w = None
        d_inputs = tuple(
            None if i in frozen else d if c is None else d + c
            for i, (d, c) in enumerate(zip(d_live, carried, strict=True))
        )
        sites = {name: (d_sites[name], *masks[name]) for name in d_sites}
        return d_inputs, self._terms(sites, kinds, backward=True), d_w


BLOCK_GRAD = (BLOCK_KINDS[1],)
PIECES = {
    "stem": Piece(_stem, ("layers", "stride", "resolution", "p_out", "tiles"), kinds=BLOCK_GRAD),
    "rows_sum": Piece(_rows_sum),
    "centred_gram": Piece(_centred_gram),
    "centred_squares": Piece(_centred_squares),
    "expand": Piece(_expand, ("relu",), saves=True, kinds=BLOCK_GRAD),
    "conv_rows": Piece(_conv_rows, ("gated",)),
    "batch_norm_tile": Piece(_batch_norm_tile, ("relu", "site"), kinds=BLOCK_GRAD),
    "depthwise_se": Piece(
        _depthwise_se,
        ("stride", "p_out", "tiles"),
        saves=True,
        kinds=(SE_KINDS[1], *BLOCK_GRAD),
        tells_weights=True,
        # the SE's site lies upstream of the gate only, not of the conv's output or 1 / std
        output_kinds=(BLOCK_GRAD, (SE_KINDS[1], *BLOCK_GRAD), ()),
    ),
    "subsample": Piece(_subsample, ("p_out", "tiles")),
    "head": Piece(_head),
}


# --------------------------------------------------------------------------- weights


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
    side, rows = _out_side(arch.resolution, stem.stride), {}
    for index, block in enumerate(rest, start=1):
        if not isinstance(block, ResBlock):  # a 1x1 conv block: stride 1, no expanded width
            continue
        for j in range(block.layers):
            rows[block_name(index), layer_name(j)] = rows_bucket(side * side)
            side = _out_side(side, block.stride if j == 0 else 1)
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


# --------------------------------------------------------------------------- composition


@dataclasses.dataclass
class _Call:
    """One piece applied in the forward pass: enough to run its backward. `path` is where
    its weights `w` sit in the parameter tree (a depthwise + SE piece's are two subtrees)."""

    piece: str
    path: tuple[str, ...]
    w: dict
    inputs: tuple
    dims: np.ndarray
    static: dict
    outputs: tuple


def _dims(*values: int) -> np.ndarray:
    return np.asarray(values, np.int32)


class MBV2Engine:
    """MobileNetV2-space measurements through padded pieces: the WRCor family's correlation
    sums at `kinds` (default: every MobileNetV2 kind) and, from the same forward pass, the
    input Jacobian (jacob_cov), the loss gradients (snip, grad_norm) and the activations
    (naswot, meco); the half-batch loss gradients (zico) and synflow's gradients."""

    def __init__(self, kinds: Sequence[str] = (*SE_KINDS, *BLOCK_KINDS)):
        self.kinds = frozenset(kinds)
        self._forget()

    def _forget(self) -> None:
        """Drop what the last pass recorded (its arrays: every piece's inputs and outputs)."""
        self._calls: list[tuple[int, _Call]] = []
        self._terms: list[tuple[int, dict]] = []
        self._acts: list[dict] = []
        self._put: set[int] = set()  # zeros the engine put in (`_start`, `_blank`)
        self._blanks: dict[tuple, jax.Array] = {}
        self._unread: set[int] = set()  # tiles whose only readers were skipped
        self._shared: list[jax.Array] = []  # small arrays every tile reads: statistics, gates

    @staticmethod
    def supports(arch: MBV2Arch) -> bool:
        """Whether the pieces build `arch`: a conv stem first, and later conv blocks only
        1x1 with stride 1 (as in every architecture of the reference ranges)."""
        first, *rest = arch.blocks
        return isinstance(first, ConvBlock) and all(
            isinstance(b, ResBlock) or (b.kernel == 1 and b.stride == 1) for b in rest
        )

    def _apply(
        self, piece: str, block: int, path: tuple, w: dict, inputs: tuple, dims, **static
    ) -> tuple:
        static["norm"], static["zen"] = self._norm, self._zen
        outputs, terms, acts = PIECES[piece].forward(
            w, inputs, dims, kinds=self._kinds, activations=self._activations, **static
        )
        self._calls.append((block, _Call(piece, path, w, inputs, dims, static, outputs)))
        self._terms.append((block, terms))
        self._acts.append(acts)
        return outputs

    def _forward(
        self,
        arch: MBV2Arch,
        params: dict,
        images: jax.Array,
        kinds: frozenset,
        norm: bool,
        activations: bool = False,
        zen: bool = False,
    ) -> jax.Array:
        """Run the pieces in order, recording each call, the forward terms at `kinds` and,
        with `activations`, what naswot and meco read; `zen` runs Zen-NAS's network (no
        residual links) and records its BatchNorm inputs' scales. Returns the logits."""
        if not self.supports(arch):
            raise ValueError(f"the engine does not build {arch.blocks}: see `supports`")
        self._forget()
        self._kinds, self._norm, self._activations, self._zen = kinds, norm, activations, zen
        self._tiled = not (activations or zen or kinds & frozenset(BLOCK_KINDS))
        self._dtype = images.dtype
        stem_block, *rest = arch.blocks
        side = _out_side(arch.resolution, stem_block.stride)
        static = {
            "layers": stem_block.layers,
            "stride": stem_block.stride,
            "resolution": arch.resolution,
            "p_out": rows_bucket(side * side),
        }
        static["tiles"] = self._tile_count(static["p_out"])
        stem_dims = _dims(stem_block.out_channels)
        stem = (block_name(0),)
        x = self._apply("stem", 0, stem, params[stem[0]], (images,), stem_dims, **static)
        for index, block in enumerate(rest, start=1):
            w_block = params[block_name(index)]
            if isinstance(block, ResBlock):
                x, side = self._res_block(index, block, w_block, x, side)
                continue
            for j in range(block.layers):
                path = (block_name(index), layer_name(j))
                x = self._pointwise(index, path, w_block[path[1]], x, side, block.out_channels)
        last = len(arch.blocks) - 1
        (logits,) = self._apply("head", last, ("classifier",), params["classifier"], x, _dims(side))
        return logits

    def _tile_count(self, p: int) -> int:
        """How many tiles rows of `p` padded pixels run in: one where a 1x1 piece's sites,
        zen's statistics or naswot's and meco's activations are read (those need the whole)."""
        return p // tile_rows(p) if self._tiled else 1

    def _zeros(self, shape: tuple[int, ...], dtype=None) -> jax.Array:
        """Zeros put on the device from NumPy (a jitted zeros would compile per shape)."""
        return jax.device_put(np.zeros(shape, dtype or self._dtype))

    def _start(self, shape: tuple[int, ...]) -> jax.Array:
        """A running sum's start: zeros, remembered so that `_needed` never freezes them (the
        chain's first backward is then the same program as the others)."""
        start = self._zeros(shape)
        self._put.add(id(start))
        return start

    def _blank(self, shape: tuple[int, ...], dtype=None) -> jax.Array:
        """The zeros that stand in for a tile of padding rows only, whose 1x1 pieces are
        skipped (their outputs, sums and gradients there are exact zeros): one array per
        shape and pass, never frozen, so that its readers run the programs they run on
        real tiles."""
        key = (shape, np.dtype(dtype or self._dtype))
        if key not in self._blanks:
            self._blanks[key] = self._zeros(shape, key[1])
            self._put.add(id(self._blanks[key]))
        return self._blanks[key]

    def _pointwise(
        self, block: int, path: tuple, w: dict, tiles: tuple, side: int, channels: int,
        gate: jax.Array | None = None, residual: tuple = (), relu: bool = True,
        site: bool = True,
    ) -> tuple:  # fmt: skip
        """A 1x1 conv (of ReLU(tiles) x `gate` when gated: the project) and its BatchNorm,
        plus the `residual` tiles, then the ReLU when `relu`, tile by tile; `site`: the
        output is a ReLU's input. The statistics are running sums over the tiles: of the
        input's centred product where the output is not narrower than the input (`_expand`),
        else of the output. `w`: kernel, scale and bias, or (the shortcut) a biased conv's
        and its BatchNorm's."""
        if gate is not None:
            self._shared.append(gate)
        if "conv" in w:
            conv, bn = w["conv"], w["bn"]
            conv_path, bn_path = (*path, "conv"), (*path, "bn")
        else:
            conv, bn = {"kernel": w["kernel"]}, {"scale": w["scale"], "bias": w["bias"]}
            conv_path = bn_path = path
        c_in, c_out = conv["kernel"].shape[2:]
        norm, count = self._norm, len(tiles)
        dims = [_dims(side, channels, t) for t in range(count)]
        # the tiles past the image's rows hold padding only: their calls are skipped
        live = -(-side * side // tiles[0].shape[1])
        self._unread.update(id(x) for x in (*tiles[live:], *residual[live:]))
        blank = self._blank((*tiles[0].shape[:2], c_out)) if live < count else None
        padding = (blank,) * (count - live)

        def run(piece: str, at: tuple, weights: dict, inputs: tuple, t: int, **static) -> tuple:
            return self._apply(piece, block, at, weights, inputs, dims[t], **static)

        def running(piece: str, size: int, inputs: Callable[[int, jax.Array], tuple]):
            total = self._start(size)
            for t in range(live):
                (total,) = run(piece, path, {}, inputs(t, total), t)
            return total

        if gate is None and norm and c_in <= c_out and "bias" not in conv:
            total = running("rows_sum", (c_in,), lambda t, acc: (tiles[t], acc))
            gram = running("centred_gram", (c_in, c_in), lambda t, acc: (tiles[t], total, acc))
            self._shared += [total, gram]
            expanded = [
                run("expand", path, w, (tiles[t], total, gram), t, relu=relu)[0]
                for t in range(live)
            ]
            return (*expanded, *padding)
        read = () if gate is None else (gate,)
        sums = (self._start((c_out,)),) if norm else ()  # the outputs' running sum
        outputs = []
        for t, x in enumerate(tiles[:live]):
            y, *sums = run("conv_rows", conv_path, conv, (x, *read, *sums), t, gated=bool(read))
            outputs.append(y)
        stats = ()
        if norm:
            (total,) = sums
            squares = running("centred_squares", (c_out,), lambda t, acc: (outputs[t], total, acc))
            stats = (total, squares)
            self._shared += [total, squares]
        normalized = [
            run(
                "batch_norm_tile", bn_path, bn, (y, *stats, *residual[t : t + 1]),
                t, relu=relu, site=site,
            )[0]
            for t, y in enumerate(outputs)
        ]  # fmt: skip
        return (*normalized, *padding)

    def _res_block(self, index: int, block: ResBlock, w_block: dict, x: tuple, side: int):
        """The sub-blocks of a SuperResIDWE block: expand, depthwise + SE, [shortcut],
        project (+ residual, ReLU); activations pass between the pieces as tiles."""
        dw, mid, radius = block.dw_channels, se_channels(block.dw_channels), block.kernel // 2
        for j in range(block.layers):
            path = (block_name(index), layer_name(j))
            w = w_block[path[1]]
            stride = block.stride if j == 0 else 1
            out_side = _out_side(side, stride)
            p_out = rows_bucket(out_side * out_side)
            tiles = self._tile_count(p_out)
            e = self._pointwise(index, (*path, "expand"), w["expand"], x, side, dw, relu=False)
            w_dw = {"depthwise": w["depthwise"], "se": w["se"]}
            dims = _dims(side, dw, mid, radius)
            outputs = self._apply(
                "depthwise_se", index, path, w_dw, e, dims, stride=stride, p_out=p_out, tiles=tiles
            )
            h, gate = outputs[:tiles], outputs[tiles]
            residual = () if self._zen else x
            if "shortcut" in w and not self._zen:
                if stride == 2:
                    x = self._apply(
                        "subsample", index, path, {}, x, _dims(side), p_out=p_out, tiles=tiles
                    )
                residual = self._pointwise(
                    index, (*path, "shortcut"), w["shortcut"], x, out_side, block.out_channels,
                    relu=False, site=False,
                )  # fmt: skip
            x = self._pointwise(
                index, (*path, "project"), w["project"], h, out_side, block.out_channels,
                gate=gate, residual=residual,
            )  # fmt: skip
            side = out_side
        return x, side

    def _backward(
        self,
        cotangent: jax.Array,
        kinds: frozenset,
        weights: bool = False,
        to_images: bool = False,
        last: bool = True,
        terms: bool = True,
    ) -> tuple[jax.Array | None, dict | None]:
        """Chain the recorded pieces' backwards from the logits' cotangent, summing the
        cotangents of arrays read by several pieces (a sub-block's input feeds its expand
        and its shortcut or residual) inside the backward of the reader run last. Adds the
        gradient terms at `kinds` (computed but dropped without `terms`); returns the
        gradient at the images (with `to_images`, else None) and, with `weights`, the padded
        parameter tree's gradient. Only the backwards whose cotangents reach something
        asked for run: WRCor's SE sites need none below the first SE, so the stem's
        backward at full resolution is skipped. The `last` backward of a forward pass drops
        each piece's record once past it, so that the wide first blocks' backwards do not
        run beside every later block's stored outputs."""
        # every reader of a statistic or a gate adds to a cotangent, the first one to zeros:
        # the tiles' backwards are then one program, not the first apart
        pending: dict[int, jax.Array] = {id(a): self._zeros(a.shape, a.dtype) for a in self._shared}
        logits = self._calls[-1][1].outputs[0]
        images = self._calls[0][1].inputs[0]
        pending[id(logits)] = cotangent
        grads: dict | None = {} if weights else None
        needed = self._needed(kinds, weights, images if to_images else None)
        calls = self._calls if last else list(self._calls)
        while calls:
            block, call = calls.pop()
            cotangents = tuple(self._cotangent(pending, out) for out in call.outputs)
            carried = tuple(
                None if id(array) in self._put else pending.pop(id(array), None)
                for array in call.inputs
            )
            frozen = needed.pop()
            if frozen is None:
                continue
            # passed only when some are: the other calls keep the signatures cached before
            static = call.static | ({"frozen": frozen} if frozen else {})
            d_inputs, piece_terms, d_w = PIECES[call.piece].backward(
                call.w, call.inputs, call.dims, call.outputs, cotangents, carried, kinds=kinds,
                weights=weights, **static,
            )  # fmt: skip
            if terms:
                self._terms.append((block, piece_terms))
            if grads is not None:
                _add_into(_subtree(grads, call.path), jax.device_get(d_w))
            for array, d in zip(call.inputs, d_inputs, strict=True):
                if id(array) not in self._put:  # the zeros put in: dropped
                    pending[id(array)] = d
        return pending[id(images)] if to_images else None, grads

    def _cotangent(self, pending: dict, out: jax.Array) -> jax.Array | None:
        """The summed cotangent at a call's output (None where nothing read it), zeros at a
        tile whose readers were skipped: its producer's backward stays the usual program."""
        cotangent = pending.pop(id(out), None)
        if cotangent is None and id(out) in self._unread:
            return self._blank(out.shape, out.dtype)
        return cotangent

    def _needed(
        self, kinds: frozenset, weights: bool, images: jax.Array | None
    ) -> list[tuple[int, ...] | None]:
        """Per recorded call, None when its backward reaches nothing asked for (the
        weights' gradient, the gradient at `images` (None: not asked; through the calls
        that produced its inputs) or a site of `kinds`, its own or one upstream of it), else
        which of its inputs need no cotangent: those whose cotangent reaches nothing asked
        for (through their producer's inputs or the producer's sites upstream of them).
        For WRCor that is the first depthwise + SE's input and the first project's input
        from it (only its gate reaches the first SE site)."""
        if weights:
            return [()] * len(self._calls)
        reaches = {id(images): True} if images is not None else {}
        needed = []
        for _, call in self._calls:
            piece = PIECES[call.piece]
            feeds = [reaches.get(id(array), False) for array in call.inputs]
            need = any(feeds) or bool(piece.kinds & kinds)
            for k, out in enumerate(call.outputs):
                kinds_k = piece.output_kinds(k, len(call.outputs))
                reaches[id(out)] = any(feeds) or bool(kinds_k & kinds)
            # a running sum's start is differentiated like the sums after it, so that a
            # chain's first backward is the same program as the others
            frozen = tuple(
                i
                for i, array in enumerate(call.inputs)
                if not feeds[i] and id(array) not in self._put
            )
            needed.append(frozen if need else None)
        return needed

    def measure(
        self,
        arch: MBV2Arch,
        params: dict,
        images: jax.Array,
        labels: jax.Array,
        num_classes: int,
        site_sums: bool = True,
        input_jacobian: bool = False,
        loss_grads: bool = False,
        activations: bool = False,
    ) -> dict:
        """One forward pass of `arch` (unpadded parameters, `network.init_params`) on an NHWC
        batch, giving `activations` (naswot's kernel and meco's sum), then a backward per
        cotangent asked for: `site_sums`, the per-(block, kind) |corrcoef| sums
        `capture.site_sums` gives, and `loss_grads`, dL/dtheta in the shapes of `params`,
        both from the loss gradient; `input_jacobian`, d(sum of logits)/d(images). All but
        the sums as NumPy, as `measures` takes them."""
        del num_classes  # the classifier's width says it
        padded = pad_params(params, input_rows(arch))
        images = jnp.asarray(images, jax.tree.leaves(padded)[0].dtype)  # the weights' precision
        out: dict = {}
        kinds = self.kinds if site_sums else frozenset()
        try:
            logits = self._forward(arch, padded, images, kinds, True, activations)
            if activations:
                out["activations"] = _gather_activations(self._acts, logits.shape[0])
            if input_jacobian:
                # the site sums' backward program, its terms dropped: SE sites' terms cost
                # nothing beside a backward, and a compilation per piece key is spared
                shared = kinds if kinds <= frozenset(SE_KINDS) and not loss_grads else frozenset()
                jacobian, _ = self._backward(
                    jnp.ones_like(logits),
                    shared,
                    to_images=True,
                    last=not (site_sums or loss_grads),
                    terms=False,
                )
                out["input_jacobian"] = np.asarray(jacobian)
            if site_sums or loss_grads:
                cotangent = _loss_cotangent(logits, jnp.asarray(labels))
                _, grads = self._backward(cotangent, kinds, weights=loss_grads)
                if site_sums:
                    out["site_sums"] = _gather(self._terms, len(arch.blocks), logits.shape[0])
                if loss_grads:
                    out["loss_grads"] = unpad(grads, params)
            return out
        finally:
            self._forget()

    def site_sums(
        self, arch: MBV2Arch, params: dict, images: jax.Array, labels: jax.Array, num_classes: int
    ) -> SiteSums:
        """The WRCor family's correlation sums alone (see `measure`)."""
        return self.measure(arch, params, images, labels, num_classes)["site_sums"]

    def half_batch_grads(
        self, arch: MBV2Arch, params: dict, images: jax.Array, labels: jax.Array, num_classes: int
    ) -> dict:
        """`loss_grads` on each half of the batch, stacked (ZiCo's two batches)."""
        halves = []
        for part in batch_halves(images.shape[0]):
            batch = (arch, params, images[part], labels[part], num_classes)
            halves.append(self.measure(*batch, site_sums=False, loss_grads=True)["loss_grads"])
        return jax.tree.map(lambda *g: np.stack(g), *halves)

    def synflow_grads(self, arch: MBV2Arch, params: dict, image_shape: Sequence[int]) -> dict:
        """SynFlow's gradient as `measures` takes it: in float64, BatchNorm off, weights
        |theta|, one all-ones image of the batch's image shape, R = sum of the logits;
        dR/dtheta in the shapes of `params`, as NumPy."""
        try:
            with jax.enable_x64(True):
                padded = jax.tree.map(
                    lambda t: np.abs(np.asarray(t, np.float64)),
                    pad_params(params, input_rows(arch)),
                )
                ones = jnp.ones((1, *image_shape[1:]), jnp.float64)
                logits = self._forward(arch, padded, ones, frozenset(), norm=False)
                _, grads = self._backward(jnp.ones_like(logits), frozenset(), weights=True)
                return unpad(grads, params)
        finally:
            self._forget()

    def zen(self, arch: MBV2Arch, params: dict, x: jax.Array, x_mixed: jax.Array) -> tuple:
        """Zen-score's terms as `measures` takes them: on `params` (Gaussian, unpadded) and
        the Gaussian images x and x + 0.01 eps at the architecture's resolution, residual
        links off, BatchNorm in training mode: E ||f(x) - f(x_mixed)||_1 of the pre-pooling
        features and the sum over the BatchNorms of log sqrt(mean batch variance)."""
        padded = pad_params(params, input_rows(arch))
        try:
            self._forward(arch, padded, jnp.asarray(x), frozenset(), True, zen=True)
            clean = self._calls[-1][1].inputs[0]  # the head's input
            log_std = sum(float(v) for acts in jax.device_get(self._acts) for v in acts.values())
            self._forward(arch, padded, jnp.asarray(x_mixed), frozenset(), True, zen=True)
            return float(_l1_distance(clean, self._calls[-1][1].inputs[0])), log_std
        finally:
            self._forget()


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
    """The dict at `path` in a nested dict, made on the way where missing."""
    for key in path:
        tree = tree.setdefault(key, {})
    return tree


def _add_into(tree: dict, grads: dict) -> None:
    """Add a nested dict of gradients into `tree` (a piece run over tiles adds its tiles')."""
    for name, d in grads.items():
        if isinstance(d, dict):
            _add_into(tree.setdefault(name, {}), d)
        else:
            tree[name] = tree[name] + d if name in tree else d


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


@jax.jit
def _l1_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over samples of sum |a - b| (padded entries are 0 on both sides)."""
    return jnp.abs(a - b).reshape(a.shape[0], -1).sum(axis=1).mean()


@jax.jit
def _loss_cotangent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jax.grad(cross_entropy)(logits, labels)


def _gather_activations(acts: list[dict], n: int) -> tuple[np.ndarray, float]:
    """naswot's kernel (the SE sites' Hamming kernels summed) and meco's sum of smallest
    channel-correlation eigenvalues over every other site's first-image ReLU output, cut to
    its real rows and channels."""
    kernel, meco = np.zeros((n, n), np.int64), 0.0
    for piece_acts in jax.device_get(acts):
        for name, value in piece_acts.items():
            if name in SE_SITES:
                kernel += value
                continue
            first, mask = value
            flat, real = first.reshape(-1, first.shape[-1]), mask.reshape(-1, mask.shape[-1])
            meco += _min_channel_eigenvalue(flat[real.any(axis=1)][:, real.any(axis=0)])
    return kernel, meco


def _gather(terms: list[tuple[int, dict]], num_blocks: int, n: int) -> SiteSums:
    sums = np.zeros((num_blocks, len(KINDS), n, n))
    counts = np.zeros((num_blocks, len(KINDS)), np.int64)
    for block, piece_terms in jax.device_get(terms):
        for kind, (total, count) in piece_terms.items():
            sums[block, KINDS.index(kind)] += np.asarray(total, np.float64)
            counts[block, KINDS.index(kind)] += int(count)
    return SiteSums.from_stacked(sums, counts)
