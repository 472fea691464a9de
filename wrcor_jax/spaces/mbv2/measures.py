"""Whole-network measurements of a MobileNetV2-space architecture, read by the non-WRCor proxies.

They are the measurements `nb201_measures` takes, in the same host form, so the proxies of
`wrcor_jax.proxies` score them unchanged (SPEC 4):
- `loss_grads`: dL/dtheta of the mean cross-entropy on the batch (BN in training mode), the
  architecture's whole parameter tree (every weight of an MBV2 network is used);
- `half_batch_grads`: the same on each half of the batch, stacked (ZiCo's two batches);
- `input_jacobian`: d(sum of logits)/d(images), one row per image of the batch as given
  (the network resizes it, so the Jacobian includes the bilinear resize);
- `synflow_grads`: dR/dtheta at |theta| in float64 without BatchNorm, R = sum of the logits
  for one all-ones image of the batch's shape;
- `activations`: the NASWOT kernel and the MeCo sum from one forward pass;
- `zen`: Zen-score's feature perturbation and BN scaling terms on Gaussian weights and inputs.

Sites, from what the paper's code does on this space:
- naswot: its `act_hamming` hooks the modules whose class name contains "ReLU", here only the
  `nn.ReLU` of each squeeze-and-excitation module (the block ReLUs are `RELU`, SPEC 3b); it is
  not in place, so the hook reads its input: one N x dw/4 code per sub-block. Few bits, but
  not degenerate: the SE's BatchNorm centres each channel over the batch.
- meco: the paper's code has no MeCo; MeCo's own code hooks every module. Variant, as on NB201
  the layer outputs rather than every torch submodule: the output of every block ReLU (each
  conv layer's, each sub-block's expand, depthwise and final ReLU). The SE's ReLU is left
  out: its maps are 1 x 1, whose channel correlation is undefined, set to 0 by MeCo, so it
  would add 0.
- zen: Zen-NAS defines it on this space and computes it with the residual links removed
  (`no_reslink=True`: each sub-block is its body then the ReLU, no shortcut); so here too,
  with the NB201 variant choices of `proxies.zen` (sigma from the batch statistics on x,
  constant-input BatchNorms left out) and Zen-NAS's inputs: Gaussian images at the
  architecture's resolution, which the resize passes through unchanged.

The network is `network.py`'s, restated in `_Pass` with the two switches these need and its
pure functions do not offer (BatchNorm off for synflow, residual links off for zen) and with
the values the proxies read recorded; with both on it computes exactly `MBV2Network`. Each
architecture traces and compiles its own programs (one per group of measurements and batch
shape); bounding compilations across a search is the composed engine's job.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.layers import batch_norm, conv2d
from wrcor_jax.proxies.zen import gaussian_params
from wrcor_jax.proxies.zen import zen_inputs as gaussian_inputs
from wrcor_jax.spaces.mbv2.arch import ConvBlock, MBV2Arch
from wrcor_jax.spaces.mbv2.network import (
    BN_EPS,
    block_name,
    depthwise_conv2d,
    layer_name,
    param_shapes,
    resize_bilinear,
)
from wrcor_jax.spaces.nb201_measures import (
    MEASUREMENTS,
    _hamming_kernel,
    _l1_distance,
    _log_mean_std,
    _min_channel_eigenvalue,
)
from wrcor_jax.spaces.nb201_pieces import classify, cross_entropy

ON_THE_BATCH = frozenset({"loss_grads", "input_jacobian", "activations"})  # share one forward


class _Pass:
    """One pass through the network of an architecture, recording what the proxies read:
    the SE ReLUs' inputs (naswot), the block ReLUs' outputs (meco) and every BatchNorm's
    input (zen). `use_bn` False makes every BatchNorm the identity (synflow); `residual`
    False drops the sub-blocks' shortcuts (Zen-NAS's zen)."""

    def __init__(self, use_bn: bool = True, residual: bool = True):
        self.use_bn, self.residual = use_bn, residual
        self.se_relu_inputs: list[jax.Array] = []
        self.relu_outputs: list[jax.Array] = []
        self.bn_inputs: list[jax.Array] = []

    def norm(self, y: jax.Array, w: dict) -> jax.Array:
        self.bn_inputs.append(y)
        return batch_norm(y, w["scale"], w["bias"], eps=BN_EPS) if self.use_bn else y

    def conv_bn(self, w: dict, x: jax.Array, stride: int = 1, conv: Callable = conv2d):
        return self.norm(conv(x, w["kernel"], stride), w)

    def relu(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(x)
        self.relu_outputs.append(out)
        return out

    def squeeze_excite(self, w: dict, x: jax.Array) -> jax.Array:
        s = self.conv_bn(w["reduce"], x.mean(axis=(1, 2), keepdims=True))
        self.se_relu_inputs.append(s)
        s = self.conv_bn(w["restore"], jax.nn.relu(s))
        return jax.nn.sigmoid(s) * x

    def inverted_residual(self, w: dict, x: jax.Array, stride: int) -> jax.Array:
        h = self.relu(self.conv_bn(w["expand"], x))
        h = self.relu(self.conv_bn(w["depthwise"], h, stride, depthwise_conv2d))
        h = self.conv_bn(w["project"], self.squeeze_excite(w["se"], h))
        if self.residual and "shortcut" in w:
            conv = w["shortcut"]["conv"]
            h = h + self.norm(conv2d(x, conv["kernel"], stride) + conv["bias"], w["shortcut"]["bn"])
        elif self.residual:
            h = h + x
        return self.relu(h)

    def features(self, arch: MBV2Arch, params: dict, images: jax.Array) -> jax.Array:
        """The last block's output, before global pooling."""
        x = resize_bilinear(images, arch.resolution)
        for index, block in enumerate(arch.blocks):
            for j in range(block.layers):
                w, stride = params[block_name(index)][layer_name(j)], block.stride if j == 0 else 1
                if isinstance(block, ConvBlock):
                    x = self.relu(self.conv_bn(w, x, stride))
                else:
                    x = self.inverted_residual(w, x, stride)
        return x

    def logits(self, arch: MBV2Arch, params: dict, images: jax.Array) -> jax.Array:
        return classify(params["classifier"], self.features(arch, params, images))


