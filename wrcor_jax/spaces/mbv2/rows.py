"""Differentiable maths on padded rows, (N, P, C) of which only the real rows and channels
count: masks, correlations, BatchNorm statistics, the depthwise conv (its taps as dynamic
row offsets with column masks, its radius a run-time argument) and the 1x1 products. Where
`native_cpu()`, the heavy ones run as C++ custom calls (`depthwise_cpu`, `folded_cpu`,
`gated_cpu`, `gram_cpu`, `stem_cpu`) that skip the padding; elsewhere XLA's forms of the
same maths serve. The pieces (`pieces`) are written in these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from wrcor_jax.compilation import register_switch
from wrcor_jax.spaces.mbv2 import depthwise_cpu, folded_cpu, gated_cpu, gram_cpu, stem_cpu
from wrcor_jax.spaces.mbv2.network import BN_EPS
from wrcor_jax.spaces.mbv2.padding import MAX_KERNEL, side_after

HIGHEST = jax.lax.Precision.HIGHEST


def _row_mask(p: int, rows: jax.Array) -> jax.Array:
    """(P, 1): which of P stored rows are real."""
    return (jnp.arange(p) < rows)[:, None]


def channel_mask(c: int, channels: jax.Array) -> jax.Array:
    return jnp.arange(c) < channels


def mask_weights(mask: jax.Array, dtype) -> jax.Array:
    """A boolean mask as 1s and 0s, for sums weighted by it. Such a sum reads the summed
    array once: XLA:CPU's YNNPACK sums fuse products with broadcast arrays, but not a select
    nor a comparison, and with the mask itself (or this product's comparison, fused into the
    sum) in the way, the summed operand was written out full size first (1 GB at the widest
    depthwise output; docs/mbv2_engine.md). The barrier keeps the comparison out of the sum."""
    return jax.lax.optimization_barrier(mask.astype(dtype))


def _row_weights(p: int, rows: jax.Array, dtype) -> jax.Array:
    """(P, 1): 1 for the real rows of P stored rows, 0 for the padded ones (`mask_weights`)."""
    return mask_weights(_row_mask(p, rows), dtype)


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


def batch_norm_rows_rstd(y: jax.Array, moments: jax.Array, w: dict, rows: jax.Array) -> tuple:
    """Training-mode BatchNorm of (N, P, C) rows over the real rows, given their
    `row_moments` (padded rows come out 0), and the 1 / std it divided by."""
    n = y.shape[0] * rows
    mean = moments[0] / n
    rstd = jax.lax.rsqrt(moments[1] / n + BN_EPS)
    return ((y - mean) * rstd * w["scale"] + w["bias"]) * _row_mask(y.shape[1], rows), rstd


def matmul_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
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


def subsample_rows(x: jax.Array, side: jax.Array, p_out: int) -> jax.Array:
    """Every other row and column (what a stride-2 conv centred on even pixels reads):
    side s -> ceil(s / 2), stored in p_out rows, padded rows 0."""
    out_side = side_after(side, 2)
    q = jnp.arange(p_out)
    source = 2 * (q // out_side) * side + 2 * (q % out_side)
    inside = q < out_side * out_side
    taken = jnp.take(x, jnp.where(inside, source, 0), axis=1)
    return jnp.where(inside[None, :, None], taken, 0.0)


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
            y = depthwise_rows(jax.nn.relu(join_tiles(x)), _centre(kernel, r), side)
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
        return jax.vjp(lambda x: conv(x, kernel, side), x)[1](join_tiles(g))[0]

    return backward


def _with_moments(conv: Callable, stride: int) -> Callable:
    """A taps branch that also returns its output's `row_moments`."""

    def forward(x: tuple, kernel: jax.Array, side: jax.Array) -> tuple:
        y = conv(x, kernel, side)
        out_side = side_after(side, stride)
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
            h, g = jax.nn.relu(join_tiles(x)), join_tiles(g)
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


