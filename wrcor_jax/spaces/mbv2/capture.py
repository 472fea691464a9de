"""MobileNetV2-space responses captured from the Flax network, reduced to `SiteSums`.

Every ReLU input of `MBV2Network` is sown (`intermediates/.../relu_in`) and perturbed
(`perturbations/.../relu_in`), so one `jax.grad` of the mean cross-entropy with respect to
zero perturbations gives the gradient at every ReLU input, next to the sown values. Each
response is reduced to its |corrcoef| where it is produced (`responses.add_term`) under the
top-level block named by its `block_BB` path:

- the SE's ReLU (`.../se/relu_in`, the only one the reference hooks, SPEC 3b): kinds `act`
  (its input) and `act_grad` (the gradient at its input),
- every other ReLU (a conv layer's, expand, depthwise, after the residual add): kinds
  `block_act` and `block_act_grad`,

so site sets `mbv2_reference` and `mbv2_allrelu` of `proxies.wrcor` both score one capture.

The architecture is static: each one traces and compiles its own program (one `jax.jit` per
architecture and batch shape). Bounding compilations across a search is the composed
engine's job (docs/mbv2_engine.md), not this module's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wrcor_jax.responses import SiteSums, add_term, empty_block, stack_blocks
from wrcor_jax.spaces.mbv2.arch import MBV2Arch
from wrcor_jax.spaces.mbv2.network import MBV2Network
from wrcor_jax.spaces.nb201_pieces import cross_entropy

SITE = "relu_in"


def site_kinds(path: tuple[str, ...]) -> tuple[int, str, str]:
    """(block, forward kind, backward kind) of the ReLU site at a `block_BB/.../relu_in` path."""
    block = int(path[0].removeprefix("block_"))
    return (
        (block, "act", "act_grad") if path[-2] == "se" else (block, "block_act", "block_act_grad")
    )


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


@functools.partial(jax.jit, static_argnames=("arch", "num_classes"))
def _stacked_site_sums(
    arch: MBV2Arch, params: dict, images: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    model = MBV2Network(arch, num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["perturbations"]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def loss(perturbations: dict) -> tuple[jax.Array, dict]:
        variables = {"params": params, "perturbations": perturbations}
        logits, state = model.apply(variables, images, mutable=["intermediates"])
        return cross_entropy(logits, labels), state["intermediates"]

    grads, values = jax.grad(loss, has_aux=True)(zeros)
    blocks = [empty_block(images.shape[0]) for _ in arch.blocks]
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        keys = _keys(path)
        if keys[-1] != SITE:
            continue
        block, forward, backward = site_kinds(keys)
        value = functools.reduce(lambda tree, key: tree[key], keys, values)[0]
        blocks[block] = add_term(add_term(blocks[block], forward, value), backward, grad)
    return stack_blocks(blocks)


def site_sums(
    arch: MBV2Arch, params: dict, images: jax.Array, labels: jax.Array, num_classes: int
) -> SiteSums:
    """Per-(block, kind) |corrcoef| sums of `arch` on one batch (NHWC images of any size: the
    network resizes them), in float32 on the device and float64 on the host."""
    stacked = _stacked_site_sums(
        arch, params, jnp.asarray(images, jnp.float32), jnp.asarray(labels), num_classes
    )
    return SiteSums.from_stacked(*jax.device_get(stacked))