@functools.partial(jax.jit, static_argnames=("arch", "wanted"))
def _on_the_batch(
    arch: MBV2Arch, wanted: frozenset, params: dict, images: jax.Array, labels: jax.Array
) -> dict:
    """The `wanted` measurements of ON_THE_BATCH from one forward pass and its pullback."""

    def forward(p: dict, x: jax.Array) -> tuple[jax.Array, tuple]:
        run = _Pass()
        logits = run.logits(arch, p, x)
        return logits, (run.se_relu_inputs, [out[0] for out in run.relu_outputs])

    logits, pullback, (se_inputs, first_maps) = jax.vjp(forward, params, images, has_aux=True)
    out = {}
    if "loss_grads" in wanted:
        out["loss_grads"] = pullback(jax.grad(cross_entropy)(logits, labels))[0]
    if "input_jacobian" in wanted:
        out["input_jacobian"] = pullback(jnp.ones_like(logits))[1]
    if "activations" in wanted:
        n = images.shape[0]
        kernel = sum((_hamming_kernel(s) for s in se_inputs), jnp.zeros((n, n), jnp.int32))
        out["activations"] = kernel, first_maps
    return out


@functools.partial(jax.jit, static_argnames="arch")
def _synflow_grads(arch: MBV2Arch, params: dict, ones: jax.Array) -> dict:
    return jax.grad(lambda p: _Pass(use_bn=False).logits(arch, p, ones).sum())(params)


@functools.partial(jax.jit, static_argnames="arch")
def _zen_terms(
    arch: MBV2Arch, params: dict, x: jax.Array, x_mixed: jax.Array
) -> tuple[jax.Array, jax.Array]:
    clean = _Pass(residual=False)
    features = clean.features(arch, params, x)
    mixed = _Pass(residual=False).features(arch, params, x_mixed)
    return _l1_distance(features, mixed), sum(_log_mean_std(y) for y in clean.bn_inputs)


