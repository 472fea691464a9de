"""NB201 responses captured from the Flax network with the architecture as traced data.

`capture_intermediates`-style `sow` gives the ReLU inputs (and the final ReLU's output),
`perturb` the gradients at them and at each conv op's BatchNorm input, all in one
`jax.grad`. Because the ops are data, `jax.vmap` batches architectures into one program:
the path for accelerators, and an independent check of the composed engine.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from wrcor_jax.responses import add_term, empty_block, stack_blocks
from wrcor_jax.spaces.nb201 import CELL_PLAN, NUM_EDGES, OPS, NB201Network, cell_name, edge_name
from wrcor_jax.spaces.nb201_engine import cross_entropy

Site = tuple[int, str, jax.Array, jax.Array]
"""(block, kind, active, response): one hooked response of one architecture."""


@functools.cache
def _perturbation_shapes(num_classes: int, image_shape: tuple[int, ...]) -> dict:
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    ops = jax.ShapeDtypeStruct((NUM_EDGES,), jnp.int32)
    variables = jax.eval_shape(NB201Network(num_classes).init, jax.random.key(0), images, ops)
    return variables["perturbations"]


def capture_sites(
    params: dict, ops: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int
) -> list[Site]:
    """Every response site of the supernet, with whether `ops` uses it (SPEC 3a)."""
    model = NB201Network(num_classes)
    shapes = _perturbation_shapes(num_classes, tuple(images.shape))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def loss(perturbations: dict) -> tuple[jax.Array, dict]:
        variables = {"params": params, "perturbations": perturbations}
        logits, state = model.apply(variables, images, ops, mutable=["intermediates"])
        return cross_entropy(logits, labels), state["intermediates"]

    grads, values = jax.grad(loss, has_aux=True)(zeros)
    return list(_sites(values, grads, ops))


def _sites(values: dict, grads: dict, ops: jax.Array) -> Iterator[Site]:
    conv_ops = (OPS.index("nor_conv_1x1"), OPS.index("nor_conv_3x3"))
    for index, (_, _, reduction) in enumerate(CELL_PLAN):
        cell = cell_name(index)
        if reduction:
            ops_here = [(name, jnp.bool_(True)) for name in ("conv_a", "conv_b")]
        else:
            ops_here = [
                (edge_name(e), (ops[e] == conv_ops[0]) | (ops[e] == conv_ops[1]))
                for e in range(NUM_EDGES)
            ]
        for name, active in ops_here:
            yield index, "act", active, values[cell][name]["relu_in"][0]
            yield index, "act_grad", active, grads[cell][name]["relu_in"]
            yield index, "bn_grad", active, grads[cell][name]["bn_in"]
    final = len(CELL_PLAN)
    yield final, "act", jnp.bool_(True), values["head"]["relu_in"][0]
    yield final, "act_out", jnp.bool_(True), values["head"]["relu_out"][0]
    yield final, "act_grad", jnp.bool_(True), grads["head"]["relu_in"]


def captured_site_sums(
    params: dict, ops: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Stacked per-(block, kind) sums and counts of one architecture; vmap over `ops`."""
    blocks = [empty_block(images.shape[0]) for _ in range(len(CELL_PLAN) + 1)]
    for block, kind, active, response in capture_sites(params, ops, images, labels, num_classes):
        blocks[block] = add_term(blocks[block], kind, response, active=active)
    return stack_blocks(blocks)


@functools.cache
def vmapped_site_sums(num_classes: int):
    """jit(vmap(captured_site_sums)) over a leading axis of architectures (ops: (A, 6))."""
    fn = functools.partial(captured_site_sums, num_classes=num_classes)
    return jax.jit(jax.vmap(fn, in_axes=(None, 0, None, None)))
