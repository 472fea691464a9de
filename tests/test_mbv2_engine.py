"""The compile-bounded MobileNetV2 engine against the per-architecture Flax capture.

Padding must change nothing: on architectures whose widths and pixel counts sit exactly on a
bucket and just past one (odd sides through stride 2 included), the padded pieces' WRCor-family
sums equal the unpadded capture's: term counts exactly, scores to 1e-5 relative (issue #12).
And padding is what bounds compilations: a second architecture with other exact widths in the
same buckets compiles nothing new.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrcor_jax.compilation import CompileCounter
from wrcor_jax.data import load_batch
from wrcor_jax.proxies import PROXIES
from wrcor_jax.proxies.wrcor import mbv2_act_cor, mbv2_wrcor, mbv2_wrcor_allrelu
from wrcor_jax.responses import KINDS
from wrcor_jax.spaces.mbv2 import rows as padded_rows
from wrcor_jax.spaces.mbv2.arch import parse
from wrcor_jax.spaces.mbv2.capture import site_sums
from wrcor_jax.spaces.mbv2.engine import MBV2Engine
from wrcor_jax.spaces.mbv2.measures import MBV2Measurer, zen_inputs, zen_params
from wrcor_jax.spaces.mbv2.network import BN_EPS, depthwise_conv2d, init_params
from wrcor_jax.spaces.mbv2.padding import (
    MAX_KERNEL,
    channel_bucket,
    input_rows,
    pad_params,
    rows_bucket,
    wide_bucket,
)
from wrcor_jax.spaces.mbv2.pieces import SE_KINDS
from wrcor_jax.spaces.mbv2.rows import (
    depthwise_strided_transposed,
    folded_conv,
    gram_matrix,
    native_cpu,
)

SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "cifar10_sample.npz"
NUM_CLASSES = 10
BATCH = 16
# Measured (2 CPUs, float32): wrcor <= 1.9e-6 relative, wrcor_allrelu <= 1e-7. Sums agree
# to ~1e-6 but for one image's gradient terms in "stem-stride1" (block_act_grad, up to
# 7.7e-4): there the engine run in float64 agrees with the float32 capture to 1.6e-6, so it
# is float32 rounding in the engine's order of sums for an image whose loss gradient is
# small, not a different computation.
# act_cor, a log-det near 0 of a 16 x 16 kernel from a few SE channels, amplifies float32
# rounding: on "past-buckets" the float32 capture is 2.7e-4 from the engine run in float64
# and the float32 engine 1.4e-4 (1.7e-4 before its BatchNorm passes were rewritten; the
# two engines agree in float64 to 1e-13), so they differ by 1.3e-4 (1.0e-4 before).
RTOL = 1e-5
ACT_COR_ATOL = 5e-4
SUMS_ATOL = 2e-3

CASES = [
    pytest.param(  # widths 32/64 and sides 16, 8, 4: every bucket met exactly
        "SuperConvK3BNRELU(3,32,2,1)SuperResIDWE1K3(32,32,1,32,1)SuperResIDWE2K5(32,64,2,32,2)"
        "SuperResIDWE4K7(64,32,2,16,1)SuperConvK1BNRELU(32,64,1,1)@32",
        id="on-buckets",
    ),
    pytest.param(  # widths under the narrowest bucket (9, 17, 20, dw 24) and past one (33,
        # dw 40), pixels 18^2 and 9^2 past 256 and 64
        "SuperConvK3BNRELU(3,17,2,1)SuperResIDWE6K3(17,33,2,4,2)SuperResIDWE1K5(33,9,1,40,1)"
        "SuperConvK1BNRELU(9,20,1,1)@36",
        id="past-buckets",
    ),
    pytest.param(  # a two-layer stride-1 stem with k5, stride-1 first sub-block with shortcut
        "SuperConvK5BNRELU(3,12,1,2)SuperResIDWE2K3(12,24,1,12,2)SuperConvK1BNRELU(24,24,1,1)@20",
        id="stem-stride1",
    ),
]


THREE_QUARTER_BUCKETS = pytest.param(  # 96^2 rows in 12,288, dw 264 on them in 320 channels
    "SuperConvK3BNRELU(3,16,1,1)SuperResIDWE6K3(16,16,2,44,1)SuperConvK1BNRELU(16,16,1,1)@96",
    id="three-quarter-buckets",
)


@pytest.fixture(scope="module")
def batch():
    if not SAMPLE.exists():
        pytest.skip("needs ../shared/data/cifar10_sample.npz")
    return load_batch("cifar10", BATCH, 42, SAMPLE, None)


@pytest.mark.slow
@pytest.mark.parametrize("text", [*CASES, THREE_QUARTER_BUCKETS])
def test_padded_pieces_equal_the_unpadded_capture(text, batch):
    arch = parse(text)
    assert MBV2Engine.supports(arch)
    params = init_params(arch, 42, NUM_CLASSES)
    exact = site_sums(arch, params, *batch, NUM_CLASSES)
    padded = MBV2Engine().site_sums(arch, params, *batch, NUM_CLASSES)
    for kind in KINDS:
        np.testing.assert_array_equal(padded.counts[kind], exact.counts[kind], err_msg=kind)
        np.testing.assert_allclose(
            padded.sums[kind], exact.sums[kind], atol=SUMS_ATOL, err_msg=kind
        )
    for score in (mbv2_wrcor, mbv2_wrcor_allrelu):
        assert score(padded) == pytest.approx(score(exact), rel=RTOL)
    assert mbv2_act_cor(padded) == pytest.approx(mbv2_act_cor(exact), abs=ACT_COR_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("text", [CASES[0], CASES[2]])  # stride-2 stem; two-layer stem
def test_se_sums_skip_the_backwards_below_the_first_se(text, batch):
    """WRCor's SE sites need no cotangent below the first squeeze-excite: the backwards of
    the stem and of the first sub-block's expand and shortcut are skipped, the first
    depthwise + SE and project backwards leave out the cotangents of the inputs from there
    and of the first depthwise conv's output, and the SE sums are those of the full backward
    that the other kinds need."""
    arch = parse(text)
    params = init_params(arch, 42, NUM_CLASSES)
    engine = MBV2Engine(SE_KINDS)
    kinds = frozenset(SE_KINDS)
    engine._forward(arch, pad_params(params), jax.numpy.asarray(batch[0]), kinds, norm=True)
    calls = [call for _, call in engine._calls]
    needed = engine._needed(kinds, weights=False, images=None)
    first = next(i for i, call in enumerate(calls) if call.piece == "depthwise_se")
    sub_block = calls[first].path
    assert needed[:first] == [None] * first  # the stem and the first expand
    assert needed[first] == tuple(range(len(calls[first].inputs)))
    after = list(zip(calls[first + 1 :], needed[first + 1 :], strict=True))
    shortcut = [f for c, f in after if c.path[: len(sub_block) + 1] == (*sub_block, "shortcut")]
    assert shortcut == [None] * len(shortcut)
    project = {(c.piece, f) for c, f in after if c.path == (*sub_block, "project")}
    # the ReLU(h) x gate product needs no cotangent of h, the BatchNorm none of the residual
    assert project == {
        ("conv_rows", (0,)),
        ("centred_squares", ()),
        ("batch_norm_tile", (3,)),
    }
    rest = [f for c, f in after if c.path[: len(sub_block)] != sub_block]
    assert rest and all(f == () for f in rest)
    se = engine.site_sums(arch, params, *batch, NUM_CLASSES)
    every = MBV2Engine().site_sums(arch, params, *batch, NUM_CLASSES)
    for kind in SE_KINDS:
        np.testing.assert_array_equal(se.counts[kind], every.counts[kind], err_msg=kind)
        # float32 order of sums: the first SE's gradient comes without its conv's cotangent
        # and over row tiles (stem-stride1: 1.3e-6 apart before the tiles; in float64 1e-15)
        np.testing.assert_allclose(se.sums[kind], every.sums[kind], atol=5e-6, err_msg=kind)


@pytest.mark.slow
def test_tiles_of_padding_only_are_skipped_exactly(batch):
    """At 24 x 24 (576 of 1,024 rows) three of the eight 128-row tiles hold padding only: no
    1x1 piece runs on them, and the SE sums and the input Jacobian are the untiled
    engine's, which runs every piece on whole images."""
    arch = parse(
        "SuperConvK3BNRELU(3,16,2,1)SuperResIDWE2K3(16,24,1,16,2)SuperConvK1BNRELU(24,40,1,1)@48"
    )
    params = init_params(arch, 42, NUM_CLASSES)
    tiled = MBV2Engine(SE_KINDS)
    tiled._forward(arch, pad_params(params), jnp.asarray(batch[0]), frozenset(SE_KINDS), True)
    wholes = ("stem", "depthwise_se", "subsample", "head")
    tiles = {int(call.dims[2]) for _, call in tiled._calls if call.piece not in wholes}
    assert tiles == set(range(5))  # 4.5 tiles of real rows
    taken = (arch, params, *batch, NUM_CLASSES)
    skipped = tiled.measure(*taken, input_jacobian=True)
    every = MBV2Engine().measure(*taken, input_jacobian=True)
    for kind in SE_KINDS:
        want = every["site_sums"]
        np.testing.assert_array_equal(skipped["site_sums"].counts[kind], want.counts[kind])
        np.testing.assert_allclose(skipped["site_sums"].sums[kind], want.sums[kind], atol=5e-6)
    np.testing.assert_allclose(
        skipped["input_jacobian"], every["input_jacobian"], rtol=1e-4, atol=1e-6
    )