def batch_halves(n: int) -> tuple[slice, slice]:
    """The two halves of a batch of `n`, ZiCo's two batches."""
    if n % 2:
        raise ValueError("ZiCo splits the batch in two halves: use an even batch size")
    return slice(0, n // 2), slice(n // 2, n)


def zen_params(arch: MBV2Arch, seed: int, num_classes: int) -> dict:
    """`arch`'s parameter tree with Zen-NAS's Gaussian initialisation (NumPy float32)."""
    return gaussian_params(param_shapes(arch, num_classes), seed)


def zen_inputs(arch: MBV2Arch, seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian images x and x + 0.01 eps (NHWC) at `arch`'s resolution, as Zen-NAS draws them."""
    return gaussian_inputs(seed, (batch_size, arch.resolution, arch.resolution, 3))


class MBV2Measurer:
    """Measurements of MobileNetV2-space architectures on one batch (NHWC images of any size)
    for a `num_classes` network; `seed` draws Zen-score's Gaussian weights and inputs. The
    batch is cast to `dtype` (float64 only to check float32's rounding, under enable_x64)."""

    def __init__(
        self,
        images: jax.Array,
        labels: jax.Array,
        num_classes: int,
        seed: int,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.images, self.labels = jnp.asarray(images, dtype), jnp.asarray(labels)
        self.num_classes, self.seed = num_classes, seed

    def measure_many(self, names: Iterable[str], arch: MBV2Arch, params: dict) -> dict:
        """Several measurements of `arch` with weights `params`, as host (NumPy) values;
        those of ON_THE_BATCH share one forward pass."""
        names = list(names)
        unknown = [name for name in names if name not in MEASUREMENTS]
        if unknown:
            raise ValueError(
                f"unknown measurement {unknown[0]!r}; known: {', '.join(MEASUREMENTS)}"
            )
        wanted = frozenset(names) & ON_THE_BATCH
        measured = {}
        if wanted:
            measured = jax.device_get(_on_the_batch(arch, wanted, params, self.images, self.labels))
        if "activations" in wanted:
            kernel, first_maps = measured["activations"]
            meco = sum(_min_channel_eigenvalue(m) for m in first_maps)
            measured["activations"] = np.asarray(kernel), float(meco)
        for name in set(names) - ON_THE_BATCH:
            measured[name] = getattr(self, "_" + name)(arch, params)
        return {name: measured[name] for name in names}

    def _half_batch_grads(self, arch: MBV2Arch, params: dict) -> dict:
        loss_grads = frozenset({"loss_grads"})
        halves = [
            _on_the_batch(arch, loss_grads, params, self.images[part], self.labels[part])
            for part in batch_halves(self.images.shape[0])
        ]
        return jax.tree.map(lambda *g: np.stack(g), *jax.device_get(halves))["loss_grads"]

    def _synflow_grads(self, arch: MBV2Arch, params: dict) -> dict:
        """In float64: the BN-free product of |weights| overflows float32."""
        with jax.enable_x64(True):
            absolute = jax.tree.map(lambda t: jnp.abs(jnp.asarray(t, jnp.float64)), params)
            ones = jnp.ones((1, *self.images.shape[1:]), jnp.float64)
            return jax.device_get(_synflow_grads(arch, absolute, ones))

    def _zen(self, arch: MBV2Arch, params: dict) -> tuple[float, float]:
        """E ||f(x) - f(x + 0.01 eps)||_1 of the pre-pooling features and the sum over the
        BatchNorms of log sqrt(mean batch variance), on Gaussian weights and images."""
        gaussian = zen_params(arch, self.seed, self.num_classes)
        x, x_mixed = zen_inputs(arch, self.seed, self.images.shape[0])
        delta, log_std = _zen_terms(arch, gaussian, x, x_mixed)
        return float(delta), float(log_std)
