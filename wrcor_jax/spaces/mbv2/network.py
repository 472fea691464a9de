"""The Flax network of a MobileNetV2-space architecture (SPEC 8), numerically PyTorch's.

The architecture is a static module attribute: each arch traces its own program. The maths
lives in pure functions of (weights, x) -- `resize_bilinear`, `conv_bn_relu`,
`inverted_residual`, `squeeze_excite`, `projection`, `nb201_pieces.classify` -- so a
composed engine can compile them per sub-block shape and chain them in Python
(docs/mbv2_engine.md); the linen modules only declare weights and host response sites.

Parameter tree (`block_03` is the fourth entry of the block list, `layer_1` its second
sub-block; a bias-free conv and its BatchNorm share one node, as in NB201):

    block_00/layer_0/{kernel, scale, bias}                 SuperConvK{k}BNRELU layer
    block_03/layer_1/expand/{kernel, scale, bias}          1x1 conv to dw, BN
    block_03/layer_1/depthwise/{kernel, scale, bias}       k x k depthwise (kernel k,k,1,dw), BN
    block_03/layer_1/se/reduce/{kernel, scale, bias}       SE: 1x1 conv dw -> dw/4, BN
    block_03/layer_1/se/restore/{kernel, scale, bias}      SE: 1x1 conv dw/4 -> dw, BN
    block_03/layer_1/project/{kernel, scale, bias}         1x1 conv to out, BN
    block_03/layer_0/shortcut/conv/{kernel, bias}          first sub-block only: 1x1 conv
    block_03/layer_0/shortcut/bn/{scale, bias}             with bias and the stride, BN
    classifier/{kernel, bias}                              Linear(last width -> classes)

Response sites: at the input of every ReLU, `sow("intermediates", "relu_in", x)` and
`perturb("relu_in", x)` under the module path of the ReLU:
`block_BB/layer_L/relu_in` (a conv layer's ReLU, or a sub-block's ReLU after the residual
add), `block_BB/layer_L/expand/relu_in`, `block_BB/layer_L/depthwise/relu_in`, and
`block_BB/layer_L/se/relu_in` -- the SE's ReLU, the only one the reference hooks (SPEC 3b).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.layers import batch_norm, conv2d, torch_default_init
from wrcor_jax.spaces.mbv2.arch import ConvBlock, MBV2Arch, ResBlock
from wrcor_jax.spaces.nb201_pieces import classify
from wrcor_jax.spaces.running_norm import NormMode, running_batch_norm
from wrcor_jax.weights import BatchNormWeights, declare_conv_weights, torch_kernel_init

BN_EPS = 1e-3  # the reference sets it on every BatchNorm2d of the network
SE_RATIO = 0.25

Probe = Callable[[str, jax.Array], jax.Array]
"""A response site: `probe(name, x)` sees the input x of the ReLU called `name` (`expand`,
`depthwise`, `se` or `out`) and returns what the ReLU is applied to (x, or x perturbed)."""


def no_probe(name: str, x: jax.Array) -> jax.Array:
    """The probe of a plain forward pass: every site passes its value through."""
    del name
    return x


Norm = Callable[[str, jax.Array, dict], jax.Array]
"""A BatchNorm: `norm(name, y, w)` normalises the conv output y of the node called `name`
(`conv`, `expand`, `depthwise`, `se/reduce`, `se/restore`, `project` or `shortcut`) with the
`scale` and `bias` of w. The scoring networks use `batch_statistics`; the trainer's also keep
running averages (`MBV2Network.norm`)."""


def batch_statistics(name: str, y: jax.Array, w: dict) -> jax.Array:
    """Training-mode BatchNorm (eps 1e-3): the batch's own statistics, nothing kept."""
    del name
    return batch_norm(y, w["scale"], w["bias"], eps=BN_EPS)


def block_name(index: int) -> str:
    """The parameter-tree key of top-level block `index` (its WRCor weight is 2^index)."""
    return f"block_{index:02d}"


def layer_name(index: int) -> str:
    """The parameter-tree key of layer (sub-block) `index` inside a block."""
    return f"layer_{index}"


def se_channels(channels: int) -> int:
    """Width of the squeeze-and-excitation bottleneck: round(c/4), at least 1."""
    return max(1, round(channels * SE_RATIO))


# --------------------------------------------------------------------------- pure maths


