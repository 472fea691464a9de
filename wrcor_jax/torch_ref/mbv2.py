"""The MobileNetV2-space network in PyTorch (NCHW), built for one architecture (SPEC 8).

Module classes and attribute names follow the reference's (Zen-NAS's PlainNet): the network's
`module_list` holds one `SuperConvK{k}BNRELU` or `SuperResIDWE{e}K{k}` module per block; a
block's `module_list` holds `ConvKX`, `BN`, `RELU` modules, or `ResBlockProj` / `ResBlock`
sub-blocks each followed by a `RELU`; `SE` wraps an `nn.Sequential`; `fc_linear` is the
classifier. Names matter twice: the reference picks WRCor's hook sites by class name (only the
`nn.ReLU` inside `SE` contains "ReLU"; the block ReLUs are `RELU`, SPEC 3b), and the
state_dict keys equal the reference's, so its weights load as they are.
Weights move to and from the Flax tree of `wrcor_jax.spaces.mbv2.network`.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wrcor_jax.spaces.mbv2.arch import (
    CONV_KERNELS,
    EXPANSIONS,
    RES_KERNELS,
    ConvBlock,
    MBV2Arch,
    parse,
)
from wrcor_jax.spaces.mbv2.arch import ResBlock as ResBlockSpec
from wrcor_jax.spaces.mbv2.network import BN_EPS, block_name, layer_name, se_channels
from wrcor_jax.torch_ref.weights import (
    CONV,
    LINEAR,
    VECTOR,
    bn_pairs,
    conv_bn_pairs,
    flax_to_torch_layout,
    torch_to_flax_layout,
)


class ConvKX(nn.Module):
    """A bias-free k x k conv with padding (k-1)//2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.netblock = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netblock(x)


