"""The NAS-Bench-201 search space: architecture encoding and the Flax network.

An architecture is six op indices (int32[6]), one per cell edge in the order of its string
`|A~0|+|B~0|C~1|+|D~0|E~1|F~2|`. The network takes those indices as traced data, so one
compilation serves all 15,625 architectures and `jax.vmap` can batch over architectures.
"""

from __future__ import annotations

import functools
from importlib import resources

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.layers import BN_EPS, avg_pool_2x2, avg_pool_3x3, conv2d, torch_default_init
from wrcor_jax.spaces.base import ArchError
from wrcor_jax.spaces.running_norm import NormMode, running_batch_norm
from wrcor_jax.weights import BatchNormWeights, ConvWeights, declare_conv_weights, torch_kernel_init

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))  # (to_node, from_node), string order
NUM_EDGES = len(EDGES)
NUM_ARCHS = len(OPS) ** NUM_EDGES
CONV_OPS = frozenset({OPS.index("nor_conv_1x1"), OPS.index("nor_conv_3x3")})
CONV_KERNEL = {OPS.index("nor_conv_1x1"): 1, OPS.index("nor_conv_3x3"): 3}

# (channels in, channels out, is reduction) for the 17 cells: 5 normal, reduce, 5, reduce, 5.
CELL_PLAN = tuple(
    [(16, 16, False)] * 5
    + [(16, 32, True)]
    + [(32, 32, False)] * 5
    + [(32, 64, True)]
    + [(64, 64, False)] * 5
)
NUM_CELLS = len(CELL_PLAN)
STEM_CHANNELS = 16
# Landmarks of the ground truth: the architecture with the highest CIFAR-10 test accuracy
# (94.37%), and the median one (NATS-Bench index 12400; three conv ops).
BEST_CIFAR10 = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
    "+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
)
MEDIAN_CIFAR10 = (
    "|avg_pool_3x3~0|+|nor_conv_3x3~0|skip_connect~1|"
    "+|nor_conv_1x1~0|avg_pool_3x3~1|nor_conv_1x1~2|"
)


def cell_name(index: int) -> str:
    """The parameter-tree key of cell `index` (0..16)."""
    return f"cell_{index:02d}"


def edge_name(edge: int) -> str:
    """The parameter-tree key of edge `edge` (0..5): `edge_{to}_{from}`."""
    to_node, from_node = EDGES[edge]
    return f"edge_{to_node}_{from_node}"


# --------------------------------------------------------------------------- encoding


def parse_arch(arch: str) -> np.ndarray:
    """Arch string -> int32[6] op indices, with an error that says what is wrong."""
    if not isinstance(arch, str):
        raise ArchError(f"architecture must be a string, got {type(arch).__name__}")
    text = arch.strip()
    nodes = text.split("+")
    if len(nodes) != 3:
        raise ArchError(f"{arch!r}: expected 3 nodes separated by '+', found {len(nodes)}")
    ops = []
    for node_index, node in enumerate(nodes, start=1):
        if not (node.startswith("|") and node.endswith("|")) or len(node) < 2:
            raise ArchError(f"{arch!r}: node {node_index} {node!r} must look like |op~i|...|")
        entries = node[1:-1].split("|")
        if len(entries) != node_index:
            raise ArchError(
                f"{arch!r}: node {node_index} must have {node_index} inputs, found {len(entries)}"
            )
        for expected_input, entry in enumerate(entries):
            name, sep, source = entry.partition("~")
            if not sep or source != str(expected_input):
                raise ArchError(
                    f"{arch!r}: node {node_index} entry {entry!r} must be op~{expected_input}"
                )
            if name not in OPS:
                raise ArchError(f"{arch!r}: unknown op {name!r}; known ops: {', '.join(OPS)}")
            ops.append(OPS.index(name))
    return np.asarray(ops, np.int32)