def _source_coordinates(n_in: int, n_out: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """Torch's bilinear taps along one axis (align_corners=False, no antialias): indices
    i0, i1 and weights l0, l1 with out[d] = l0[d] x[i0[d]] + l1[d] x[i1[d]].

    The source coordinate scale * (d + 0.5) - 0.5 is rounded once, as a fused multiply-add:
    so torch 2.13's CPU kernel (AVX2) computes it, and float32 weights then agree bit for bit
    (rounded twice, some float32 coordinates near 300 were one ulp, 3e-5, off). It is clamped
    at 0 below; the upper neighbour is clamped to the last row.
    """
    scale = dtype.type(n_in) / dtype.type(n_out)
    centres = np.arange(n_out).astype(dtype) + dtype.type(0.5)
    source = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(dtype)
    source = np.maximum(source, dtype.type(0))
    i0 = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    l1 = np.clip(source - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (dtype.type(1) - l1).astype(dtype), l1


def _resize_axis(x: jax.Array, size: int, axis: int) -> jax.Array:
    if x.shape[axis] == size:
        return x  # torch copies: weights 1 and 0
    i0, i1, l0, l1 = _source_coordinates(x.shape[axis], size, np.dtype(x.dtype))
    shape = [1] * x.ndim
    shape[axis] = size
    return jnp.take(x, i0, axis=axis) * l0.reshape(shape) + jnp.take(x, i1, axis=axis) * l1.reshape(
        shape
    )


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """NHWC images resized to size x size as torch's `F.interpolate(mode='bilinear')` with its
    defaults (align_corners=False, antialias=False: downsampling reads only the 2 x 2 nearest
    pixels). Width first, then height: the order of torch's sums."""
    return _resize_axis(_resize_axis(images, size, 2), size, 1)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Depthwise convolution (one k x k filter per channel, HWIO kernel k,k,1,C) with torch's
    padding (k-1)//2 and no bias."""
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def depthwise_conv2d_taps(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """`depthwise_conv2d` as the sum over taps of a strided slice times its weights: the
    same sums in another order (equal in float64), 3x faster forward and backward on
    XLA:CPU, a MobileNetV2 training step 6x faster. The trainer's choice; scoring keeps the
    grouped conv, whose float32 summation order its parity bars were measured with."""
    k = kernel.shape[0]
    pad = (k - 1) // 2
    n, h, w, c = x.shape
    h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = jnp.zeros((n, h_out, w_out, c), x.dtype)
    for i in range(k):
        for j in range(k):
            end = (n, i + (h_out - 1) * stride + 1, j + (w_out - 1) * stride + 1, c)
            tap = jax.lax.slice(padded, (0, i, j, 0), end, (1, stride, stride, 1))
            out = out + tap * kernel[i, j, 0]
    return out


def conv_bn(
    w: dict,
    x: jax.Array,
    stride: int = 1,
    conv: Callable = conv2d,
    norm: Norm = batch_statistics,
    name: str = "conv",
) -> jax.Array:
    """A bias-free conv and its BatchNorm (`name` tells `norm` which one)."""
    return norm(name, conv(x, w["kernel"], stride), w)


def conv_bn_relu(
    w: dict, x: jax.Array, stride: int = 1, probe: Probe = no_probe, norm: Norm = batch_statistics
) -> jax.Array:
    """One layer of a SuperConvK{k}BNRELU block; its ReLU's site is `out`."""
    return jax.nn.relu(probe("out", conv_bn(w, x, stride, norm=norm)))


def squeeze_excite(
    w: dict, x: jax.Array, probe: Probe = no_probe, norm: Norm = batch_statistics
) -> jax.Array:
    """x times a per-channel gate: global average pool, 1x1 conv, BN, ReLU (site `se`),
    1x1 conv, BN, sigmoid. Its BatchNorms see N x 1 x 1 values."""
    s = conv_bn(w["reduce"], x.mean(axis=(1, 2), keepdims=True), norm=norm, name="se/reduce")
    s = conv_bn(w["restore"], jax.nn.relu(probe("se", s)), norm=norm, name="se/restore")
    return jax.nn.sigmoid(s) * x


def projection(w: dict, x: jax.Array, stride: int, norm: Norm = batch_statistics) -> jax.Array:
    """The first sub-block's shortcut: 1x1 conv with bias and the stride, then BN."""
    y = conv2d(x, w["conv"]["kernel"], stride) + w["conv"]["bias"]
    return norm("shortcut", y, w["bn"])


def inverted_residual(
    w: dict,
    x: jax.Array,
    stride: int = 1,
    probe: Probe = no_probe,
    norm: Norm = batch_statistics,
    depthwise: Callable = depthwise_conv2d,
) -> jax.Array:
    """One sub-block of a SuperResIDWE{e}K{k} block: expand (1x1), depthwise (k x k, stride),
    SE, project (1x1), plus the shortcut (`projection` when `w` has one, else identity), then
    ReLU. Sites in order: `expand`, `depthwise`, `se`, `out` (after the residual add)."""
    h = jax.nn.relu(probe("expand", conv_bn(w["expand"], x, norm=norm, name="expand")))
    h = conv_bn(w["depthwise"], h, stride, depthwise, norm, "depthwise")
    h = jax.nn.relu(probe("depthwise", h))
    h = conv_bn(w["project"], squeeze_excite(w["se"], h, probe, norm), norm=norm, name="project")
    shortcut = projection(w["shortcut"], x, stride, norm) if "shortcut" in w else x
    return jax.nn.relu(probe("out", h + shortcut))


# --------------------------------------------------------------------------- linen modules


def _relu_site(module: nn.Module, x: jax.Array) -> jax.Array:
    """Record a ReLU input under `module`'s path: its value and a perturbation for its
    gradient."""
    module.sow("intermediates", "relu_in", x)
    return module.perturb("relu_in", x)


def _torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias init: Uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class ConvBN(nn.Module):
    """Weights of a bias-free conv (`in_features` per group) and its BatchNorm; also hosts
    the site of the ReLU that follows them (`relu_site`)."""

    features: int
    kernel_size: int
    in_features: int

    @nn.compact
    def __call__(self) -> dict:
        return declare_conv_weights(self, self.features, self.kernel_size, self.in_features)

    def relu_site(self, x: jax.Array) -> jax.Array:
        return _relu_site(self, x)


class BiasedWeights(nn.Module):
    """A kernel (conv HWIO or linear in x out) and a bias, both with PyTorch's default init."""

    kernel_shape: tuple[int, ...]

    @nn.compact
    def __call__(self) -> dict:
        fan_in = int(np.prod(self.kernel_shape[:-1]))
        return {
            "kernel": self.param("kernel", torch_kernel_init, self.kernel_shape),
            "bias": self.param("bias", _torch_bias_init(fan_in), self.kernel_shape[-1:]),
        }


class Shortcut(nn.Module):
    """Weights of the projection shortcut: a 1x1 conv with bias, and a BatchNorm."""

    features: int
    in_features: int

    @nn.compact
    def __call__(self) -> dict:
        conv = BiasedWeights((1, 1, self.in_features, self.features), name="conv")()
        return {"conv": conv, "bn": BatchNormWeights(self.features, name="bn")()}


class SqueezeExcite(nn.Module):
    """Weights of a squeeze-and-excitation module on `features` channels; hosts its ReLU's
    site, so the SE's ReLU is told apart by the path `.../se/relu_in`."""

    features: int

    @nn.compact
    def __call__(self) -> dict:
        mid = se_channels(self.features)
        return {
            "reduce": ConvBN(mid, 1, self.features, name="reduce")(),
            "restore": ConvBN(self.features, 1, mid, name="restore")(),
        }

    def relu_site(self, x: jax.Array) -> jax.Array:
        return _relu_site(self, x)


def _cast(tree: dict, dtype: Any) -> dict:
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), tree)


def _module_norm(module: nn.Module, mode: NormMode, prefix: str = "") -> Norm:
    """The `Norm` of the pure functions a module calls: with running averages (`mode` train
    or eval), the BatchNorm `name` keeps them in the module's `batch_stats` under
    `{prefix}{name}_stats` (`/` as `_`)."""
    if mode == "batch":
        return batch_statistics

    def norm(name: str, y: jax.Array, w: dict) -> jax.Array:
        key = f"{prefix}{name.replace('/', '_')}_stats"
        return running_batch_norm(module, key, y, w["scale"], w["bias"], mode, BN_EPS)

    return norm


class InvertedResidual(nn.Module):
    """One sub-block of a SuperResIDWE block (`first`: the one with the stride and the
    projection shortcut)."""

    block: ResBlock
    first: bool
    dtype: Any = jnp.float32
    norm: NormMode = "batch"
    depthwise: Callable = depthwise_conv2d

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, dw = self.block, self.block.dw_channels
        c_in = b.in_channels if self.first else b.out_channels
        stages = {
            "expand": ConvBN(dw, 1, c_in, name="expand"),
            "depthwise": ConvBN(dw, b.kernel, 1, name="depthwise"),
            "se": SqueezeExcite(dw, name="se"),
            "project": ConvBN(b.out_channels, 1, dw, name="project"),
        }
        w = {key: stage() for key, stage in stages.items()}
        if self.first:
            w["shortcut"] = Shortcut(b.out_channels, c_in, name="shortcut")()
        sites = {key: stage.relu_site for key, stage in stages.items() if key != "project"}
        sites["out"] = functools.partial(_relu_site, self)
        stride = b.stride if self.first else 1
        return inverted_residual(
            _cast(w, self.dtype),
            x,
            stride,
            lambda name, v: sites[name](v),
            _module_norm(self, self.norm),
            self.depthwise,
        )


class ResBlockStack(nn.Module):
    """A SuperResIDWE{e}K{k} block: `layers` inverted-residual sub-blocks."""

    block: ResBlock
    dtype: Any = jnp.float32
    norm: NormMode = "batch"
    depthwise: Callable = depthwise_conv2d

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.block.layers):
            first = j == 0
            layer = InvertedResidual(
                self.block, first, self.dtype, self.norm, self.depthwise, name=layer_name(j)
            )
            x = layer(x)
        return x