@pytest.mark.slow
def test_other_widths_and_kernels_in_the_same_buckets_compile_nothing(batch):
    first, second = (
        parse(
            f"SuperConvK3BNRELU(3,{a},2,1)SuperResIDWE2K{k}({a},{b},2,{a},1)"
            f"SuperConvK1BNRELU({b},{c},1,1)@{r}"
        )
        for a, b, c, k, r in ((12, 20, 40, 3, 24), (16, 28, 36, 7, 24))
    )
    engine = MBV2Engine()

    def measure(arch, seed):  # everything the engine measures
        taken = (arch, init_params(arch, seed, NUM_CLASSES), *batch, NUM_CLASSES)
        engine.measure(*taken, input_jacobian=True, loss_grads=True, activations=True)
        engine.half_batch_grads(*taken)
        engine.synflow_grads(*taken[:2], batch[0].shape)
        engine.zen(arch, zen_params(arch, seed, NUM_CLASSES), *zen_inputs(arch, seed, BATCH))

    CompileCounter.install()
    measure(first, 1)
    before = CompileCounter.count
    measure(second, 2)
    assert CompileCounter.count == before


def test_unsupported_blocks_are_named():
    arch = parse("SuperConvK3BNRELU(3,8,2,1)SuperConvK3BNRELU(8,8,1,1)@16")
    assert not MBV2Engine.supports(arch)
    with pytest.raises(ValueError, match="does not build"):
        MBV2Engine().site_sums(arch, init_params(arch, 1, 2), np.zeros((2, 8, 8, 3)), [0, 1], 2)