def validate_ops(ops: np.ndarray) -> np.ndarray:
    """Check an int array of shape (6,) or (n, 6) with values 0..4; return it as int32."""
    array = np.asarray(ops)
    if array.shape[-1:] != (NUM_EDGES,) or array.ndim not in (1, 2):
        raise ArchError(f"op indices must have shape (6,) or (n, 6), got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ArchError(f"op indices must be integers, got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= len(OPS)):
        raise ArchError(f"op indices must lie in 0..{len(OPS) - 1}")
    return array.astype(np.int32)


def arch_string(ops: np.ndarray) -> str:
    """int32[6] op indices -> arch string."""
    ops = validate_ops(ops)
    names = [f"{OPS[op]}~{EDGES[e][1]}" for e, op in enumerate(ops)]
    return "+".join("|" + "|".join(names[a:b]) + "|" for a, b in ((0, 1), (1, 3), (3, 6)))


def sample_archs(rng: np.random.Generator, n: int) -> np.ndarray:
    """n architectures drawn uniformly (with replacement) as an (n, 6) int32 array."""
    return rng.integers(0, len(OPS), size=(n, NUM_EDGES), dtype=np.int32)


def mutate_arch(rng: np.random.Generator, ops: np.ndarray) -> np.ndarray:
    """One random edge gets a different op (NB201's mutation in regularized evolution)."""
    child = validate_ops(ops).copy()
    edge = rng.integers(NUM_EDGES)
    child[edge] = (child[edge] + rng.integers(1, len(OPS))) % len(OPS)
    return child


@functools.cache
def all_archs() -> np.ndarray:
    """All 15,625 architectures as a (15625, 6) int32 array in NATS-Bench index order.

    NATS-Bench numbers architectures in a shuffled order that no formula gives; the order is
    stored with the package as base-5 codes (edge 0 most significant).
    """
    with resources.files("wrcor_jax.spaces").joinpath("nb201_nats_order.npy").open("rb") as f:
        codes = np.load(f)
    digits = (codes[:, None] // (len(OPS) ** np.arange(NUM_EDGES - 1, -1, -1))) % len(OPS)
    return digits.astype(np.int32)


def arch_code(ops: np.ndarray) -> np.ndarray:
    """Base-5 integer code of op indices (edge 0 most significant); shape (...,)."""
    ops = validate_ops(ops)
    return ops @ (len(OPS) ** np.arange(NUM_EDGES - 1, -1, -1))


def isomorphism_key(ops: np.ndarray) -> str:
    """NAS-Bench-201's `unique_str`: architectures with equal keys compute the same function.

    Built node by node: `#` is an all-zero node, skip passes its input's key through, any
    other op wraps it as `(key)@op`; a node's key joins its sorted input terms with `+`.
    """
    ops = validate_ops(ops)
    keys = ["0"]
    for node in (1, 2, 3):
        terms = []
        for e, (to_node, from_node) in enumerate(EDGES):
            if to_node != node:
                continue
            name, source = OPS[ops[e]], keys[from_node]
            if name == "none" or source == "#":
                terms.append("#")
            elif name == "skip_connect":
                terms.append(source)
            else:
                terms.append(f"({source})@{name}")
        keys.append("+".join(sorted(terms)))
    return keys[3]


# --------------------------------------------------------------------------- network


def _batch_norm(module: nn.Module, name: str, y: jax.Array, w: dict) -> jax.Array:
    """The BatchNorm of `module` as its `norm` field says (running averages, if any, in its
    `batch_stats` under `name`)."""
    return running_batch_norm(module, name, y, w["scale"], w["bias"], module.norm, BN_EPS)


def _relu_conv_bn_sites(module: nn.Module, x: jax.Array, w: dict, stride: int = 1) -> jax.Array:
    """ReLUConvBN with its response sites (SPEC 3a): the ReLU input, captured as a value
    (`intermediates/relu_in`) and perturbed for its gradient (`perturbations/relu_in`), and
    the BatchNorm input, i.e. the conv output, perturbed for its gradient (`bn_in`)."""
    module.sow("intermediates", "relu_in", x)
    x = module.perturb("relu_in", x)
    y = module.perturb("bn_in", conv2d(jax.nn.relu(x), w["kernel"], stride))
    return _batch_norm(module, "bn_stats", y, w)


class ReLUConvBN(nn.Module):
    """NAS-Bench-201's ReLUConvBN (ReLU, bias-free conv, affine BN) with its sites."""

    features: int
    kernel_size: int
    stride: int = 1
    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = declare_conv_weights(self, self.features, self.kernel_size, x.shape[-1])
        return _relu_conv_bn_sites(self, x, w, self.stride)


class MixedEdge(nn.Module):
    """One normal-cell edge whose op is a traced index: a masked sum of the candidates.

    The 1x1 conv runs as a 3x3 conv with its kernel in the centre, so both conv ops share
    one convolution and one set of sites. Every candidate is computed: use this network for
    vmapped and reference computations, and `nb201_engine` for fast one-at-a-time scoring.
    """

    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, op: jax.Array) -> jax.Array:
        c = x.shape[-1]
        w1 = ConvWeights(c, 1, name=OPS[2])(c)
        w3 = ConvWeights(c, 3, name=OPS[3])(c)
        is_1x1 = op == OPS.index("nor_conv_1x1")
        centred_1x1 = jnp.pad(w1["kernel"], ((1, 1), (1, 1), (0, 0), (0, 0)))
        w = {
            "kernel": jnp.where(is_1x1, centred_1x1, w3["kernel"]),
            "scale": jnp.where(is_1x1, w1["scale"], w3["scale"]),
            "bias": jnp.where(is_1x1, w1["bias"], w3["bias"]),
        }
        conv = _relu_conv_bn_sites(self, x, w)
        is_conv = is_1x1 | (op == OPS.index("nor_conv_3x3"))
        out = jnp.where(op == OPS.index("skip_connect"), x, 0.0)
        out = out + jnp.where(is_conv, conv, 0.0)
        return out + jnp.where(op == OPS.index("avg_pool_3x3"), avg_pool_3x3(x), 0.0)


