"""Fast one-at-a-time NB201 responses: compiled pieces composed at run time.

XLA:CPU runs a conv's backward inside `lax.switch` ~8x slower than outside it, and vmap over
architectures runs every candidate op (FINDINGS.md). So the sequential engine compiles each
kind of piece once per shape (a conv op's forward, its explicit backward, the pool, the
reduction cell, the head with the loss) and lets Python compose them per architecture: no
conditional inside compiled code and no work for `none` edges, yet the compile count is fixed
for the whole space (about 30 executables, whatever the number of architectures).

jacob_cov's input Jacobian (d sum(logits) / d images) comes from the same forward pass: its
cotangent rides along the loss's as a stack of two through the same backward pieces (a
batch of two for each conv's data gradient), and only the loss's half adds correlation terms.

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


def _pullback(fn: Callable, primal: jax.Array, cotangent: jax.Array) -> jax.Array:
    """The vjp of `fn` at `primal` applied to `cotangent`, or to each of a stack of
    cotangents (a leading axis of 2: the loss's, then the summed logits')."""
    out, vjp = jax.vjp(fn, primal)
    if cotangent.ndim == out.ndim:
        return vjp(cotangent)[0]
    return jax.vmap(lambda c: vjp(c)[0])(cotangent)


def _loss_part(cotangent: jax.Array) -> jax.Array:
    """The loss's cotangent of a possibly stacked one: the only one whose responses count."""
    return cotangent[0] if cotangent.ndim == 5 else cotangent


def _conv_op_backward(
    w: dict, x: jax.Array, y: jax.Array, dz: jax.Array, block: BlockSums, stride: int = 1
) -> tuple[jax.Array, BlockSums]:
    """Backward of ReLU-conv-BN given its input x and conv output y; data gradient only.

    Adds the gradient at the BN input (`bn_grad`) and at the ReLU input (`act_grad`).
    """
    dy = _pullback(lambda t: batch_norm(t, w["scale"], w["bias"]), y, dz)
    dr = _pullback(lambda r: conv2d(r, w["kernel"], stride), x, dy)
    dx = jnp.where(x > 0, dr, 0.0)
    block = add_term(block, "bn_grad", _loss_part(dy))
    return dx, add_term(block, "act_grad", _loss_part(dx))


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
    return dx + _pullback(shortcut, x, dout), block


def _head(
    w: dict, h: jax.Array, labels: jax.Array, block: BlockSums, jacobian: bool = False
) -> tuple[jax.Array, jax.Array, BlockSums]:
    """BN, ReLU, pool, classifier and the loss, forward and backward in one piece; with
    `jacobian` the cotangent returned is stacked: the loss's, then the summed logits'."""
    bn = lambda t: batch_norm(t, w["bn"]["scale"], w["bn"]["bias"])  # noqa: E731
    pre, bn_vjp = jax.vjp(bn, h)

    def logits_from(pre_act: jax.Array) -> jax.Array:
        return classify(w["classifier"], jax.nn.relu(pre_act))

    def loss_from(pre_act: jax.Array) -> jax.Array:
        return cross_entropy(logits_from(pre_act), labels)

    loss, dpre = jax.value_and_grad(loss_from)(pre)
    block = add_term(add_term(block, "act", pre), "act_out", jax.nn.relu(pre))
    block = add_term(block, "act_grad", dpre)
    if not jacobian:
        return bn_vjp(dpre)[0], loss, block
    logits, logits_vjp = jax.vjp(logits_from, pre)
    stacked = jnp.stack([dpre, logits_vjp(jnp.ones_like(logits))[0]])
    return _pullback(bn, h, stacked), loss, block


def _stem_input_backward(w: dict, images: jax.Array, dh: jax.Array) -> jax.Array:
    """The input Jacobian's last step: the gradient at the images of the stacked stem
    cotangent's second half (WRCor has no site below the first cell)."""
    return _pullback(lambda x: stem(w, x)[0], images, dh[1])


def _pool_backward(cotangent: jax.Array) -> jax.Array:
    return (jax.vmap(avg_pool_3x3_transpose) if cotangent.ndim == 5 else avg_pool_3x3_transpose)(
        cotangent
    )


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
        self._pool_backward = wrap(_pool_backward)
        self._add_act = wrap(_add_act)
        self._reduction_forward = wrap(_reduction_forward)
        self._reduction_backward = wrap(_reduction_backward)
        self._head = wrap(_head, static_argnames="jacobian")
        self._stem_input_backward = wrap(_stem_input_backward)
        self._add = wrap(jnp.add)
        self._static: dict[tuple[tuple[int, ...], bool], Callable] = {}

    def compiled_executables(self) -> int:
        """Executables compiled so far by this engine's pieces (or per-arch programs)."""
        if self.static_per_arch:
            return sum(f._cache_size() for f in self._static.values())
        pieces = (
            self._stem, self._add, self._conv_forward, self._conv_backward, self._pool_forward,
            self._pool_backward, self._add_act, self._reduction_forward,
            self._reduction_backward, self._head, self._stem_input_backward,
        )  # fmt: skip
        return sum(f._cache_size() for f in pieces)

    def site_sums(
        self, ops: np.ndarray, params: dict, images: jax.Array, labels: jax.Array
    ) -> SiteSums:
        """Reduced responses of one architecture (params: the supernet tree, on device)."""
        return self.measure(ops, params, images, labels)["site_sums"]

    def measure(
        self,
        ops: np.ndarray,
        params: dict,
        images: jax.Array,
        labels: jax.Array,
        input_jacobian: bool = False,
    ) -> dict:
        """`site_sums` of one architecture and, with `input_jacobian`, d(sum of logits) /
        d(images) as NumPy (jacob_cov's input, as `nb201_measures` takes it), from one
        forward pass."""
        ops = tuple(int(op) for op in validate_ops(ops))
        if not self.static_per_arch:
            blocks, jacobian = self._blocks(ops, params, images, labels, input_jacobian)
        else:
            if (ops, input_jacobian) not in self._static:
                self._static[ops, input_jacobian] = jax.jit(
                    functools.partial(self._blocks, ops, jacobian=input_jacobian)
                )
            blocks, jacobian = self._static[ops, input_jacobian](params, images, labels)
        out = {"site_sums": SiteSums.from_blocks(blocks)}
        if input_jacobian:
            out["input_jacobian"] = np.asarray(jacobian)
        return out

    def _blocks(
        self,
        ops: tuple[int, ...],
        params: dict,
        images: jax.Array,
        labels: jax.Array,
        jacobian: bool = False,
    ) -> tuple[list[BlockSums], jax.Array | None]:
        """Every block's sums and, with `jacobian`, the input Jacobian (else None)."""
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
        dh, _, blocks[-1] = self._head(params["head"], h, labels, blocks[-1], jacobian=jacobian)
        for index in reversed(range(len(CELL_PLAN))):
            w = params[cell_name(index)]
            if CELL_PLAN[index][2]:
                dh, blocks[index] = self._reduction_backward(w, saved[index], dh, blocks[index])
            else:
                dh, blocks[index] = self._normal_backward(ops, w, saved[index], dh, blocks[index])
        if not jacobian:
            return blocks, None
        return blocks, self._stem_input_backward(params["stem"], images, dh)

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
