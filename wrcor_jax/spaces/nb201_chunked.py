"""NB201 site sums of many architectures in one program that runs each conv op only where used.

All architectures share the supernet weights, so in a chunk of A architectures an edge's
3x3 conv needs to run only for the architectures that chose it. A host-side planner packs
architectures into chunks in which, on every edge, at most `conv3x3` of them use the 3x3
conv and at most `conv1x1` the 1x1 conv (`ChunkShape`); the program gathers those
architectures' edge inputs into slots, runs one batched conv per edge and op and scatters
the results back (skip and pool stay cheap selects over the chunk). The executed FLOPs are
then ~(9 K3 + K1) conv units per edge instead of the 10 A of `nb201_capture`'s vmapped
network, where every candidate op runs for every architecture.

The gradient sites are probes (`_probe`): identities whose backward reduces the cotangent
to its |corrcoef| on the spot and returns it as the gradient of a zero accumulator, so one
`jax.grad` over the accumulators yields every act_grad and bn_grad sum; the forward sites
are reduced where they are produced. The 5 normal cells of a stage run as one `lax.scan`
over their stacked weights, so the program holds 3 cells, not 15: compiling it is ~5x less
work. The sums equal `NB201Engine`'s (tests/test_chunked_engine.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wrcor_jax.layers import avg_pool_2x2, avg_pool_3x3, batch_norm, conv2d
from wrcor_jax.responses import KINDS, SiteSums, abs_corrcoef
from wrcor_jax.spaces.nb201 import CELL_PLAN, EDGES, NUM_EDGES, OPS, cell_name, edge_name
from wrcor_jax.spaces.nb201_pieces import classify, cross_entropy, stem

SKIP, CONV1, CONV3, POOL = (OPS.index(name) for name in OPS[1:])
NUM_BLOCKS = len(CELL_PLAN) + 1  # 17 cells and the final BN-ReLU
GRAD_KINDS = ("act_grad", "bn_grad")
# Runs of normal cells (first index, length) between the two reduction cells.
STAGES = ((0, 5), (6, 5), (12, 5))


@dataclasses.dataclass(frozen=True)
class ChunkShape:
    """The shape of one compiled program: architectures per chunk and, per edge, the most
    of them that may use the 3x3 conv (`conv3x3`) and the 1x1 conv (`conv1x1`)."""

    archs: int
    conv3x3: int
    conv1x1: int

    def __post_init__(self):
        if not (1 <= self.conv3x3 <= self.archs and 1 <= self.conv1x1 <= self.archs):
            raise ValueError(f"{self}: slots per conv op must lie in 1..archs")

    @classmethod
    def for_archs(cls, archs: int, share: float = 0.25) -> ChunkShape:
        """Slots for `share` of the chunk per conv op. A uniform random architecture uses
        each conv op on an edge with probability 0.2, and with 0.25 `plan_chunks` still
        fills 98-100% of the chunks' places (random sets of 1,000, the whole space; chunks
        of 8 to 256) while running 9 x 0.25 + 0.25 = 2.5 conv units per edge and
        architecture, where the average need is 9 x 0.2 + 0.2 = 2."""
        slots = max(1, int(np.ceil(share * archs)))
        return cls(archs, slots, slots)


# Device memory the program needs per architecture and image of the batch: XLA:CPU's temp
# buffers at batch 64 grew from 3.7 GB for chunks of 8 archs to 5.2 GB for 16 (~3 MB per
# arch and image); the budget below leaves room for the rest and for another backend.
BYTES_PER_ARCH_IMAGE = 3.2e6
CPU_CHUNK = 8  # on CPU larger chunks only hold more memory: the cores are busy at 8


def chunk_shape_for(device: jax.Device, batch_size: int, budget: float = 0.5) -> ChunkShape:
    """The chunk for `device`: as many architectures (a multiple of 8, at most 4096) as fit
    in `budget` of its free memory, where it reports memory (GPU, TPU); `CPU_CHUNK` else."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return ChunkShape.for_archs(CPU_CHUNK)
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    archs = int(budget * free / (BYTES_PER_ARCH_IMAGE * batch_size)) // 8 * 8
    return ChunkShape.for_archs(min(max(archs, 8), 4096))


