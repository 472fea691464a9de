"""The NAS-Bench-201 network in PyTorch (NCHW), built for one architecture.

Module classes carry the reference's names (`ReLUConvBN`, `InferCell`, `ResNetBasicblock`,
...) because the reference picks its WRCor hook sites by class name. Only the chosen ops
exist (`none` edges stay as `Zero` modules), and scoring uses training mode, so BatchNorm
normalises with the batch's statistics. Weights move to and from the Flax parameter tree of
`wrcor_jax.spaces.nb201` so both frameworks can score the very same network.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from wrcor_jax.spaces.nb201 import (
    CELL_PLAN,
    CONV_KERNEL,
    EDGES,
    OPS,
    STEM_CHANNELS,
    cell_name,
    edge_name,
    parse_arch,
    validate_ops,
)
from wrcor_jax.torch_ref.weights import (
    CONV,
    LINEAR,
    VECTOR,
    bn_pairs,
    conv_bn_pairs,
    flax_to_torch_layout,
    torch_to_flax_layout,
)

ArchLike = str | np.ndarray | Sequence[int]
BN_EPS = 1e-5


def as_ops(arch: ArchLike) -> np.ndarray:
    """An arch string or six op indices -> int32[6] op indices."""
    return parse_arch(arch) if isinstance(arch, str) else validate_ops(np.asarray(arch))


class ReLUConvBN(nn.Module):
    """ReLU, bias-free conv with "same" padding, affine BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=BN_EPS, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Pooling(nn.Module):
    """3x3 average pool, stride 1, padded cells excluded from the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.op = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """The `none` op: zeros, kept as a product so the graph matches the reference's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


class Identity(nn.Module):
    """The `skip_connect` op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_op(op: int, channels: int) -> nn.Module:
    """The module of normal-cell op index `op` at `channels` channels."""
    name = OPS[op]
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return Identity()
    if name == "avg_pool_3x3":
        return Pooling()
    return ReLUConvBN(channels, channels, CONV_KERNEL[op])


class InferCell(nn.Module):
    """The 4-node cell: n1 = A(n0); n2 = B(n0) + C(n1); n3 = D(n0) + E(n1) + F(n2)."""

    def __init__(self, channels: int, ops: np.ndarray) -> None:
        super().__init__()
        self.edges = nn.ModuleDict(
            {edge_name(e): make_op(int(op), channels) for e, op in enumerate(ops)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes: list[torch.Tensor | None] = [x, None, None, None]
        for e, (to_node, from_node) in enumerate(EDGES):
            out = self.edges[edge_name(e)](nodes[from_node])
            nodes[to_node] = out if nodes[to_node] is None else nodes[to_node] + out
        return nodes[3]


class ResNetBasicblock(nn.Module):
    """The reduction cell: conv_b(conv_a(x)) plus an avg-pool + 1x1 conv shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201TorchNetwork(nn.Module):
    """Stem, 17 cells, BN + in-place ReLU, global average pool, linear classifier.

    Top-level blocks, as WRCor weights them: `cells.<i>` is block i (0..16) and `lastact`
    is block 17; the stem holds no site.
    """

    def __init__(self, ops: ArchLike, num_classes: int = 10) -> None:
        super().__init__()
        self.ops = as_ops(ops)
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS),
        )
        self.cells = nn.ModuleList(
            ResNetBasicblock(c_in, c_out) if reduction else InferCell(c_out, self.ops)
            for c_in, c_out, reduction in CELL_PLAN
        )
        c_last = CELL_PLAN[-1][1]
        self.lastact = nn.Sequential(nn.BatchNorm2d(c_last, eps=BN_EPS), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_last, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for cell in self.cells:
            x = cell(x)
        x = self.global_pooling(self.lastact(x))
        return self.classifier(x.flatten(1))


def block_of(module_name: str) -> int | None:
    """Top-level block index of a module named as in `named_modules()` (None: no block)."""
    head, _, rest = module_name.partition(".")
    if head == "cells":
        return int(rest.partition(".")[0])
    if head == "lastact":
        return len(CELL_PLAN)
    return None


# --------------------------------------------------------------------------- weights


def _leaf_pairs(net: NB201TorchNetwork) -> list[tuple[tuple[str, ...], torch.Tensor, str]]:
    """(Flax path, torch parameter, layout) for every parameter the architecture uses."""
    pairs = conv_bn_pairs(("stem",), net.stem[0], net.stem[1])
    for index, cell in enumerate(net.cells):
        name = cell_name(index)
        if isinstance(cell, ResNetBasicblock):
            for branch in ("conv_a", "conv_b"):
                rcb = getattr(cell, branch)
                pairs += conv_bn_pairs((name, branch), rcb.op[1], rcb.op[2])
            pairs.append(((name, "shortcut", "kernel"), cell.downsample[1].weight, CONV))
            continue
        for e, op in enumerate(net.ops):
            edge = cell.edges[edge_name(e)]
            if isinstance(edge, ReLUConvBN):
                pairs += conv_bn_pairs((name, edge_name(e), OPS[op]), edge.op[1], edge.op[2])
    pairs += bn_pairs(("head", "bn"), net.lastact[0])
    classifier = net.classifier
    pairs.append((("head", "classifier", "kernel"), classifier.weight, LINEAR))
    pairs.append((("head", "classifier", "bias"), classifier.bias, VECTOR))
    return pairs


def _check_ops(net: NB201TorchNetwork, ops: ArchLike | None) -> None:
    if ops is not None and not np.array_equal(as_ops(ops), net.ops):
        raise ValueError(f"network is built for ops {net.ops.tolist()}, not {as_ops(ops)}")


def load_flax_params(
    net: NB201TorchNetwork, params: dict, ops: ArchLike | None = None
) -> NB201TorchNetwork:
    """Copy the used leaves of a Flax NB201 parameter tree into `net` (in place, returned).

    `ops`, when given, must be the architecture `net` was built for: a guard against
    loading one architecture's view of the supernet into another's network.
    """
    _check_ops(net, ops)
    with torch.no_grad():
        for path, tensor, layout in _leaf_pairs(net):
            leaf = params
            for key in path:
                leaf = leaf[key]
            value = flax_to_torch_layout(np.asarray(leaf, np.float32), layout)
            if value.shape != tuple(tensor.shape):
                raise ValueError(f"{'/'.join(path)}: shape {value.shape} != {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(np.array(value)))  # a writable copy
    return net


def to_flax_params(net: NB201TorchNetwork, ops: ArchLike | None, template: dict) -> dict:
    """A copy of the Flax tree `template` whose leaves used by `net` hold its weights."""
    _check_ops(net, ops)
    params = copy.deepcopy(template)
    for path, tensor, layout in _leaf_pairs(net):
        parent = params
        for key in path[:-1]:
            parent = parent[key]
        value = tensor.detach().cpu().numpy().astype(np.float32)
        parent[path[-1]] = np.ascontiguousarray(torch_to_flax_layout(value, layout))
    return params


def build_network(
    arch: ArchLike, num_classes: int = 10, params: dict | None = None
) -> NB201TorchNetwork:
    """The network of `arch` in training mode, with `params` (a Flax tree) loaded if given."""
    net = NB201TorchNetwork(arch, num_classes).train()
    if params is not None:
        load_flax_params(net, params)
    return net