class NormalCell(nn.Module):
    """The 4-node NB201 cell: n1 = A(n0); n2 = B(n0) + C(n1); n3 = D(n0) + E(n1) + F(n2)."""

    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, ops: jax.Array) -> jax.Array:
        nodes = [x, None, None, None]
        for e, (to_node, from_node) in enumerate(EDGES):
            out = MixedEdge(self.norm, name=edge_name(e))(nodes[from_node], ops[e])
            nodes[to_node] = out if nodes[to_node] is None else nodes[to_node] + out
        return nodes[3]


class ReductionCell(nn.Module):
    """NB201's reduction cell: a ResNet basic block with an avg-pool + 1x1 conv shortcut."""

    features: int
    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch = ReLUConvBN(self.features, 3, stride=2, norm=self.norm, name="conv_a")(x)
        branch = ReLUConvBN(self.features, 3, norm=self.norm, name="conv_b")(branch)
        shortcut = ConvWeights(self.features, 1, batch_norm=False, name="shortcut")(x.shape[-1])
        return conv2d(avg_pool_2x2(x), shortcut["kernel"]) + branch


class Head(nn.Module):
    """BatchNorm, ReLU, global average pool, linear classifier.

    Sites (SPEC 3a): the ReLU's input (value and gradient), and its output, which is what
    the reference's in-place final ReLU shows its forward hook.
    """

    num_classes: int
    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        pre = _batch_norm(self, "bn_stats", x, BatchNormWeights(c, name="bn")())
        self.sow("intermediates", "relu_in", pre)
        pre = self.perturb("relu_in", pre)
        post = jax.nn.relu(pre)
        self.sow("intermediates", "relu_out", post)
        bound = 1.0 / np.sqrt(c)
        classifier = nn.Dense(
            self.num_classes,
            kernel_init=torch_kernel_init,
            bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                key, shape, dtype, -bound, bound
            ),
            name="classifier",
        )
        return classifier(post.mean(axis=(1, 2)))