class ConvDW(nn.Module):
    """A bias-free k x k depthwise conv with padding (k-1)//2."""

    def __init__(self, channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.netblock = nn.Conv2d(
            channels,
            channels,
            kernel_size,
            stride,
            (kernel_size - 1) // 2,
            bias=False,
            groups=channels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netblock(x)


class BN(nn.Module):
    """BatchNorm with the network's eps."""

    def __init__(self, channels: int):
        super().__init__()
        self.netblock = nn.BatchNorm2d(channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netblock(x)


class RELU(nn.Module):
    """A block ReLU, called functionally: the reference's name, which its hooks skip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class SE(nn.Module):
    """Squeeze-and-excitation: x times sigmoid(BN(conv(ReLU(BN(conv(pool(x)))))))."""

    def __init__(self, channels: int):
        super().__init__()
        mid = se_channels(channels)
        self.netblock = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid, eps=BN_EPS),
            nn.ReLU(),
            nn.Conv2d(mid, channels, 1, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netblock(x) * x


class _Chain(nn.Module):
    """Runs its `module_list` in order (the reference's blocks all do)."""

    module_list: nn.ModuleList

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.module_list:
            x = module(x)
        return x


# Positions in a sub-block's module_list: ConvKX BN RELU ConvDW BN RELU SE ConvKX BN.
EXPAND, EXPAND_BN, DEPTHWISE, DEPTHWISE_BN, SQUEEZE, PROJECT, PROJECT_BN = 0, 1, 3, 4, 6, 7, 8
# Positions in SE.netblock: pool, conv, BN, ReLU, conv, BN, sigmoid.
SE_REDUCE, SE_REDUCE_BN, SE_RESTORE, SE_RESTORE_BN = 1, 2, 4, 5


def _inverted_residual_body(block: ResBlockSpec, in_channels: int, stride: int) -> nn.ModuleList:
    dw = block.dw_channels
    return nn.ModuleList(
        [
            ConvKX(in_channels, dw, 1, 1),
            BN(dw),
            RELU(),
            ConvDW(dw, block.kernel, stride),
            BN(dw),
            RELU(),
            SE(dw),
            ConvKX(dw, block.out_channels, 1, 1),
            BN(block.out_channels),
        ]
    )


class ResBlock(_Chain):
    """A later sub-block: body(x) + x (same width, stride 1)."""

    def __init__(self, block: ResBlockSpec):
        super().__init__()
        self.module_list = _inverted_residual_body(block, block.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


class ResBlockProj(_Chain):
    """The first sub-block: body(x) + BN(1x1 conv with bias and the stride (x))."""

    def __init__(self, block: ResBlockSpec):
        super().__init__()
        self.module_list = _inverted_residual_body(block, block.in_channels, block.stride)
        self.proj = nn.Sequential(
            nn.Conv2d(block.in_channels, block.out_channels, 1, block.stride),
            nn.BatchNorm2d(block.out_channels, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.proj(x)


class SuperConvKXBNRELU(_Chain):
    """`layers` x (ConvKX, BN, RELU), the stride on the first."""

    def __init__(self, block: ConvBlock):
        super().__init__()
        modules: list[nn.Module] = []
        for j in range(block.layers):
            c_in, stride = (block.in_channels, block.stride) if j == 0 else (block.out_channels, 1)
            modules += [ConvKX(c_in, block.out_channels, block.kernel, stride)]
            modules += [BN(block.out_channels), RELU()]
        self.module_list = nn.ModuleList(modules)


class SuperResIDWEXKX(_Chain):
    """`layers` inverted-residual sub-blocks, each followed by a RELU."""

    def __init__(self, block: ResBlockSpec):
        super().__init__()
        modules: list[nn.Module] = []
        for j in range(block.layers):
            modules += [ResBlockProj(block) if j == 0 else ResBlock(block), RELU()]
        self.module_list = nn.ModuleList(modules)


def _named(name: str, base: type) -> type:
    return type(name, (base,), {"__module__": __name__, "__doc__": base.__doc__})


SUPER_BLOCKS: dict[str, type] = {
    **{
        f"SuperConvK{k}BNRELU": _named(f"SuperConvK{k}BNRELU", SuperConvKXBNRELU)
        for k in CONV_KERNELS
    },
    **{
        f"SuperResIDWE{e}K{k}": _named(f"SuperResIDWE{e}K{k}", SuperResIDWEXKX)
        for e in EXPANSIONS
        for k in RES_KERNELS
    },
}
"""The block classes under the reference's names (`SuperConvK3BNRELU`, `SuperResIDWE6K7`, ...)."""


class Linear(nn.Module):
    """The classifier."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.netblock = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netblock(x)


class MBV2TorchNetwork(nn.Module):
    """Bilinear resize to the arch's resolution, the blocks, global average pool, Linear.

    Top-level blocks, as WRCor weights them: `module_list.<i>` is block i.
    """

    def __init__(self, arch: MBV2Arch | str, num_classes: int = 1000):
        super().__init__()
        self.arch = parse(arch) if isinstance(arch, str) else arch
        self.input_resolution = self.arch.resolution
        self.block_list = [SUPER_BLOCKS[block.name](block) for block in self.arch.blocks]
        self.module_list = nn.ModuleList(self.block_list)
        self.fc_linear = Linear(self.arch.last_width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, self.input_resolution, mode="bilinear", align_corners=False)
        for block in self.module_list:
            x = block(x)
        return self.fc_linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def block_of(module_name: str) -> int | None:
    """Top-level block index of a module named as in `named_modules()` (None: no block)."""
    head, _, rest = module_name.partition(".")
    return int(rest.partition(".")[0]) if head == "module_list" and rest else None


# --------------------------------------------------------------------------- weights


def _leaf_pairs(net: MBV2TorchNetwork) -> list[tuple[tuple[str, ...], torch.Tensor, str]]:
    """(Flax path, torch parameter, layout) for every parameter of `net`."""
    pairs = []
    for index, (block, module) in enumerate(zip(net.arch.blocks, net.module_list, strict=True)):
        name = block_name(index)
        for j in range(block.layers):
            path = (name, layer_name(j))
            if isinstance(block, ConvBlock):
                conv, bn = module.module_list[3 * j : 3 * j + 2]
                pairs += conv_bn_pairs(path, conv.netblock, bn.netblock)
                continue
            sub = module.module_list[2 * j]
            part = [getattr(m, "netblock", None) for m in sub.module_list]
            se = part[SQUEEZE]
            pairs += conv_bn_pairs((*path, "expand"), part[EXPAND], part[EXPAND_BN])
            pairs += conv_bn_pairs((*path, "depthwise"), part[DEPTHWISE], part[DEPTHWISE_BN])
            pairs += conv_bn_pairs((*path, "se", "reduce"), se[SE_REDUCE], se[SE_REDUCE_BN])
            pairs += conv_bn_pairs((*path, "se", "restore"), se[SE_RESTORE], se[SE_RESTORE_BN])
            pairs += conv_bn_pairs((*path, "project"), part[PROJECT], part[PROJECT_BN])
            if isinstance(sub, ResBlockProj):
                conv, bn = sub.proj
                pairs.append(((*path, "shortcut", "conv", "kernel"), conv.weight, CONV))
                pairs.append(((*path, "shortcut", "conv", "bias"), conv.bias, VECTOR))
                pairs += bn_pairs((*path, "shortcut", "bn"), bn)
    linear = net.fc_linear.netblock
    pairs.append((("classifier", "kernel"), linear.weight, LINEAR))
    pairs.append((("classifier", "bias"), linear.bias, VECTOR))
    return pairs


def _leaf(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _matched(net: MBV2TorchNetwork, tree: dict) -> list[tuple]:
    """(path, torch parameter, layout, leaf of `tree`) for every parameter of `net`. The tree
    must hold exactly the network's parameters, shaped alike: a guard against another arch's."""
    pairs = _leaf_pairs(net)
    paths = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    wanted = {path for path, _, _ in pairs}
    if paths != wanted:
        missing, unexpected = sorted(wanted - paths), sorted(paths - wanted)
        raise ValueError(
            f"parameter tree does not fit {net.arch.block_string}: {len(missing)} leaves "
            f"missing {['/'.join(p) for p in missing[:2]]}, {len(unexpected)} unexpected "
            f"{['/'.join(p) for p in unexpected[:2]]}"
        )
    matched = []
    for path, tensor, layout in pairs:
        leaf = _leaf(tree, path)
        shape = torch_to_flax_layout(np.broadcast_to(np.float32(0), tensor.shape), layout).shape
        if tuple(leaf.shape) != shape:
            raise ValueError(f"{'/'.join(path)}: shape {tuple(leaf.shape)}, the network's {shape}")
        matched.append((path, tensor, layout, leaf))
    return matched


def load_flax_params(net: MBV2TorchNetwork, params: dict) -> MBV2TorchNetwork:
    """Copy a Flax parameter tree of `net`'s architecture into `net` (in place, returned)."""
    with torch.no_grad():
        for _, tensor, layout, leaf in _matched(net, params):
            value = flax_to_torch_layout(np.asarray(leaf, np.float32), layout)
            tensor.copy_(torch.from_numpy(np.array(value)))  # a writable copy
    return net


def to_flax_params(net: MBV2TorchNetwork, template: dict) -> dict:
    """`net`'s weights as a Flax tree shaped like `template` (e.g. `param_shapes(arch)`)."""
    params = copy.deepcopy(template)
    for path, tensor, layout, _ in _matched(net, template):
        value = torch_to_flax_layout(tensor.detach().cpu().numpy().astype(np.float32), layout)
        _leaf(params, path[:-1])[path[-1]] = np.ascontiguousarray(value)
    return params


def build_network(
    arch: MBV2Arch | str, num_classes: int = 1000, params: dict | None = None
) -> MBV2TorchNetwork:
    """The network of `arch` in training mode, with `params` (a Flax tree) loaded if given."""
    net = MBV2TorchNetwork(arch, num_classes).train()
    if params is not None:
        load_flax_params(net, params)
    return net
