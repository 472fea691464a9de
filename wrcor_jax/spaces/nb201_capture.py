"""NB201 responses captured from the Flax network with the architecture as traced data.

`capture_intermediates`-style `sow` gives the ReLU inputs (and the final ReLU's output),
`perturb` the gradients at them and at each conv op's BatchNorm input, all in one
`jax.grad`. Because the ops are data, `jax.vmap` batches architectures into one program:
the path for accelerators, and an independent check of the composed engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from wrcor_jax.responses import add_term, empty_block, stack_blocks
from wrcor_jax.spaces.nb201 import CELL_PLAN, NUM_EDGES, OPS, NB201Network, cell_name, edge_name
from wrcor_jax.spaces.nb201_pieces import cross_entropy


@functools.cache
def _perturbation_shapes(num_classes: int, image_shape: tuple[int, ...]) -> dict:
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    ops = jax.ShapeDtypeStruct((NUM_EDGES,), jnp.int32)
    variables = jax.eval_shape(NB201Network(num_classes).init, jax.random.key(0), images, ops)
    return variables["perturbations"]


Getter = Callable[[dict, dict], jax.Array]


@functools.cache
def _site_specs() -> tuple[tuple[int, str, int | None, Getter], ...]:
    """(block, kind, edge whose op decides the site is used or None, response getter)."""
    specs = []

    def conv_sites(block: int, path: tuple[str, str], edge: int | None) -> None:
        cell, name = path
        specs.extend(
            [
                (block, "act", edge, lambda v, g: v[cell][name]["relu_in"][0]),
                (block, "act_grad", edge, lambda v, g: g[cell][name]["relu_in"]),
                (block, "bn_grad", edge, lambda v, g: g[cell][name]["bn_in"]),
            ]
        )

    for index, (_, _, reduction) in enumerate(CELL_PLAN):
        if reduction:
            for name in ("conv_a", "conv_b"):
                conv_sites(index, (cell_name(index), name), None)
        else:
            for e in range(NUM_EDGES):
                conv_sites(index, (cell_name(index), edge_name(e)), e)
    final = len(CELL_PLAN)
    specs.extend(
        [
            (final, "act", None, lambda v, g: v["head"]["relu_in"][0]),
            (final, "act_out", None, lambda v, g: v["head"]["relu_out"][0]),
            (final, "act_grad", None, lambda v, g: g["head"]["relu_in"]),
        ]
    )
    return tuple(specs)


def site_keys() -> list[tuple[int, str]]:
    """(block, kind) of every supernet site, in the order `capture_sites` returns them."""
    return [(block, kind) for block, kind, _, _ in _site_specs()]


def capture_sites(
    params: dict, ops: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int
) -> list[tuple[jax.Array, jax.Array]]:
    """(used by `ops`?, response) for every site of `site_keys()` (SPEC 3a)."""
    model = NB201Network(num_classes)
    shapes = _perturbation_shapes(num_classes, tuple(images.shape))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def loss(perturbations: dict) -> tuple[jax.Array, dict]:
        variables = {"params": params, "perturbations": perturbations}
        logits, state = model.apply(variables, images, ops, mutable=["intermediates"])
        return cross_entropy(logits, labels), state["intermediates"]

    grads, values = jax.grad(loss, has_aux=True)(zeros)
    conv = (OPS.index("nor_conv_1x1"), OPS.index("nor_conv_3x3"))
    return [
        (
            jnp.bool_(True) if edge is None else (ops[edge] == conv[0]) | (ops[edge] == conv[1]),
            getter(values, grads),
        )
        for _, _, edge, getter in _site_specs()
    ]


def captured_site_sums(
    params: dict, ops: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Stacked per-(block, kind) sums and counts of one architecture; vmap over `ops`."""
    blocks = [empty_block(images.shape[0]) for _ in range(len(CELL_PLAN) + 1)]
    sites = capture_sites(params, ops, images, labels, num_classes)
    for (block, kind), (active, response) in zip(site_keys(), sites, strict=True):
        blocks[block] = add_term(blocks[block], kind, response, active=active)
    return stack_blocks(blocks)


@functools.cache
def vmapped_site_sums(num_classes: int):
    """jit(vmap(captured_site_sums)) over a leading axis of architectures (ops: (A, 6))."""
    fn = functools.partial(captured_site_sums, num_classes=num_classes)
    return jax.jit(jax.vmap(fn, in_axes=(None, 0, None, None)))