class ConvStack(nn.Module):
    """A SuperConvK{k}BNRELU block: `layers` x (conv, BN, ReLU), the stride on the first."""

    block: ConvBlock
    dtype: Any = jnp.float32
    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = self.block
        for j in range(b.layers):
            c_in = b.in_channels if j == 0 else b.out_channels
            layer = ConvBN(b.out_channels, b.kernel, c_in, name=layer_name(j))
            stride = b.stride if j == 0 else 1
            x = conv_bn_relu(
                _cast(layer(), self.dtype),
                x,
                stride,
                lambda _, v, site=layer.relu_site: site(v),
                _module_norm(self, self.norm, prefix=f"{layer_name(j)}_"),
            )
        return x


class MBV2Network(nn.Module):
    """Bilinear resize to the arch's resolution, the blocks, global average pool, Linear.

    `dtype` is the computation dtype: images and weights are cast to it (float64 for parity
    checks needs `jax.enable_x64`). `norm` is "batch" for scoring (batch statistics, no
    state); the trainer uses "train" and "eval", with running averages in `batch_stats`
    (`wrcor_jax.spaces.running_norm`). `depthwise` computes the depthwise convs (the trainer
    takes `depthwise_conv2d_taps`).
    """

    arch: MBV2Arch
    num_classes: int = 1000
    dtype: Any = jnp.float32
    norm: NormMode = "batch"
    depthwise: Callable = depthwise_conv2d

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = resize_bilinear(jnp.asarray(images, self.dtype), self.arch.resolution)
        for index, block in enumerate(self.arch.blocks):
            name = block_name(index)
            if isinstance(block, ConvBlock):
                x = ConvStack(block, self.dtype, self.norm, name=name)(x)
            else:
                x = ResBlockStack(block, self.dtype, self.norm, self.depthwise, name=name)(x)
        kernel_shape = (self.arch.last_width, self.num_classes)
        w = BiasedWeights(kernel_shape, name="classifier")()
        return classify(_cast(w, self.dtype), x)


@functools.lru_cache(maxsize=256)
def param_shapes(arch: MBV2Arch, num_classes: int = 1000) -> dict:
    """Shapes and dtypes of the parameter tree of `arch` (traced, nothing computed)."""
    model = MBV2Network(arch, num_classes)
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def init_params(arch: MBV2Arch, seed: int = 42, num_classes: int = 1000) -> dict:
    """The parameters of `arch` with PyTorch's default init, as NumPy float32 arrays (same
    tree and distributions as `MBV2Network(arch, num_classes).init(...)["params"]`)."""
    return torch_default_init(seed, param_shapes(arch, num_classes))


def count_params(arch: MBV2Arch, num_classes: int = 1000) -> int:
    """Trainable parameters of `arch` (BatchNorm scale and bias included, as torch counts)."""
    return sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(param_shapes(arch, num_classes))
    )