@pytest.mark.parametrize("native", [False, True])
def test_folded_conv_backward_from_its_output_equals_autodiff(native, monkeypatch):
    """The expand's backward reads the scale's gradient from the saved output instead of a
    product of the input with the cotangent: the same gradients as autodiff of the conv,
    padded rows and a padded channel (zero kernel column, zero scale) included (the input's
    cotangent on its real rows: the caller masks the others, which the native call leaves 0),
    in XLA's form and in the native call."""
    if native and not native_cpu():
        pytest.skip("the native calls are not built here")
    monkeypatch.setattr(padded_rows, "native_cpu", lambda: native)
    rng = np.random.default_rng(0)
    mask = (np.arange(8) < 6)[:, None]
    centred = rng.standard_normal((3, 8, 5)).astype(np.float32) * mask
    kernel = rng.standard_normal((5, 7)).astype(np.float32)
    kernel[:, -1] = 0
    scale = rng.uniform(0.5, 2, 7).astype(np.float32)
    scale[-1] = 0
    bias = rng.standard_normal(7).astype(np.float32)
    args = tuple(map(jnp.asarray, (centred, kernel, scale, bias)))
    z = folded_conv(*args, mask, None)
    g = jnp.asarray(rng.standard_normal(z.shape).astype(np.float32))
    want = jax.vjp(lambda *a: folded_conv(*a, mask, None), *args)[1](g)
    have = jax.vjp(lambda *a: folded_conv(*a, mask, z), *args)[1](g)
    want, have = (want[0] * mask, *want[1:]), (have[0] * mask, *have[1:])
    for w, h in zip(want, have, strict=True):
        np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_batch_norm_backward_sums_natively_as_xla_does():
    """The depthwise conv's BatchNorm backward (`batch_norm_saved`) with its scale's and
    bias's sums from the native call and from XLA's: the same cotangents, on two tiles, the
    second ending in padding rows (where g is not 0), and a padded channel (zero scale)."""
    if not native_cpu():
        pytest.skip("the native calls are not built here")
    rng = np.random.default_rng(3)
    rows, scale = 12, rng.uniform(0.5, 2, 6).astype(np.float32)
    scale[-1] = 0
    w = {"scale": scale, "bias": rng.standard_normal(6).astype(np.float32)}
    w = {**jax.tree.map(jnp.asarray, w), "kernel": jnp.zeros((MAX_KERNEL, MAX_KERNEL, 1, 6))}
    tile = functools.partial(rng.standard_normal, (3, 8, 6), np.float32)
    z, g = (tile(), tile()), (tile(), tile())
    z = (z[0], z[1] * (jnp.arange(8) < 4)[:, None])  # 12 real rows: 4 in the second tile

    def backward(native: bool) -> tuple:
        def transposed(x, kernel, geometry, d_y):
            return d_y, jnp.zeros_like(kernel)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(padded_rows, "native_cpu", lambda: native)
            geometry, rstd = jnp.zeros(2, jnp.int32), jnp.full(6, 0.7, jnp.float32)
            norm = padded_rows.batch_norm_saved
            run = lambda w: norm(transposed, z, w, geometry, rows, z, rstd)  # noqa: E731
            return jax.vjp(run, w)[1](g)[0]

    want, have = backward(False), backward(True)
    for key in ("scale", "bias"):
        np.testing.assert_allclose(have[key], want[key], rtol=1e-5, atol=1e-6)
    assert float(have["scale"][-1]) == 0.0


