"""BatchNorm with running statistics, for training the spaces' networks.

The scoring networks normalise every batch with its own statistics and keep nothing: that is
what the proxies measure (`wrcor_jax.layers.batch_norm`). A trained network also needs the
running averages that evaluation normalises with. `NormMode` names the three behaviours and
`running_batch_norm` gives them to a linen module, whose `batch_stats` collection holds the
averages (PyTorch's momentum 0.1, i.e. Flax's 0.9; the variance averaged unbiased, as torch
does).
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from wrcor_jax.layers import batch_norm

NormMode = Literal["batch", "train", "eval"]
"""`batch`: batch statistics, nothing kept (the scoring networks); `train`: batch statistics
and the running averages updated; `eval`: the running averages."""

MOMENTUM = 0.9


def running_batch_norm(
    module: nn.Module,
    name: str,
    y: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mode: NormMode,
    eps: float,
) -> jax.Array:
    """BatchNorm of y (NHWC) whose running averages are the variable `name` of `module`'s
    `batch_stats` ({mean, var}, float32). Call it from `module`'s compact method."""
    if mode == "batch":
        return batch_norm(y, scale, bias, eps)
    channels = y.shape[-1]
    stats = module.variable(
        "batch_stats",
        name,
        lambda: {"mean": jnp.zeros(channels, jnp.float32), "var": jnp.ones(channels, jnp.float32)},
    )
    if mode == "eval":
        mean, var = (jnp.asarray(v, y.dtype) for v in (stats.value["mean"], stats.value["var"]))
        return (y - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    if not module.is_initializing():
        axes = tuple(range(y.ndim - 1))
        y32 = jnp.asarray(y, jnp.float32)
        mean = jnp.mean(y32, axis=axes)
        count = y.size // channels
        var = jnp.mean(jnp.square(y32 - mean), axis=axes) * (count / max(count - 1, 1))
        stats.value = jax.tree.map(
            lambda old, new: MOMENTUM * old + (1 - MOMENTUM) * new,
            stats.value,
            {"mean": mean, "var": var},
        )
    return batch_norm(y, scale, bias, eps)
