"""The network a run trains, built from a space's text form: one interface for both spaces.

The scoring networks are reused as they are; only their BatchNorm changes mode (`norm`:
"train" updates running averages, "eval" uses them; `wrcor_jax.spaces.running_norm`).
Parameters start from PyTorch's default initialisation, drawn with NumPy as scoring does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.spaces import get_space, nb201
from wrcor_jax.spaces.mbv2 import arch as mbv2_arch
from wrcor_jax.spaces.mbv2 import network as mbv2_network
from wrcor_jax.spaces.running_norm import NormMode

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Network:
    """A space's network at a fixed architecture, as the trainer calls it."""

    space: str
    arch: Any
    """The space's value (mbv2: `MBV2Arch`; nb201: int32[6] op indices as a tuple)."""
    num_classes: int
    dtype: Any = jnp.float32

    def module(self, norm: NormMode) -> nn.Module:
        if self.space == "mbv2":
            return mbv2_network.MBV2Network(
                self.arch, self.num_classes, self.dtype, norm, mbv2_network.depthwise_conv2d_taps
            )
        return nb201.NB201Network(self.num_classes, norm)

    def _inputs(self, images: jax.Array) -> tuple:
        return (images,) if self.space == "mbv2" else (images, jnp.asarray(self.arch, jnp.int32))

    def apply_train(self, variables: dict, images: jax.Array) -> tuple[jax.Array, dict]:
        """Float32 logits with the batch's BatchNorm statistics, and the updated averages."""
        logits, updates = self.module("train").apply(
            variables, *self._inputs(images), mutable=["batch_stats"]
        )
        return jnp.asarray(logits, jnp.float32), updates["batch_stats"]

    def apply_eval(self, variables: dict, images: jax.Array) -> jax.Array:
        """Float32 logits with the running averages."""
        return jnp.asarray(self.module("eval").apply(variables, *self._inputs(images)), jnp.float32)

    def init_variables(self, seed: int, image_shape: tuple[int, ...]) -> dict:
        """`params` (PyTorch's default init, NumPy) and `batch_stats` (means 0, variances 1)."""
        if self.space == "mbv2":
            params = mbv2_network.init_params(self.arch, seed, self.num_classes)
        else:
            params = nb201.init_params(seed, self.num_classes)
        images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
        shapes = jax.eval_shape(
            self.module("train").init, jax.random.key(0), *self._inputs(images)
        )["batch_stats"]
        stats = jax.tree_util.tree_map_with_path(
            lambda path, leaf: np.full(leaf.shape, path[-1].key == "var", np.float32), shapes
        )
        return {"params": params, "batch_stats": stats}


def build_network(
    space: str, arch_text: str, num_classes: int, compute_dtype: str = "float32"
) -> Network:
    """The network of `arch_text` in `space`; `ValueError` (the space's `ArchError`) when the
    text is not an architecture of that space."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r}: expected one of {list(COMPUTE_DTYPES)}")
    arch = get_space(space).parse(arch_text)
    if space == "mbv2":
        return Network(space, arch, num_classes, COMPUTE_DTYPES[compute_dtype])
    if compute_dtype != "float32":
        raise ValueError("compute_dtype bfloat16 is implemented for the mbv2 network only")
    return Network(space, tuple(int(op) for op in arch), num_classes)


def with_resolution(space: str, arch_text: str, resolution: int) -> str:
    """An mbv2 architecture's text at another input resolution (nb201's has none)."""
    if space != "mbv2":
        return arch_text
    arch = mbv2_arch.parse(arch_text)
    return mbv2_arch.format_arch(dataclasses.replace(arch, resolution=resolution))


def arch_resolution(space: str, arch_text: str) -> int | None:
    """The input resolution an mbv2 architecture names (nb201: None)."""
    return mbv2_arch.parse(arch_text).resolution if space == "mbv2" else None
