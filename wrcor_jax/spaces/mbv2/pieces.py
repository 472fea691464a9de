"""The MobileNetV2 engine's compiled pieces: a sub-block's 1x1 convs with BatchNorm (expand,
project, shortcut, the final 1x1 conv) over row tiles, its depthwise conv + squeeze-excite,
the stem and the head, each a `Piece` with a compiled forward and backward keyed by padded
shapes (`padding`), never by the resolution, the kernel size or the exact widths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from wrcor_jax.compilation import RetainedJit
from wrcor_jax.layers import batch_norm, conv2d
from wrcor_jax.spaces.mbv2 import gated_cpu, gram_cpu, stem_cpu
from wrcor_jax.spaces.mbv2.network import BN_EPS, layer_name, resize_bilinear
from wrcor_jax.spaces.mbv2.padding import side_after
from wrcor_jax.spaces.mbv2.rows import (
    HIGHEST,
    batch_norm_rows_rstd,
    batch_norm_saved,
    channel_mask,
    depthwise_strided_moments,
    depthwise_strided_rows,
    depthwise_strided_transposed,
    folded_conv,
    gated_matmul,
    gram_matrix,
    join_tiles,
    mask_weights,
    masked_abs_corrcoef,
    matmul_rows,
    native_cpu,
    normalized_tile,
    real_mask,
    relu_row_sums,
    split_tiles,
    subsample_rows,
    tile_mask,
)
from wrcor_jax.spaces.nb201_measures import log_sqrt_or_zero

SE_KINDS = ("act", "act_grad")  # the squeeze-excite ReLU: the reference's sites
BLOCK_KINDS = ("block_act", "block_act_grad")  # every other ReLU


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
    probe(BN_SITE + name, variance, channel_mask(variance.shape[-1], channels), channels)


def _variance(rstd: jax.Array) -> jax.Array:
    """The batch variance that BatchNorm's 1 / std came from."""
    return 1 / jnp.square(rstd) - BN_EPS


# The 1x1 pieces run over row tiles: (N, R, C), rows t*R .. (t+1)*R - 1 of every image, R set
# by the padded rows alone (`tile_rows`), so that their keys hold the tile, not the image's
# size. BatchNorm couples the tiles: its statistics are running sums over them (one piece
# call per tile, the total passed on), read by the tile's conv or normalisation. Reverse mode
# runs the same chain backwards, each call's vjp taking the summed cotangent of the totals
# it read (`MBV2Engine._backward` sums the cotangents of arrays read several times).


def _rows_sum(w, inputs, dims, probe, norm: bool, zen: bool):
    """The running sum over the tiles' rows (padded rows are 0): a mean's numerator. It
    serves the expand's input; `_conv_rows` sums its own output."""
    del w, dims, probe, norm, zen
    x, total = inputs
    return (total + x.sum(axis=(0, 1)),)


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
    centred = (x - mean) * tile_mask(x.shape[1], dims[2], rows)
    return (running + gram_matrix(centred.reshape(-1, centred.shape[-1])),)


def _centred_squares(w, inputs, dims, probe, norm: bool, zen: bool):
    """The running sum of squares of the real rows about the batch mean (the sum `total`):
    the variance's numerator. dims: side, real channels, tile index."""
    del w, probe, norm, zen
    y, total, squares = inputs
    rows = dims[0] * dims[0]
    centred = (y - total / (y.shape[0] * rows)) * tile_mask(y.shape[1], dims[2], rows)
    return (squares + jnp.square(centred).sum(axis=(0, 1)),)


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
    mask = tile_mask(x.shape[1], t, rows)
    # centred before the product, so that the reverse pass's sums over rows are centred too
    # (the mean folded into a bias left the scale's gradient a difference of two large sums:
    # 1% off in float32 where ReLU outputs have a large mean)
    # with the ReLU applied here the saved output is not z, so z is recomputed
    z_saved = None if relu or saved is None else saved[0]
    z = folded_conv((x - total / n) * mask, kernel, scale, w["bias"], mask, z_saved)
    if zen:
        _record_variance(probe, "out", variance, channels)
    z = probe("out", z, real_mask(z, rows, channels, t), rows * channels)
    return (jax.nn.relu(z) if relu else z,)


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
    y = gated_matmul(x, rest[0], kernel) if gated else matmul_rows(x, kernel)
    if "bias" in w:
        y = (y + w["bias"]) * tile_mask(y.shape[1], dims[2], dims[0] * dims[0])
    return (y, rest[-1] + y.sum(axis=(0, 1))) if norm else (y,)


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
        weights = mask_weights(tile_mask(y.shape[1], t, rows), y.dtype)
        z = normalized_tile(y, total, squares, w["scale"], w["bias"], weights, n)
        if zen and site:
            _record_variance(probe, "out", squares / n, channels)
    else:
        z, residual = y, rest
    if residual:
        z = z + residual[0]
    if site:
        z = probe("out", z, real_mask(z, rows, channels, t), rows * channels)
    return (jax.nn.relu(z) if relu else z,)


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
    out_side = side_after(side, stride)
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
        z, rstd = batch_norm_rows_rstd(y, moments, w["depthwise"], rows)
        z, rstd = (z,), (rstd,)
    else:
        z, rstd = (depthwise_strided_rows(x, kernel, geometry, stride, p_out),), ()
    if zen:
        _record_variance(probe, "depthwise", _variance(rstd[0]), channels)
    if len(z) == 1:  # a site only where the output is whole (`MBV2Engine._tile_count`)
        z = (probe("depthwise", z[0], real_mask(z[0], rows, channels), rows * channels),)
    pooled = sum(relu_row_sums(z_t) for z_t in z) / rows
    se = w["se"]
    s = pooled @ se["reduce"]["kernel"][0, 0]
    if zen:
        _record_variance(probe, "se_reduce", jnp.var(s, axis=0), mid)
    s = _norm(s, se["reduce"], norm)
    s = jax.nn.relu(probe("se", s, channel_mask(s.shape[1], mid), mid))
    s = s @ se["restore"]["kernel"][0, 0]
    if zen:
        _record_variance(probe, "se_restore", jnp.var(s, axis=0), channels)
    s = _norm(s, se["restore"], norm)
    return *(z if len(z) == tiles else split_tiles(z[0], tiles)), jax.nn.sigmoid(s), *rstd


def _subsample(w, inputs, dims, probe, norm: bool, zen: bool, p_out: int, tiles: int):
    """A stride-2 shortcut's input, every other row and column, as `tiles` tiles (its 1x1
    conv then runs over them). dims: input side."""
    del w, probe, norm, zen
    return split_tiles(subsample_rows(join_tiles(inputs), dims[0], p_out), tiles)


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
        mask = channel_mask(y.shape[-1], dims[0])
        x = jax.nn.relu(probe(f"layer_{j}", y, mask, y.shape[1] * y.shape[2] * dims[0]))
    n, h, _, c = x.shape
    rows = x.reshape(n, h * h, c)
    return split_tiles(jnp.pad(rows, ((0, 0), (0, p_out - h * h), (0, 0))), tiles)


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