def _scale_bias_cotangents(g: tuple, z: tuple, normed: list, masks: list, w: dict) -> tuple:
    """BatchNorm's scale and bias cotangents over the real rows of the tiles, sum g y and
    sum g (`normed`: y, 0 where not real). On CPU one read of g and z (`folded_cpu`'s sums,
    g (z - bias) over the scale): XLA's two sums read g three times, at under half this
    VM's copy rate (docs/mbv2_engine.md)."""
    if native_cpu():
        sums = [
            folded_cpu.cotangent_sums(g_t, z_t, w["bias"], m)
            for g_t, z_t, m in zip(g, z, masks, strict=True)
        ]
        scaled, d_bias = sum(sums)
        live = w["scale"] != 0
        return jnp.where(live, scaled / jnp.where(live, w["scale"], 1.0), 0.0), d_bias
    g = [jnp.where(m, g_t, 0.0) for m, g_t in zip(masks, g, strict=True)]
    d_scale = sum((g_t * y).sum(axis=(0, 1)) for g_t, y in zip(g, normed, strict=True))
    return d_scale, sum(g_t.sum(axis=(0, 1)) for g_t in g)


def _batch_norm_saved_bwd(transposed: Callable, residuals: tuple, g: tuple) -> tuple:
    x, w, geometry, rows, z, rstd = residuals
    n = z[0].shape[0] * rows
    scale = w["scale"]
    live = scale != 0  # a zero scale (padded channels) passes no gradient to y
    masks = [tile_mask(z_t.shape[1], t, rows) for t, z_t in enumerate(z)]
    normed = [
        jnp.where(m & live, (z_t - w["bias"]) / jnp.where(live, scale, 1.0), 0.0)
        for m, z_t in zip(masks, z, strict=True)
    ]
    d_scale, d_bias = _scale_bias_cotangents(g, z, normed, masks, w)
    g = [jnp.where(m, g_t, 0.0) for m, g_t in zip(masks, g, strict=True)]
    d_y = tuple(
        jnp.where(m, scale * rstd * (g_t - d_bias / n - y * (d_scale / n)), 0.0)
        for m, g_t, y in zip(masks, g, normed, strict=True)
    )
    d_x, d_kernel = transposed(x, w["kernel"], geometry, d_y)
    d_w = {"kernel": d_kernel, "scale": d_scale, "bias": d_bias}
    return d_x, d_w, None, None, None, None


batch_norm_saved.defvjp(_batch_norm_saved_fwd, _batch_norm_saved_bwd)


def tile_mask(r: int, t: jax.Array, rows: jax.Array) -> jax.Array:
    """(R, 1): which of tile t's R rows are real."""
    return (t * r + jnp.arange(r) < rows)[:, None]


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
        weights = mask_weights(mask, g.dtype)
        scaled = (g * (z - bias) * weights).sum(axis=(0, 1))
        d_centred = matmul_rows(g, (kernel * scale).T)
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
    return matmul_rows(augmented, jnp.concatenate([kernel * scale, bias[None]]))


@jax.custom_vjp
def gated_matmul(h: jax.Array, gate: jax.Array, kernel: jax.Array) -> jax.Array:
    """(ReLU(h) x gate) @ kernel for (N, P, C) rows h and an (N, C) gate. Its backward is
    written out: autodiff's took the gate's gradient through a select whose zeros XLA:CPU
    wrote out full size (a 384 -> 64 tile of 64 x 128 rows: 6.1 ms, 5.3 so; the product
    alone takes 1.6)."""
    return matmul_rows(jax.nn.relu(h) * gate[:, None, :], kernel)


def _gated_matmul_fwd(h: jax.Array, gate: jax.Array, kernel: jax.Array) -> tuple:
    return gated_matmul(h, gate, kernel), (h, gate, kernel)


