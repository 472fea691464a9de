"""Fast one-at-a-time NB201 responses: compiled pieces composed at run time.

XLA:CPU runs a conv's backward inside `lax.switch` ~8x slower than outside it, and vmap over
architectures runs every candidate op (FINDINGS.md). So the sequential engine compiles each
kind of piece once per shape (a conv op's forward, its explicit backward, the pool, the
reduction cell, the head with the loss) and lets Python compose them per architecture: no
conditional inside compiled code and no work for `none` edges, yet the compile count is fixed
for the whole space (about 30 executables, whatever the number of architectures).

Each piece reduces its responses to |corrcoef| sums on the spot (`wrcor_jax.responses`); the
backward pass is written out so no weight gradients are computed. The same composition traced
under one `jax.jit` with the architecture static is the "static-structure" baseline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.layers import (
    avg_pool_2x2,
    avg_pool_3x3,
    avg_pool_3x3_transpose,
    batch_norm,
    conv2d,
)
from wrcor_jax.responses import BlockSums, SiteSums, add_term, empty_block
from wrcor_jax.spaces.nb201 import (
    CELL_PLAN,
    CONV_OPS,
    EDGES,
    OPS,
    cell_name,
    edge_name,
    validate_ops,
)
from wrcor_jax.spaces.nb201_pieces import (
    classify,
    cross_entropy,
    reduction_cell,
    relu_conv_bn,
    stem,
)

NONE, SKIP, POOL = OPS.index("none"), OPS.index("skip_connect"), OPS.index("avg_pool_3x3")


def _conv_op_backward(
    w: dict, x: jax.Array, y: jax.Array, dz: jax.Array, block: BlockSums, stride: int = 1
) -> tuple[jax.Array, BlockSums]:
    """Backward of ReLU-conv-BN given its input x and conv output y; data gradient only.

    Adds the gradient at the BN input (`bn_grad`) and at the ReLU input (`act_grad`).
    """
    _, bn_vjp = jax.vjp(lambda t: batch_norm(t, w["scale"], w["bias"]), y)
    (dy,) = bn_vjp(dz)
    _, conv_vjp = jax.vjp(lambda r: conv2d(r, w["kernel"], stride), x)
    (dr,) = conv_vjp(dy)
    dx = jnp.where(x > 0, dr, 0.0)
    block = add_term(block, "bn_grad", dy)
    return dx, add_term(block, "act_grad", dx)


def _reduction_forward(w: dict, x: jax.Array, block: BlockSums) -> tuple[jax.Array, tuple]:
    out, (a_out, a_y, _, b_y) = reduction_cell(w, x)
    block = add_term(add_term(block, "act", x), "act", a_out)
    return out, ((x, a_y, a_out, b_y), block)


def _reduction_backward(
    w: dict, saved: tuple, dout: jax.Array, block: BlockSums
) -> tuple[jax.Array, BlockSums]:
    x, a_y, a_out, b_y = saved
    da, block = _conv_op_backward(w["conv_b"], a_out, b_y, dout, block)
    dx, block = _conv_op_backward(w["conv_a"], x, a_y, da, block, stride=2)
    shortcut = lambda t: conv2d(avg_pool_2x2(t), w["shortcut"]["kernel"])  # noqa: E731
    return dx + jax.vjp(shortcut, x)[1](dout)[0], block


def _head(
    w: dict, h: jax.Array, labels: jax.Array, block: BlockSums
) -> tuple[jax.Array, jax.Array, BlockSums]:
    """BN, ReLU, pool, classifier and the loss, forward and backward in one piece."""
    pre, bn_vjp = jax.vjp(lambda t: batch_norm(t, w["bn"]["scale"], w["bn"]["bias"]), h)

    def loss_from(pre_act: jax.Array) -> jax.Array:
        return cross_entropy(classify(w["classifier"], jax.nn.relu(pre_act)), labels)

    loss, dpre = jax.value_and_grad(loss_from)(pre)
    block = add_term(add_term(block, "act", pre), "act_out", jax.nn.relu(pre))
    block = add_term(block, "act_grad", dpre)
    return bn_vjp(dpre)[0], loss, block


def _add_act(block: BlockSums, x: jax.Array, multiplicity: jax.Array) -> BlockSums:
    return add_term(block, "act", x, multiplicity)


class NB201Engine:
    """Site sums of NB201 architectures from compiled pieces composed in Python.

    `static_per_arch=True` instead traces the whole composition under one `jax.jit` per
    architecture (the static-structure baseline: best fusion, one compile per arch).
    """

    def __init__(self, static_per_arch: bool = False):
        self.static_per_arch = static_per_arch
        wrap = (lambda f, **_: f) if static_per_arch else jax.jit
        self._stem = wrap(stem)
        self._conv_forward = wrap(relu_conv_bn, static_argnames="stride")
        self._conv_backward = wrap(_conv_op_backward, static_argnames="stride")
        self._pool_forward = wrap(avg_pool_3x3)
        self._pool_backward = wrap(avg_pool_3x3_transpose)
        self._add_act = wrap(_add_act)
        self._reduction_forward = wrap(_reduction_forward)
        self._reduction_backward = wrap(_reduction_backward)
        self._head = wrap(_head)
        self._add = wrap(jnp.add)
        self._static: dict[tuple[int, ...], Callable] = {}

    def compiled_executables(self) -> int:
        """Executables compiled so far by this engine's pieces (or per-arch programs)."""
        if self.static_per_arch:
            return sum(f._cache_size() for f in self._static.values())
        pieces = (
            self._stem, self._add, self._conv_forward, self._conv_backward, self._pool_forward,
            self._pool_backward, self._add_act, self._reduction_forward,
            self._reduction_backward, self._head,
        )  # fmt: skip
        return sum(f._cache_size() for f in pieces)

    def site_sums(
        self, ops: np.ndarray, params: dict, images: jax.Array, labels: jax.Array
    ) -> SiteSums:
        """Reduced responses of one architecture (params: the supernet tree, on device)."""
        ops = tuple(int(op) for op in validate_ops(ops))
        if not self.static_per_arch:
            return SiteSums.from_blocks(self._blocks(ops, params, images, labels))
        if ops not in self._static:
            self._static[ops] = jax.jit(functools.partial(self._blocks, ops))
        return SiteSums.from_blocks(self._static[ops](params, images, labels))

    def _blocks(
        self, ops: tuple[int, ...], params: dict, images: jax.Array, labels: jax.Array
    ) -> list[BlockSums]:
        blocks = [empty_block(images.shape[0]) for _ in range(len(CELL_PLAN) + 1)]
        h, _ = self._stem(params["stem"], images)
        saved = []
        for index, (_, _, reduction) in enumerate(CELL_PLAN):
            w = params[cell_name(index)]
            if reduction:
                h, (cell_saved, blocks[index]) = self._reduction_forward(w, h, blocks[index])
            else:
                h, cell_saved, blocks[index] = self._normal_forward(ops, w, h, blocks[index])
            saved.append(cell_saved)
        dh, _, blocks[-1] = self._head(params["head"], h, labels, blocks[-1])
        for index in reversed(range(len(CELL_PLAN))):
            w = params[cell_name(index)]
            if CELL_PLAN[index][2]:
                dh, blocks[index] = self._reduction_backward(w, saved[index], dh, blocks[index])
            else:
                dh, blocks[index] = self._normal_backward(ops, w, saved[index], dh, blocks[index])
        return blocks

    def _normal_forward(
        self, ops: tuple[int, ...], w: dict, x: jax.Array, block: BlockSums
    ) -> tuple[jax.Array, tuple, BlockSums]:
        """A normal cell. `none` edges cost nothing; a node fed only by `none` edges is zeros;
        each node's ReLU-input term is computed once and counted once per conv op reading it."""
        zeros = x * 0.0  # not zeros_like: XLA would constant-fold pools of a constant
        nodes: list[jax.Array | None] = [x, None, None, None]
        conv_saved: dict[int, jax.Array] = {}
        for e, (to_node, from_node) in enumerate(EDGES):
            op, source = ops[e], zeros if nodes[from_node] is None else nodes[from_node]
            if op == NONE:
                continue
            if op == SKIP:
                out = source
            elif op == POOL:
                out = self._pool_forward(source)
            else:
                out, conv_saved[e] = self._conv_forward(w[edge_name(e)][OPS[op]], source)
            nodes[to_node] = out if nodes[to_node] is None else self._add(nodes[to_node], out)
        for node in (0, 1, 2):
            readers = sum(ops[e] in CONV_OPS for e, (_, src) in enumerate(EDGES) if src == node)
            if readers and nodes[node] is not None:  # an all-zero node's term is skipped
                block = self._add_act(block, nodes[node], np.int32(readers))
        nodes = [zeros if node is None else node for node in nodes]
        return nodes[3], (nodes, conv_saved), block

    def _normal_backward(
        self, ops: tuple[int, ...], w: dict, saved: tuple, dout: jax.Array, block: BlockSums
    ) -> tuple[jax.Array, BlockSums]:
        nodes, conv_saved = saved
        grads: list[jax.Array | None] = [None, None, None, dout]
        for e in reversed(range(len(EDGES))):
            to_node, from_node = EDGES[e]
            op, upstream = ops[e], grads[to_node]
            if op == NONE or upstream is None:
                continue
            if op == SKIP:
                g = upstream
            elif op == POOL:
                g = self._pool_backward(upstream)
            else:
                g, block = self._conv_backward(
                    w[edge_name(e)][OPS[op]], nodes[from_node], conv_saved[e], upstream, block
                )
            grads[from_node] = g if grads[from_node] is None else self._add(grads[from_node], g)
        return (dout * 0.0 if grads[0] is None else grads[0]), block