def plan_chunks(ops: np.ndarray, shape: ChunkShape) -> list[np.ndarray]:
    """Indices into `ops` (n, 6), one array per chunk, each within `shape`'s capacities.

    First fit, architectures with the most conv ops first: each goes into the first open
    chunk with room on all its edges, or opens a new one; a chunk closes when full.
    """
    uses = np.stack([ops == CONV3, ops == CONV1], axis=1).astype(np.int32)  # (n, 2, 6)
    capacity = np.array([shape.conv3x3, shape.conv1x1], np.int32)[:, None]
    counts = np.zeros((0, 2, NUM_EDGES), np.int32)
    members: list[list[int]] = []
    closed: list[np.ndarray] = []
    for i in np.argsort(-uses.sum(axis=(1, 2)), kind="stable"):
        fits = np.flatnonzero(np.all(counts + uses[i] <= capacity, axis=(1, 2)))
        if fits.size:
            j = fits[0]
        else:
            j = len(members)
            counts = np.concatenate([counts, np.zeros((1, 2, NUM_EDGES), np.int32)])
            members.append([])
        counts[j] += uses[i]
        members[j].append(int(i))
        if len(members[j]) == shape.archs:
            closed.append(np.array(members.pop(j)))
            counts = np.delete(counts, j, axis=0)
    return closed + [np.array(m) for m in members]


def chunk_inputs(ops: np.ndarray, shape: ChunkShape) -> tuple[np.ndarray, dict]:
    """A planned chunk's ops padded to `shape.archs` with all-`none` architectures (which
    use no slot), and its slots: per conv op, (6, K) architecture indices and validity.

    A row's indices are distinct and sorted (its spare slots name architectures that do not
    use the op, marked invalid), so the program's gathers and scatters are declared unique
    and sorted: no atomics on a GPU, ~30% faster on XLA:CPU."""
    padded = np.zeros((shape.archs, NUM_EDGES), np.int32)
    padded[: len(ops)] = ops
    slots = {}
    for op, size in ((CONV3, shape.conv3x3), (CONV1, shape.conv1x1)):
        index = np.zeros((NUM_EDGES, size), np.int32)
        valid = np.zeros((NUM_EDGES, size), bool)
        for e in range(NUM_EDGES):
            users = np.flatnonzero(padded[:, e] == op)
            if users.size > size:
                raise ValueError(f"{users.size} architectures use {OPS[op]} on edge {e}, > {size}")
            spare = np.setdiff1d(np.arange(shape.archs), users)[: size - users.size]
            index[e] = np.sort(np.concatenate([users, spare]))
            valid[e] = np.isin(index[e], users)
        slots[OPS[op]] = (index, valid)
    return padded, slots


# --------------------------------------------------------------------------- the program

_UNIQUE = {"unique_indices": True, "indices_are_sorted": True}  # slots, as `chunk_inputs` makes
Accumulator = tuple[jax.Array, jax.Array]  # (sums (A, N, N), counts (A,)) of one block kind


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _probe(num_archs: int, x: jax.Array, acc: Accumulator, index: jax.Array, valid: jax.Array):
    """Identity on x (K, N, ...), slot k belonging to architecture index[k]; its backward
    adds each valid slot's |corrcoef| of the cotangent into that architecture's `acc`."""
    return x


def _probe_fwd(num_archs, x, acc, index, valid):
    return x, (index, valid)