class NB201Network(nn.Module):
    """The NAS-Bench-201 network of SPEC section 1; `ops` (int32[6]) may be traced.

    `norm` is "batch" for scoring (batch statistics, no state); the trainer uses "train" and
    "eval", with running averages in `batch_stats` (`wrcor_jax.spaces.running_norm`).
    """

    num_classes: int = 10
    norm: NormMode = "batch"

    @nn.compact
    def __call__(self, images: jax.Array, ops: jax.Array) -> jax.Array:
        stem = ConvWeights(STEM_CHANNELS, 3, name="stem")(images.shape[-1])
        x = _batch_norm(self, "stem_stats", conv2d(images, stem["kernel"]), stem)
        for index, (_, c_out, reduction) in enumerate(CELL_PLAN):
            if reduction:
                x = ReductionCell(c_out, self.norm, name=cell_name(index))(x)
            else:
                x = NormalCell(self.norm, name=cell_name(index))(x, ops)
        return Head(self.num_classes, self.norm, name="head")(x)


@functools.cache
def param_shapes(num_classes: int) -> dict:
    """Shapes and dtypes of the supernet's parameter tree."""
    model = NB201Network(num_classes)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    ops = jax.ShapeDtypeStruct((NUM_EDGES,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), images, ops)["params"]


def init_params(seed: int = 42, num_classes: int = 10) -> dict:
    """The whole supernet's parameters with PyTorch's default init, as NumPy float32 arrays.

    Same tree and distribution as `NB201Network(num_classes).init(...)["params"]`. With a
    fixed seed every architecture sees the same weights on the edges it uses.
    """
    return torch_default_init(seed, param_shapes(num_classes))


def used_params(params: dict, ops: np.ndarray) -> dict:
    """The sub-tree an architecture uses: the chosen conv op's weights on each edge."""
    ops = validate_ops(ops)
    used = {}
    for name, subtree in params.items():
        if not name.startswith("cell_") or "conv_a" in subtree:
            used[name] = subtree
            continue
        used[name] = {
            edge_name(e): subtree[edge_name(e)][OPS[op]]
            for e, op in enumerate(ops)
            if op in CONV_OPS
        }
    return used


def count_params(params: dict, ops: np.ndarray) -> int:
    """Trainable parameters of one architecture (BN scale and bias included, as torch counts)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(used_params(params, ops)))


def block_macs(ops: np.ndarray, image_shape: tuple[int, ...], num_classes: int) -> list[int]:
    """Multiply-accumulates per image of the stem, each of the 17 cells and the classifier
    (convs and the linear layer; BatchNorm, pools and additions not counted), for NHWC
    `image_shape`."""
    ops = validate_ops(ops)
    _, h, w, c_in = image_shape
    macs = [h * w * STEM_CHANNELS * c_in * 9]
    for c_in, c_out, reduction in CELL_PLAN:
        if reduction:
            h, w = h // 2, w // 2
            macs.append(h * w * c_out * (c_in * 9 + c_out * 9 + c_in))  # conv_a, conv_b, shortcut
        else:
            macs.append(
                sum(h * w * c_out * c_in * CONV_KERNEL[op] ** 2 for op in ops if op in CONV_KERNEL)
            )
    return [*macs, CELL_PLAN[-1][1] * num_classes]


def count_macs(ops: np.ndarray, image_shape: tuple[int, ...], num_classes: int) -> int:
    """Multiply-accumulates per image of one architecture (`block_macs` summed)."""
    return int(sum(block_macs(ops, image_shape, num_classes)))
