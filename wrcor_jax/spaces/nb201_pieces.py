"""The NB201 network's building blocks as pure functions, written once for the two engines
that compile them: `nb201_engine` (WRCor's responses) and `nb201_measures` (the other
proxies' measurements, which also need synflow's BatchNorm-free network)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wrcor_jax.layers import avg_pool_2x2, batch_norm, conv2d


def normalise(y: jax.Array, w: dict, use_bn: bool = True) -> jax.Array:
    """The BatchNorm after a conv, or the identity for synflow's BN-free network."""
    return batch_norm(y, w["scale"], w["bias"]) if use_bn else y


def stem(w: dict, images: jax.Array, use_bn: bool = True) -> tuple[jax.Array, jax.Array]:
    """Conv-BN on the images: the output and the conv output (the BatchNorm's input)."""
    y = conv2d(images, w["kernel"])
    return normalise(y, w, use_bn), y


def relu_conv_bn(
    w: dict, x: jax.Array, stride: int = 1, use_bn: bool = True
) -> tuple[jax.Array, jax.Array]:
    """A conv op (ReLU-conv-BN): the output and the conv output (the BatchNorm's input)."""
    y = conv2d(jax.nn.relu(x), w["kernel"], stride)
    return normalise(y, w, use_bn), y


def reduction_cell(
    w: dict, x: jax.Array, use_bn: bool = True
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """NB201's reduction cell (a ResNet basic block with an avg-pool + 1x1 conv shortcut):
    the output and (conv_a's output, its conv output, conv_b's output, its conv output)."""
    a, y_a = relu_conv_bn(w["conv_a"], x, stride=2, use_bn=use_bn)
    b, y_b = relu_conv_bn(w["conv_b"], a, use_bn=use_bn)
    return conv2d(avg_pool_2x2(x), w["shortcut"]["kernel"]) + b, (a, y_a, b, y_b)


def classify(w: dict, features: jax.Array) -> jax.Array:
    """Global average pool and the linear classifier: the logits."""
    return features.mean(axis=(1, 2)) @ w["kernel"] + w["bias"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch (the reference's loss)."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()