def _gated_matmul_bwd(residuals: tuple, g: jax.Array) -> tuple:
    h, gate, kernel = residuals
    d_gated = matmul_rows(g, kernel.T)
    d_h = jnp.where(h > 0, d_gated * gate[:, None, :], 0.0)
    # ReLU(h) = (h + |h|) / 2 exactly, a sum that fuses; jnp.maximum(h, 0) wrote its 0 out
    d_gate = (d_gated * (h + jnp.abs(h))).sum(axis=1) / 2
    gated = (jax.nn.relu(h) * gate[:, None, :]).reshape(-1, h.shape[-1])
    d_kernel = gated.T @ g.reshape(-1, g.shape[-1])
    return d_h, d_gate, d_kernel


gated_matmul.defvjp(_gated_matmul_fwd, _gated_matmul_bwd)


@jax.custom_vjp
def normalized_tile(y, total, squares, scale, bias, weights, n) -> jax.Array:
    """BatchNorm of a tile of rows y, from the running sum `total` and sum of squares about
    the mean `squares` over all `n` real rows, on the rows `weights` (1s and 0s) keeps. Its
    backward is written out: autodiff's wrote the centred tile and the masked cotangent out
    full size before summing their product (a 128-wide tile of 64 x 128 rows: 3.0 ms),
    where XLA:CPU's YNNPACK sum fuses a product with a broadcast difference. It needs two
    sums, of g and of g (y - mean); on CPU `folded_cpu`'s call reads g and y once for both."""
    rstd = jax.lax.rsqrt(squares / n + BN_EPS)
    return ((y - total / n) * rstd * scale + bias) * weights


def _normalized_tile_fwd(y, total, squares, scale, bias, weights, n) -> tuple:
    residuals = (y, total, squares, scale, weights, n)
    return normalized_tile(y, total, squares, scale, bias, weights, n), residuals


def _normalized_tile_bwd(residuals: tuple, g: jax.Array) -> tuple:
    y, total, squares, scale, weights, n = residuals
    rstd = jax.lax.rsqrt(squares / n + BN_EPS)
    mean = total / n
    if native_cpu():  # one read of g and y (`folded_cpu`'s sums, the mean as the bias)
        centred_sum, plain_sum = folded_cpu.cotangent_sums(g, y, mean, weights)
    else:
        # a barrier, so that the sum reads y - mean inside the product, not written out first
        mean = jax.lax.optimization_barrier(mean)
        centred_sum = (g * (y - mean) * weights).sum(axis=(0, 1))
        plain_sum = (g * weights).sum(axis=(0, 1))
    # the statistics' gradients are these sums of d_y = g rstd scale (0 on the padded rows)
    d_total = -plain_sum * (rstd * scale) / n
    d_squares = -centred_sum * (rstd * scale) * jnp.square(rstd) / (2 * n)
    d_y = g * (rstd * scale) * weights
    return d_y, d_total, d_squares, centred_sum * rstd, plain_sum, None, None


normalized_tile.defvjp(_normalized_tile_fwd, _normalized_tile_bwd)


def real_mask(z: jax.Array, rows: jax.Array, channels: jax.Array, tile: jax.Array = 0) -> jax.Array:
    """(R, C): which entries of tile `tile` of (N, R, C) rows are real (tile 0 of one: all)."""
    return tile_mask(z.shape[1], tile, rows) & channel_mask(z.shape[2], channels)


def split_tiles(x: jax.Array, count: int) -> tuple:
    """(N, P, C) rows as `count` tiles of consecutive rows."""
    return tuple(jnp.split(x, count, axis=1))


def join_tiles(tiles: Sequence[jax.Array]) -> jax.Array:
    return tiles[0] if len(tiles) == 1 else jnp.concatenate(tiles, axis=1)


def _rows(tiles: Sequence[jax.Array]) -> int:
    """Rows per image of the array the tiles make up."""
    return sum(tile.shape[1] for tile in tiles)


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