@pytest.mark.parametrize("native", [False, True])
def test_normalized_tile_backward_equals_autodiff(native, monkeypatch):
    """The 1x1 tiles' BatchNorm backward, written out with two sums (on CPU the native
    call's), against autodiff of its forward: every input's cotangent, on a tile whose last
    rows are padding (where g is not 0) with a zero-scale channel."""
    if native and not native_cpu():
        pytest.skip("the native calls are not built here")
    monkeypatch.setattr(padded_rows, "native_cpu", lambda: native)
    rng = np.random.default_rng(4)
    weights = jnp.asarray((np.arange(8) < 5)[:, None], jnp.float32)
    y = jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32) * weights
    total, squares = y.sum(axis=(0, 1)), jnp.asarray(rng.uniform(5, 9, 6), jnp.float32)
    scale = jnp.asarray(np.r_[rng.uniform(0.5, 2, 5), 0.0], jnp.float32)
    bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32)
    args = (y, total, squares, scale, bias)

    def plain(y, total, squares, scale, bias):
        rstd = jax.lax.rsqrt(squares / 15 + BN_EPS)
        return ((y - total / 15) * rstd * scale + bias) * weights

    want = jax.vjp(plain, *args)[1](g)
    have = jax.vjp(lambda *a: padded_rows.normalized_tile(*a, weights, 15), *args)[1](g)
    for w, h in zip(want, have, strict=True):
        np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_gram_matrix_backward_equals_autodiff():
    """The centred product's backward as one product, flat (g + g^T), against autodiff of
    flat^T flat (two products), for a cotangent that is not symmetric."""
    rng = np.random.default_rng(1)
    flat = jnp.asarray(rng.standard_normal((40, 6)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((6, 6)).astype(np.float32))
    (want,) = jax.vjp(lambda f: f.T @ f, flat)[1](g)
    (have,) = jax.vjp(gram_matrix, flat)[1](g)
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "side"), [(7, 2, 11), (5, 1, 8)])
def test_depthwise_kernel_cotangent_equals_the_grouped_convs(
    kernel, stride, side, native, monkeypatch
):
    """The depthwise conv's kernel cotangent (XLA's loop over the taps, and the native
    call) against autodiff of the grouped conv of ReLU(x), on rows padded past side^2 (the
    padded output rows' cotangent is ignored); and its program keeps one tap's copy at a
    time, not one per tap (49 at k = 7 asked 41 GB of a search architecture's first block
    at batch 64)."""
    if native and not native_cpu():
        pytest.skip("the native calls are not built here")
    monkeypatch.setattr(padded_rows, "native_cpu", lambda: native)
    rng = np.random.default_rng(kernel + stride)
    x = rng.standard_normal((2, side, side, 4))
    small = rng.standard_normal((kernel, kernel, 1, 4))
    r = (kernel - 1) // 2
    inner = slice(MAX_KERNEL // 2 - r, MAX_KERNEL // 2 + r + 1)
    w = np.zeros((MAX_KERNEL, MAX_KERNEL, 1, 4))
    w[inner, inner] = small
    out_side = -(-side // stride)
    g = rng.standard_normal((2, out_side, out_side, 4))

    def conv(k: jax.Array) -> jax.Array:
        return depthwise_conv2d(jax.nn.relu(jnp.asarray(x)), k, stride)

    with jax.enable_x64(True):
        (small_cotangent,) = jax.vjp(conv, jnp.asarray(small))[1](jnp.asarray(g))
        want = np.zeros_like(w)
        want[inner, inner] = small_cotangent
        p, p_out = rows_bucket(side * side), rows_bucket(out_side * out_side)
        rows = np.zeros((2, p, 4))
        rows[:, : side * side] = x.reshape(2, -1, 4)
        g_rows = rng.standard_normal((2, p_out, 4))
        g_rows[:, : out_side * out_side] = g.reshape(2, -1, 4)
        args = (
            (jnp.asarray(rows),),
            jnp.asarray(w),
            jnp.asarray([side, r]),
            (jnp.asarray(g_rows),),
        )
        cotangents = jax.jit(
            functools.partial(depthwise_strided_transposed, stride=stride, p_out=p_out)
        )
        _, have = cotangents(*args)
        np.testing.assert_allclose(have, want, rtol=1e-10, atol=1e-10)
        scratch = cotangents.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert scratch < 8 * rows.nbytes


def test_buckets_and_padded_weights():
    widths = (1, 32, 33, 64, 65, 288, 385, 1536)
    assert [channel_bucket(c) for c in widths] == [32, 32, 64, 64, 128, 384, 512, 1536]
    pixels = (1, 9, 16, 17, 6144, 9216, 12544, 20736)
    assert [rows_bucket(p) for p in pixels] == [1, 16, 16, 32, 8192, 12288, 16384, 24576]
    arch = parse("SuperConvK3BNRELU(3,12,2,1)SuperResIDWE2K3(12,20,2,12,1)@16")
    params = init_params(arch, 0, NUM_CLASSES)
    padded = pad_params(params)
    stem = padded["block_00"]["layer_0"]["kernel"]
    assert stem.shape == (3, 3, 3, 32)
    np.testing.assert_array_equal(stem[..., :12], params["block_00"]["layer_0"]["kernel"])
    assert not stem[..., 12:].any()
    depthwise = padded["block_01"]["layer_0"]["depthwise"]["kernel"]
    assert depthwise.shape == (7, 7, 1, 32)  # k x k centred in MAX_KERNEL: k is run-time
    real = params["block_01"]["layer_0"]["depthwise"]["kernel"]
    np.testing.assert_array_equal(depthwise[2:5, 2:5, :, :24], real)
    assert np.count_nonzero(depthwise) == np.count_nonzero(real)
    assert padded["classifier"]["kernel"].shape == (32, NUM_CLASSES)


def test_expanded_widths_on_large_images_pad_to_a_multiple_of_64():
    """A sub-block's expanded width on an input of 4,096 padded rows or more pads to a
    multiple of 64 where that is narrower than its bucket, every other width to its bucket;
    the weights' real entries stay put."""
    assert [wide_bucket(c, 4096) for c in (16, 144, 264, 288)] == [32, 192, 320, 320]
    assert [wide_bucket(c, 2048) for c in (16, 144, 264)] == [32, 256, 384]
    arch = parse("SuperConvK3BNRELU(3,20,2,1)SuperResIDWE6K3(20,40,2,24,2)@128")
    params = init_params(arch, 0, NUM_CLASSES)
    rows = input_rows(arch)
    assert rows == {("block_01", "layer_0"): 4096, ("block_01", "layer_1"): 1024}
    wide, narrow = (pad_params(params, rows)["block_01"][layer] for _, layer in rows)
    shapes = {name: leaf.shape for name, leaf in _named_leaves(wide)}
    assert shapes["expand/kernel"] == (1, 1, 32, 192)
    assert shapes["depthwise/kernel"] == (7, 7, 1, 192)
    assert shapes["se/reduce/kernel"] == (1, 1, 192, 64)
    assert shapes["se/restore/scale"] == (192,)
    assert shapes["project/kernel"] == (1, 1, 192, 64)
    assert shapes["shortcut/conv/kernel"] == (1, 1, 32, 64)
    assert dict(_named_leaves(narrow))["expand/kernel"].shape == (1, 1, 64, 256)
    real = params["block_01"]["layer_0"]["project"]["kernel"]
    np.testing.assert_array_equal(wide["project"]["kernel"][:, :, :144, :40], real)
    assert np.count_nonzero(wide["project"]["kernel"]) == np.count_nonzero(real)


def _named_leaves(tree: dict) -> list[tuple[str, np.ndarray]]:
    return [
        ("/".join(str(k.key) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


ENGINE_GRADIENTS = ["input_jacobian", "loss_grads", "half_batch_grads", "synflow_grads"]
ACTIVATIONS_RTOL = {"naswot": 1e-12, "meco": 1e-5}
# Measured: delta within 6.6e-6 relative (an L1 norm of the difference of two nearby
# float32 feature maps, so rounding weighs ~100x), the log-std sum 1e-7, the score 4.6e-7.
ZEN_RTOL = 2e-5
ZEN_SCORE_RTOL = 2e-6
# Measured (float32, 2 CPUs, Intel Xeon): on "past-buckets" every leaf within 4e-5 of its
# largest entry but the shortcut conv's bias, whose gradient is 0 (BatchNorm follows it)
# and both sides round to ~1e-9; scores within 5e-5 relative (zico, a log of mean/std over two half
# batches, is the most sensitive). "stem-stride1" is the float32-sensitive case of the
# module docstring: leaves differ by up to 1.3e-3 of their largest entry there, the scores
# by 3e-5. synflow runs in float64 on both sides: 1e-14.
# On an AMD EPYC (family 25 model 17) zico on "past-buckets" came out 1.8e-4 apart: the
# float32 whole network is 2.6e-4 from the same computation in float64 there and the engine
# 4.4e-4, while the two in float64 agree to 1.7e-13, so zico gets float32's reach here.
# There, on "stem-stride1", the engine's float32 zico (with the native depthwise conv; XLA's
# taps: 1e-5) came out 7.8e-3 from the whole network's, its leaves ~1e-3 of their largest
# entry from float64's, while the kernel alone is within 1e-7 and the two in float64 agree
# to 1e-14: that case's zico is compared in float64.
PAST_BUCKETS = CASES[1].values[0]
STEM_STRIDE1 = CASES[2].values[0]
LEAF_ATOL = 1e-4
SCORE_RTOL = {"synflow": 1e-12, "zico": 5e-4}


@pytest.mark.slow
@pytest.mark.parametrize("text", CASES[1:])
def test_gradients_equal_the_whole_network_measurements(text, batch):
    """The gradients jacob_cov (input), snip and grad_norm (weights), zico (weights on each
    half batch) and synflow (weights, float64, BatchNorm off) read, through the padded
    pieces, against `measures`' whole-network programs: in the unpadded shapes, every leaf
    close on the well-conditioned case, the scores to float32 rounding on both."""
    arch = parse(text)
    params = init_params(arch, 42, NUM_CLASSES)
    images, labels = batch
    expected = MBV2Measurer(images, labels, NUM_CLASSES, 42).measure_many(
        ENGINE_GRADIENTS, arch, params
    )
    engine = MBV2Engine()
    batch = (arch, params, images, labels, NUM_CLASSES)
    got = engine.measure(*batch, site_sums=False, input_jacobian=True, loss_grads=True)
    got["half_batch_grads"] = engine.half_batch_grads(*batch)
    got["synflow_grads"] = engine.synflow_grads(arch, params, images.shape)
    for name in ENGINE_GRADIENTS:
        want = jax.tree_util.tree_flatten_with_path(expected[name])[0]
        have = jax.tree.leaves(got[name])
        assert len(want) == len(have), name
        for (path, w), h in zip(want, have, strict=True):
            assert w.shape == h.shape, (name, path)
            if text == PAST_BUCKETS or name == "synflow_grads":
                zero = [k.key for k in path[-2:]] == ["conv", "bias"]  # BatchNorm follows
                atol = 1e-7 if zero else LEAF_ATOL * np.abs(w).max()
                np.testing.assert_allclose(h, w, atol=atol, err_msg=f"{name} {path}")
    for proxy in ("jacob_cov", "snip", "grad_norm", "zico", "synflow"):
        read = PROXIES[proxy].measurement
        rtol = SCORE_RTOL.get(proxy, 1e-4)
        if text == STEM_STRIDE1 and proxy == "zico":
            have, want = _zico_in_float64(arch, params, images, labels)
            assert have == pytest.approx(want, rel=1e-10), proxy
            continue
        assert PROXIES[proxy].score(got[read], params) == pytest.approx(
            PROXIES[proxy].score(expected[read], params), rel=rtol
        ), proxy


def _zico_in_float64(arch, params: dict, images, labels) -> tuple[float, float]:
    """zico through the engine's pieces and through the whole network, both in float64."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        images = jnp.asarray(images, jnp.float64)
        whole = MBV2Measurer(images, labels, NUM_CLASSES, 42, dtype=jnp.float64)
        want = whole.measure_many(["half_batch_grads"], arch, params)["half_batch_grads"]
        have = MBV2Engine().half_batch_grads(arch, params, images, labels, NUM_CLASSES)
        return PROXIES["zico"].score(have, params), PROXIES["zico"].score(want, params)


@pytest.mark.slow
@pytest.mark.parametrize("text", CASES[1:])  # padding; two-layer stem, stride-1 shortcut
def test_activations_equal_the_whole_network_measurements(text, batch):
    """naswot's Hamming kernel (SE ReLU inputs, real channels only) exactly and meco's sum
    (first image's block ReLU outputs, real rows and channels only) to float32 rounding,
    through the padded pieces against `measures`' whole-network program."""
    arch = parse(text)
    params = init_params(arch, 42, NUM_CLASSES)
    images, labels = batch
    expected = MBV2Measurer(images, labels, NUM_CLASSES, 42).measure_many(
        ["activations"], arch, params
    )["activations"]
    got = MBV2Engine().measure(
        arch, params, images, labels, NUM_CLASSES, site_sums=False, activations=True
    )["activations"]
    np.testing.assert_array_equal(got[0], expected[0])
    for proxy, rtol in ACTIVATIONS_RTOL.items():
        assert PROXIES[proxy].score(got, params) == pytest.approx(
            PROXIES[proxy].score(expected, params), rel=rtol
        ), proxy


@pytest.mark.slow
@pytest.mark.parametrize("text", CASES[1:])
def test_zen_equals_the_whole_network_measurement(text, batch):
    """Zen-score's two terms through the padded pieces (residual links off, BatchNorm input
    variances over the real rows and channels) against `measures`' whole network."""
    arch = parse(text)
    measurer = MBV2Measurer(*batch, NUM_CLASSES, 42)
    expected = measurer.measure_many(["zen"], arch, init_params(arch, 42, NUM_CLASSES))["zen"]
    gaussian = zen_params(arch, 42, NUM_CLASSES)
    got = MBV2Engine().zen(arch, gaussian, *zen_inputs(arch, 42, BATCH))
    assert got == pytest.approx(expected, rel=ZEN_RTOL)
    score = PROXIES["zen"].score
    assert score(got, gaussian) == pytest.approx(score(expected, gaussian), rel=ZEN_SCORE_RTOL)