def _probe_bwd(num_archs, saved, g):
    index, valid = saved
    corr, defined = jax.vmap(abs_corrcoef)(g)
    keep = defined & valid
    sums = jnp.zeros((num_archs, *corr.shape[1:]), jnp.float32)
    sums = sums.at[index].add(jnp.where(keep[:, None, None], corr, 0.0), **_UNIQUE)
    counts = jnp.zeros(num_archs, jnp.float32).at[index].add(keep.astype(jnp.float32), **_UNIQUE)
    return g, (sums, counts), None, None


_probe.defvjp(_probe_fwd, _probe_bwd)


def _per_arch(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Apply an (N, H, W, C) layer to (A, N, H, W, C) as one batch of A x N images."""
    y = fn(x.reshape(-1, *x.shape[2:]))
    return y.reshape(*x.shape[:2], *y.shape[1:])


def _act_terms(x: jax.Array, multiplicity: jax.Array) -> Accumulator:
    """Forward (value) sites of every architecture, counted `multiplicity` (A,) times."""
    corr, defined = jax.vmap(abs_corrcoef)(x)
    weight = jnp.where(defined, multiplicity, 0).astype(jnp.float32)
    return weight[:, None, None] * corr, weight


def _add(a: Accumulator, b: Accumulator) -> Accumulator:
    return a[0] + b[0], a[1] + b[1]


def _conv_op(
    w: dict, x: jax.Array, grads: dict, index: jax.Array, valid: jax.Array, stride: int = 1
) -> jax.Array:
    """ReLU-conv-BN on slots x (K, N, H, W, C), each with its own batch statistics; the
    gradients at the ReLU input and at the BatchNorm input go to `grads` through probes."""
    num_archs = grads["act_grad"][1].shape[0]
    x = _probe(num_archs, x, grads["act_grad"], index, valid)
    y = _per_arch(lambda t: conv2d(jax.nn.relu(t), w["kernel"], stride), x)
    y = _probe(num_archs, y, grads["bn_grad"], index, valid)
    return jax.vmap(batch_norm, in_axes=(0, None, None))(y, w["scale"], w["bias"])


def _normal_cell(
    ops: jax.Array, slots: dict, w: dict, x: jax.Array, grads: dict
) -> tuple[jax.Array, Accumulator]:
    """One normal cell for the chunk: skip and pool as selects, each conv op on its slots.
    Returns the output and the cell's `act` sums (each node once per conv op reading it)."""
    is_conv = (ops == CONV1) | (ops == CONV3)
    acts = (jnp.zeros((x.shape[0],) + (x.shape[1],) * 2), jnp.zeros(x.shape[0]))
    nodes: list[jax.Array | None] = [x, None, None, None]
    for e, (to_node, from_node) in enumerate(EDGES):
        source, op = nodes[from_node], ops[:, e, None, None, None, None]
        out = jnp.where(op == SKIP, source, 0.0)
        out += jnp.where(op == POOL, _per_arch(avg_pool_3x3, source), 0.0)
        for conv in (CONV3, CONV1):
            index, valid = slots[OPS[conv]][0][e], slots[OPS[conv]][1][e]
            inputs = source.at[index].get(**_UNIQUE)
            y = _conv_op(w[edge_name(e)][OPS[conv]], inputs, grads, index, valid)
            out = out.at[index].add(jnp.where(valid[:, None, None, None, None], y, 0.0), **_UNIQUE)
        nodes[to_node] = out if nodes[to_node] is None else nodes[to_node] + out
    for node in range(3):
        readers = sum(is_conv[:, e] for e, (_, src) in enumerate(EDGES) if src == node)
        acts = _add(acts, _act_terms(nodes[node], readers))
    return nodes[3], acts


def _all_archs(num_archs: int) -> tuple[jax.Array, jax.Array]:
    """Slots for a site every architecture has: slot k is architecture k."""
    return jnp.arange(num_archs), jnp.ones(num_archs, bool)


def _reduction_cell(w: dict, x: jax.Array, grads: dict) -> tuple[jax.Array, Accumulator]:
    """NB201's reduction cell for the chunk and its `act` sums (its input, conv_b's input)."""
    num_archs = x.shape[0]
    a = _conv_op(w["conv_a"], x, grads, *_all_archs(num_archs), stride=2)
    b = _conv_op(w["conv_b"], a, grads, *_all_archs(num_archs))
    shortcut = _per_arch(lambda t: conv2d(avg_pool_2x2(t), w["shortcut"]["kernel"]), x)
    once = jnp.ones(num_archs, jnp.int32)
    return shortcut + b, _add(_act_terms(x, once), _act_terms(a, once))


def _head(
    w: dict, h: jax.Array, labels: jax.Array, grads: dict
) -> tuple[jax.Array, Accumulator, Accumulator]:
    """BN, ReLU, pool, classifier: the summed loss of the chunk's architectures and the
    final ReLU's input and output sums."""
    num_archs = h.shape[0]
    pre = jax.vmap(batch_norm, in_axes=(0, None, None))(h, w["bn"]["scale"], w["bn"]["bias"])
    once = jnp.ones(num_archs, jnp.int32)
    act, act_out = _act_terms(pre, once), _act_terms(jax.nn.relu(pre), once)
    pre = _probe(num_archs, pre, grads["act_grad"], *_all_archs(num_archs))
    logits = jax.vmap(classify, in_axes=(None, 0))(w["classifier"], jax.nn.relu(pre))
    loss = jax.vmap(cross_entropy, in_axes=(0, None))(logits, labels).sum()
    return loss, act, act_out


def _block(tree: dict, index: int | slice) -> dict:
    return jax.tree.map(lambda a: a[index], tree)


def _chunk_site_sums(
    params: dict,
    ops: jax.Array,
    slots: dict,
    images: jax.Array,
    labels: jax.Array,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Sums (A, 18, len(KINDS), N, N) and counts (A, 18, len(KINDS)) of a planned chunk
    (`chunk_inputs`): `captured_site_sums`'s layout, one row per architecture. `unroll`
    unrolls the stage scans (what XLA's cost analysis needs to count every cell)."""
    num_archs, n = ops.shape[0], images.shape[0]
    zeros = {k: (jnp.zeros((NUM_BLOCKS, num_archs, n, n)), jnp.zeros((NUM_BLOCKS, num_archs)))
             for k in GRAD_KINDS}  # fmt: skip

    def loss(grads: dict) -> tuple[jax.Array, tuple]:
        h = stem(params["stem"], images)[0]
        h = jnp.broadcast_to(h, (num_archs, *h.shape))
        acts = []
        for start, length in STAGES:
            weights = [params[cell_name(i)] for i in range(start, start + length)]
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *weights)

            def cell(x: jax.Array, wg: tuple) -> tuple[jax.Array, Accumulator]:
                return _normal_cell(ops, slots, wg[0], x, wg[1])

            stage = (stacked, _block(grads, slice(start, start + length)))
            h, stage_acts = jax.lax.scan(cell, h, stage, unroll=unroll)
            acts.append(stage_acts)
            if start + length < len(CELL_PLAN):
                w, g = params[cell_name(start + length)], _block(grads, start + length)
                h, cell_acts = _reduction_cell(w, h, g)
                acts.append(jax.tree.map(lambda a: a[None], cell_acts))
        total, head_act, head_out = _head(params["head"], h, labels, _block(grads, -1))
        acts.append(jax.tree.map(lambda a: a[None], head_act))
        return total, (acts, head_out)

    grads, (acts, head_out) = jax.grad(loss, has_aux=True)(zeros)
    act = jax.tree.map(lambda *parts: jnp.concatenate(parts), *acts)
    act_out = jax.tree.map(lambda z, a: z.at[-1].set(a), zeros["act_grad"], head_out)
    by_kind = {"act": act, "act_out": act_out, **grads}
    empty = jax.tree.map(jnp.zeros_like, act)
    sums = jnp.stack([by_kind.get(k, empty)[0] for k in KINDS], axis=2)  # (18, A, K, N, N)
    counts = jnp.stack([by_kind.get(k, empty)[1] for k in KINDS], axis=2)
    return sums.swapaxes(0, 1), jnp.round(counts.swapaxes(0, 1)).astype(jnp.int32)


chunk_site_sums = jax.jit(_chunk_site_sums, static_argnames="unroll")


def _spread(devices: Sequence[jax.Device]) -> tuple[Callable, NamedSharding]:
    """One program running a chunk on each of `devices` at once: the chunks' axis vmapped
    and split over a mesh of them (one compilation for all; a chunk's slots index only its
    own architectures, so no device reads another's), and the sharding that replicates
    the weights and the batch on every device."""
    mesh = Mesh(np.array(devices), ("chunks",))
    split, whole = NamedSharding(mesh, P("chunks")), NamedSharding(mesh, P())
    program = jax.jit(
        jax.vmap(_chunk_site_sums, in_axes=(None, 0, 0, None, None)),
        in_shardings=(whole, split, split, whole, whole),
        out_shardings=split,
    )
    return program, whole


class ChunkedEngine:
    """Site sums of any number of NB201 architectures: planned into chunks of one
    `ChunkShape`, so one compilation serves them all. `program` may be that compilation,
    made ahead (`chunk_site_sums.lower(...).compile()`, as the benchmark times it). With
    several `devices`, each runs one chunk of every call of one program (`_spread`)."""

    def __init__(
        self,
        shape: ChunkShape,
        program: Callable = chunk_site_sums,
        devices: Sequence[jax.Device] = (),
    ):
        self.shape, self.program, self.devices = shape, program, max(1, len(devices))
        self._replicated = None
        if self.devices > 1:
            self.program, self._replicated = _spread(devices)

    @property
    def archs_per_call(self) -> int:
        """Architectures one program call scores: a chunk on every device."""
        return self.shape.archs * self.devices

    def place(self, shared: tuple) -> tuple:
        """The weights and batch where the program reads them (on every device)."""
        return shared if self._replicated is None else jax.device_put(shared, self._replicated)

    def site_sums(
        self, ops: np.ndarray, params: dict, images: jax.Array, labels: jax.Array
    ) -> list[SiteSums]:
        """One `SiteSums` per row of `ops` (n, 6), in its order. The next call is
        dispatched before the current one is fetched, so the device never waits on the
        host."""
        plan = plan_chunks(ops, self.shape)
        calls = [plan[i : i + self.devices] for i in range(0, len(plan), self.devices)]
        out: list[SiteSums | None] = [None] * len(ops)
        pending = None
        for chunks in [*calls, None]:
            launched = None
            if chunks is not None:
                launched = chunks, self._launch(ops, chunks, params, images, labels)
            if pending is not None:
                done, result = pending
                sums, counts = jax.device_get(result)
                if self.devices == 1:
                    sums, counts = sums[None], counts[None]
                for c, members in enumerate(done):
                    for row, i in enumerate(members):
                        out[i] = SiteSums.from_stacked(sums[c, row], counts[c, row])
            pending = launched
        return out

    def _launch(self, ops: np.ndarray, chunks: list[np.ndarray], *shared) -> tuple:
        """Dispatch one call: `chunks` (one per device; the last call's missing ones empty)."""
        inputs = [chunk_inputs(ops[members], self.shape) for members in chunks]
        if self.devices == 1:
            return self.program(shared[0], *inputs[0], *shared[1:])
        inputs += [chunk_inputs(ops[:0], self.shape)] * (self.devices - len(inputs))
        padded, slots = jax.tree.map(lambda *a: np.stack(a), *inputs)
        return self.program(shared[0], padded, slots, *shared[1:])
