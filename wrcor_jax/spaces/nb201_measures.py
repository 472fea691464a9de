"""Whole-network measurements of an NB201 architecture, read by the non-WRCor proxies.

Like `nb201_engine`, the network is composed per architecture in Python from compiled
pieces (stem, conv op, pool, reduction cell, head), each with compiled backwards that
return weight and input gradients, or the input gradient alone. XLA:CPU needed 4-10
minutes to compile one program of the whole traced-architecture Flax network; the pieces
compile in seconds, once per shape, and `none` edges cost nothing. Proxies reading the
same measurement share it (snip and grad_norm the loss gradients; naswot and meco one
forward pass).

Measurements (host values, NumPy; gradient trees hold the architecture's used weights):
- `loss_grads`: dL/dtheta of the mean cross-entropy on the batch (BN in training mode);
- `half_batch_grads`: the same on each half of the batch, stacked (ZiCo's two batches);
- `input_jacobian`: d(sum of logits)/d(images), one row per image (jacob_cov);
- `synflow_grads`: dR/dtheta at |theta| in float64 without BatchNorm, R = sum of the logits
  for one all-ones image (synflow);
- `activations`: the NASWOT binary-code kernel and the MeCo sum from one forward pass;
- `zen`: Zen-score's feature perturbation and BN scaling terms on Gaussian inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.layers import avg_pool_3x3
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
    normalise,
    reduction_cell,
    relu_conv_bn,
    stem,
)

MEASUREMENTS = (
    "loss_grads",
    "half_batch_grads",
    "input_jacobian",
    "synflow_grads",
    "activations",
    "zen",
)
NONE, SKIP, POOL = OPS.index("none"), OPS.index("skip_connect"), OPS.index("avg_pool_3x3")
HIGHEST = jax.lax.Precision.HIGHEST


def _pool(w: dict, x: jax.Array, use_bn: bool) -> tuple[jax.Array, tuple]:
    return avg_pool_3x3(x), ()


def _head(w: dict, h: jax.Array, use_bn: bool) -> tuple[jax.Array, jax.Array]:
    post = jax.nn.relu(normalise(h, w["bn"], use_bn))
    return classify(w["classifier"], post), post


class _Piece:
    """A compiled forward (output, values kept for the proxies) and two compiled backwards
    of the output: to the weights and the input, and to the input alone (the input Jacobian
    needs no weight gradients; skipping them halved its time, forward included, measured
    side by side at batch 64). Each recomputes the small forward it needs."""

    def __init__(self, fn: Callable):
        self.forward = jax.jit(fn, static_argnames="use_bn")

        def backward(w: dict, x: jax.Array, cotangent: jax.Array, use_bn: bool):
            return jax.vjp(lambda w, x: fn(w, x, use_bn=use_bn)[0], w, x)[1](cotangent)

        def input_backward(w: dict, x: jax.Array, cotangent: jax.Array, use_bn: bool):
            return jax.vjp(lambda x: fn(w, x, use_bn=use_bn)[0], x)[1](cotangent)[0]

        self.backward = jax.jit(backward, static_argnames="use_bn")
        self.input_backward = jax.jit(input_backward, static_argnames="use_bn")


PIECES = {
    "stem": _Piece(stem),
    "conv": _Piece(relu_conv_bn),
    "pool": _Piece(_pool),
    "reduction": _Piece(reduction_cell),
    "head": _Piece(_head),
}


@dataclasses.dataclass
class _Call:
    """One piece applied in the forward pass: enough to run its backward."""

    piece: str
    w: dict
    x: jax.Array
    grad_path: tuple[str, ...]  # where its weight gradient goes in the supernet tree
    source: int | None = None  # normal cells: the node it reads
    target: int | None = None  # normal cells: the node it writes


@dataclasses.dataclass
class _Forward:
    """A forward pass: logits, the calls to differentiate, and the values proxies read."""

    logits: jax.Array
    stem: _Call
    cells: list[list[_Call] | _Call]
    head: _Call
    conv_inputs: list[jax.Array]  # one entry per conv op reading it (reference ReLU sites)
    bn_inputs: list[jax.Array]
    feature_maps: list[jax.Array]
    final_relu_out: jax.Array


def _forward(ops: tuple[int, ...], params: dict, images: jax.Array, use_bn: bool) -> _Forward:
    stem_call = _Call("stem", params["stem"], images, ("stem",))
    h, y = PIECES["stem"].forward(stem_call.w, images, use_bn=use_bn)
    conv_inputs, bn_inputs, maps, cells = [], [y], [h], []
    for index, (_, _, reduction) in enumerate(CELL_PLAN):
        w, name = params[cell_name(index)], cell_name(index)
        if reduction:
            cells.append(_Call("reduction", w, h, (name,)))
            x = h
            h, (a, y_a, b, y_b) = PIECES["reduction"].forward(w, x, use_bn=use_bn)
            conv_inputs += [x, a]
            bn_inputs += [y_a, y_b]
            maps += [a, b, h]
            continue
        zeros = h * 0.0
        nodes: list[jax.Array | None] = [h, None, None, None]
        calls = []
        for e, (to_node, from_node) in enumerate(EDGES):
            op, x = ops[e], zeros if nodes[from_node] is None else nodes[from_node]
            if op == NONE:
                continue
            if op == SKIP:
                out = x
                calls.append(_Call("skip", {}, x, (), from_node, to_node))
            elif op == POOL:
                out, _ = PIECES["pool"].forward({}, x, use_bn=use_bn)
                calls.append(_Call("pool", {}, x, (), from_node, to_node))
            else:
                edge_w = w[edge_name(e)][OPS[op]]
                out, y = PIECES["conv"].forward(edge_w, x, use_bn=use_bn)
                path = (name, edge_name(e), OPS[op])
                calls.append(_Call("conv", edge_w, x, path, from_node, to_node))
                conv_inputs.append(x)
                bn_inputs.append(y)
            maps.append(out)
            nodes[to_node] = out if nodes[to_node] is None else nodes[to_node] + out
        h = zeros if nodes[3] is None else nodes[3]
        maps.append(h)
        cells.append(calls)
    head = _Call("head", params["head"], h, ("head",))
    logits, post = PIECES["head"].forward(head.w, h, use_bn=use_bn)
    bn_inputs.append(h)
    maps.append(post)
    return _Forward(logits, stem_call, cells, head, conv_inputs, bn_inputs, maps, post)


def _set(tree: dict, path: tuple[str, ...], value: dict) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _backward(
    forward: _Forward, dlogits: jax.Array, use_bn: bool, weight_grads: bool = True
) -> tuple[dict, jax.Array]:
    """Weight gradients (the used-weights tree; empty unless `weight_grads`) and the
    gradient at the images."""
    grads: dict = {}

    def through(call: _Call, cotangent: jax.Array) -> jax.Array:
        piece = PIECES[call.piece]
        if not weight_grads:
            return piece.input_backward(call.w, call.x, cotangent, use_bn)
        dw, dx = piece.backward(call.w, call.x, cotangent, use_bn)
        if call.grad_path:
            _set(grads, call.grad_path, dw)
        return dx

    dh = through(forward.head, dlogits)
    for cell in reversed(forward.cells):
        if isinstance(cell, _Call):
            dh = through(cell, dh)
            continue
        node_grads: list[jax.Array | None] = [None, None, None, dh]
        for call in reversed(cell):
            upstream = node_grads[call.target]
            if upstream is None:
                continue
            dx = upstream if call.piece == "skip" else through(call, upstream)
            previous = node_grads[call.source]
            node_grads[call.source] = dx if previous is None else previous + dx
        dh = dh * 0.0 if node_grads[0] is None else node_grads[0]
    return grads, through(forward.stem, dh)


def _fill_unreached(grads: dict, params: dict, ops: tuple[int, ...]) -> dict:
    """Zero gradients for used weights the loss never reached (an op writing into a node
    nothing reads), so `used_params` finds every used weight."""
    for index, (_, _, reduction) in enumerate(CELL_PLAN):
        if reduction:
            continue
        cell = grads.setdefault(cell_name(index), {})
        for e, op in enumerate(ops):
            if op in CONV_OPS and OPS[op] not in cell.get(edge_name(e), {}):
                w = params[cell_name(index)][edge_name(e)][OPS[op]]
                zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), w)
                _set(cell, (edge_name(e), OPS[op]), zeros)
    return grads


@jax.jit
def _loss_cotangent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jax.grad(cross_entropy)(logits, labels)


@jax.jit
def _hamming_kernel(x: jax.Array) -> jax.Array:
    """c c^T + (1-c)(1-c)^T for the binary codes c = (x > 0), exact in int32."""
    c = (x.reshape(x.shape[0], -1) > 0).astype(jnp.float32)
    agree = jnp.dot(c, c.T, precision=HIGHEST) + jnp.dot(1 - c, (1 - c).T, precision=HIGHEST)
    return jnp.round(agree).astype(jnp.int32)


def _min_channel_eigenvalue(feature_map: np.ndarray) -> float:
    """MeCo's term: smallest eigenvalue of the channel-by-channel Pearson correlation of the
    first sample's feature map, in float64 on the host (small eigenvalues of near-singular
    correlations are where float32 loses digits); entries of zero-variance channels count
    0, as MeCo replaces NaN by 0."""
    x = np.asarray(feature_map, np.float64).reshape(-1, feature_map.shape[-1]).T
    centred = x - x.mean(axis=1, keepdims=True)
    gram = centred @ centred.T
    norms = np.sqrt(np.diagonal(gram))
    defined = (norms[:, None] > 0) & (norms[None, :] > 0)
    safe = np.where(norms > 0, norms, 1.0)
    corr = np.where(defined, np.clip(gram / safe[:, None] / safe[None, :], -1.0, 1.0), 0.0)
    return float(np.linalg.eigvalsh(corr)[0])


@jax.jit
def _log_mean_std(bn_input: jax.Array) -> jax.Array:
    """log sqrt(mean over channels of the batch variance at a BatchNorm's input)."""
    return log_sqrt_or_zero(jnp.var(bn_input, axis=(0, 1, 2)).mean())


def log_sqrt_or_zero(variance: jax.Array) -> jax.Array:
    """log sqrt(variance); 0 for a variance of 0 (an all-constant input, e.g. a conv reading
    a dead node), which carries no scale to measure."""
    return jnp.where(variance > 0, 0.5 * jnp.log(jnp.where(variance > 0, variance, 1.0)), 0.0)


@jax.jit
def _l1_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over samples of sum |a - b|."""
    return jnp.abs(a - b).sum(axis=(1, 2, 3)).mean()


class NB201Measurer:
    """Measurements of NB201 architectures on one batch with one supernet's weights.

    `zen_params` and `zen_inputs` are the Gaussian weights and inputs Zen-score uses
    instead of the scoring ones.
    """

    def __init__(
        self,
        params: dict,
        images: jax.Array,
        labels: jax.Array,
        zen_params: dict | None = None,
        zen_inputs: tuple[jax.Array, jax.Array] | None = None,
    ):
        self.params, self.images, self.labels = params, images, labels
        self.zen_params, self.zen_inputs = zen_params, zen_inputs

    def measure(self, name: str, ops: np.ndarray):
        """One measurement of one architecture, as host (NumPy) values."""
        return self.measure_many([name], ops)[name]

    def measure_many(self, names: Iterable[str], ops: np.ndarray) -> dict:
        """Several measurements of one architecture; those starting from the forward pass
        on the scoring batch (loss gradients, input Jacobian, activations) share it."""
        unknown = [name for name in names if name not in MEASUREMENTS]
        if unknown:
            raise ValueError(
                f"unknown measurement {unknown[0]!r}; known: {', '.join(MEASUREMENTS)}"
            )
        arch = tuple(int(op) for op in validate_ops(ops))
        forward = functools.cache(lambda: _forward(arch, self.params, self.images, use_bn=True))
        return {name: getattr(self, "_" + name)(arch, forward) for name in names}

    @staticmethod
    def _grads(forward: _Forward, labels: jax.Array, params: dict, ops: tuple) -> dict:
        grads, _ = _backward(forward, _loss_cotangent(forward.logits, labels), use_bn=True)
        return jax.device_get(_fill_unreached(grads, params, ops))

    def _loss_grads(self, ops: tuple, forward: Callable[[], _Forward]) -> dict:
        return self._grads(forward(), self.labels, self.params, ops)

    def _half_batch_grads(self, ops: tuple, _: object) -> dict:
        n = self.images.shape[0]
        if n % 2:
            raise ValueError("ZiCo splits the batch in two halves: use an even batch size")
        halves = [
            self._grads(
                _forward(ops, self.params, self.images[part], use_bn=True),
                self.labels[part],
                self.params,
                ops,
            )
            for part in (slice(0, n // 2), slice(n // 2, n))
        ]
        return jax.tree.map(lambda *g: np.stack(g), *halves)

    def _input_jacobian(self, ops: tuple, forward: Callable[[], _Forward]) -> np.ndarray:
        logits = forward().logits
        _, dimages = _backward(forward(), jnp.ones_like(logits), use_bn=True, weight_grads=False)
        return np.asarray(dimages)

    @functools.cached_property
    def _synflow_params(self) -> dict:
        """|weights| in float64, made once on the host: per leaf on the device, each leaf
        shape would compile its own conversion and abs."""
        with jax.enable_x64(True):
            return jax.device_put(
                jax.tree.map(lambda t: np.abs(np.asarray(t, np.float64)), self.params)
            )

    def _synflow_grads(self, ops: tuple, _: object) -> dict:
        """In float64: the BN-free product of |weights| overflows float32."""
        with jax.enable_x64(True):
            params = self._synflow_params
            ones = np.ones((1, *self.images.shape[1:]), np.float64)
            forward = _forward(ops, params, ones, use_bn=False)
            grads, _ = _backward(forward, np.ones(forward.logits.shape), use_bn=False)
            return jax.device_get(_fill_unreached(grads, params, ops))

    def _activations(self, ops: tuple, forward: Callable[[], _Forward]) -> tuple[np.ndarray, float]:
        """NASWOT kernel over the reference's forward sites (each conv-op input twice, the
        final ReLU's output once) and the MeCo sum over the feature maps (stem, every edge's
        op, reduction convs, every cell, final BN-ReLU), from one forward pass."""
        values = forward()
        kernel = _hamming_kernel(values.final_relu_out)
        for x in values.conv_inputs:
            kernel = kernel + 2 * _hamming_kernel(x)
        first_samples = jax.device_get([m[0] for m in values.feature_maps])
        meco = sum(_min_channel_eigenvalue(m) for m in first_samples)
        return np.asarray(kernel), float(meco)

    def _zen(self, ops: tuple, _: object) -> tuple[float, float]:
        """Zen-score's two terms: E ||f(x) - f(x + 0.01 eps)||_1 of the pre-pooling
        features, and the sum over the used BatchNorms of log sqrt(mean batch variance)."""
        if self.zen_params is None or self.zen_inputs is None:
            raise ValueError("zen needs Gaussian weights and inputs (zen_params, zen_inputs)")
        clean, mixed = (_forward(ops, self.zen_params, x, True) for x in self.zen_inputs)
        delta = _l1_distance(clean.final_relu_out, mixed.final_relu_out)
        return float(delta), float(sum(_log_mean_std(y) for y in clean.bn_inputs))
