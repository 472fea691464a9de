"""FLOPs and parameter counts of MobileNetV2-space networks, as the paper's code counts them.

The FLOPs limit of the search (SPEC 7, 8) is a limit on the reference's `get_FLOPs()`, so a
search that is to find the same architectures must count the same way, quirks included.

The counting rule (checked exactly against the reference on the 12 rows of
`mbv2_reference_sample.csv` and on our own reference measurements in
`tests/data/mbv2_reference_counts.csv`):

- FLOPs are multiply-accumulates: a k x k conv counts in x out x k^2 x H_in^2 // stride^2
  // groups, a BN counts H^2 x C, ReLU and the global pool nothing, the classifier in x out
  (no bias term). SE(c) with s = max(1, round(c/4)) counts 2 c s + c + c H^2 (its two 1x1
  convs on the pooled 1x1 map, c more, and the rescaling of the H x H map).
- Quirk: the shortcut of the first sub-block of each SuperResIDWE block (a 1x1 conv with the
  block's stride, then BN) counts (in x out + out) x (H_out / stride)^2, where H_out is the
  block's *output* resolution: a stride-2 shortcut is counted at a quarter of its real size.
  The reference computes that term in floating point; every term is a multiple of 1/4, so
  its float sum is exact (below 2^51 FLOPs) and we count in quarters with integers. The
  total is fractional only for a stride-2 block with an odd output resolution and
  out x (in + 1) not a multiple of 4, which no search-space width (multiples of 8) gives;
  `flops` is the reference's float truncated to an integer (`int(net.get_FLOPs())`; the
  CSV column `flops_1000cls` holds integral floats), and so is each block row's (so only
  then can the rows sum to less than the total).
- Parameters are `sum(p.numel())` of the reference's PyTorch network (the CSV column
  `params_1000cls` and the SPEC 8 numbers, e.g. 8,503,880 = 8.504M for `EA_our_vote`,
  where `get_model_size()` gives 8,474,281): convs without bias, BN weight and bias (2 per
  channel), the shortcut conv *with* its bias (nn.Conv2d's default) and its BN, SE's two
  convs and two BNs, the classifier's weight and bias. The reference's `get_model_size()`
  is not that count and is not used: it counts BN as 1 per channel, the shortcut as
  in x out + out (no BN), and the classifier's bias as 1 instead of `num_classes`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from wrcor_jax.spaces.mbv2.arch import ConvBlock, MBV2Arch, ResBlock, format_arch, validate


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """One row of a cost table: a block of the block string, or the classifier (`Linear`)."""

    name: str
    in_channels: int
    out_channels: int
    stride: int
    layers: int
    bottleneck: int | None
    dw_channels: int | None
    output_resolution: int
    flops: int
    params: int


@dataclasses.dataclass(frozen=True)
class Description:
    """An architecture with its reference FLOPs and parameters, total and per block."""

    arch: str
    resolution: int
    num_classes: int
    flops: int
    params: int
    blocks: tuple[BlockCost, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: plain ints, strings, None and lists."""
        out = dataclasses.asdict(self)
        out["blocks"] = [dataclasses.asdict(row) for row in self.blocks]
        return out


def _conv_block(block: ConvBlock, res: int) -> tuple[int, int]:
    """(FLOPs in quarters, params) of `layers` x (conv, BN, ReLU) at input resolution `res`."""
    k2, out = block.kernel**2, block.out_channels
    res_out = res // block.stride
    flops = block.in_channels * out * k2 * res**2 // block.stride**2 + res_out**2 * out
    params = block.in_channels * out * k2 + 2 * out
    flops += (block.layers - 1) * (out * out * k2 * res_out**2 + res_out**2 * out)
    params += (block.layers - 1) * (out * out * k2 + 2 * out)
    return 4 * flops, params


def _res_sub_block(block: ResBlock, in_channels: int, stride: int, res: int) -> tuple[int, int]:
    """(FLOPs in quarters, params) of one inverted-residual sub-block at input resolution
    `res`, without the first sub-block's shortcut (`_res_block` adds it)."""
    dw, out, k2 = block.dw_channels, block.out_channels, block.kernel**2
    se = max(1, round(dw * 0.25))
    res_out = res // stride
    flops = (
        (in_channels * dw * res**2 + res**2 * dw)  # 1x1 expansion, BN
        + (dw * k2 * res**2 // stride**2 + res_out**2 * dw)  # depthwise, BN
        + (2 * dw * se + dw + dw * res_out**2)  # SE
        + (dw * out * res_out**2 + res_out**2 * out)  # 1x1 projection, BN
    )
    params = (
        (in_channels * dw + 2 * dw)
        + (dw * k2 + 2 * dw)
        + (2 * dw * se + 2 * se + 2 * dw)
        + (dw * out + 2 * out)
    )
    return 4 * flops, params


def _res_block(block: ResBlock, res: int) -> tuple[int, int]:
    """(FLOPs in quarters, params) of a SuperResIDWE block at input resolution `res`."""
    quarters, params = _res_sub_block(block, block.in_channels, block.stride, res)
    res_out = res // block.stride
    # The first sub-block's shortcut, counted at (res_out / stride)^2 (the quirk): in
    # quarters 4 (in + 1) out res_out^2 / stride^2, exact since stride^2 divides 4.
    quarters += 4 * (block.in_channels + 1) * block.out_channels * res_out**2 // block.stride**2
    params += block.in_channels * block.out_channels + 3 * block.out_channels
    for _ in range(block.layers - 1):
        more_quarters, more_params = _res_sub_block(block, block.out_channels, 1, res_out)
        quarters += more_quarters
        params += more_params
    return quarters, params


def describe(arch: MBV2Arch, num_classes: int = 1000) -> Description:
    """The reference's FLOPs and parameter count of `arch` with a `num_classes` classifier,
    total and per block (see the module docstring for the counting rule)."""
    integral = isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
    if not integral or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    validate(arch)
    rows, total_quarters, total_params, res = [], 0, 0, arch.resolution
    for block in arch.blocks:
        if isinstance(block, ResBlock):
            quarters, params = _res_block(block, res)
            bottleneck, dw = block.bottleneck, block.dw_channels
        else:
            quarters, params = _conv_block(block, res)
            bottleneck = dw = None
        res //= block.stride
        total_quarters += quarters
        total_params += params
        rows.append(
            BlockCost(
                block.name, block.in_channels, block.out_channels, block.stride, block.layers,
                bottleneck, dw, res, quarters // 4, params,
            )
        )  # fmt: skip
    linear_flops = arch.last_width * num_classes
    linear_params = linear_flops + num_classes
    rows.append(
        BlockCost("Linear", arch.last_width, num_classes, 1, 1, None, None, 1, linear_flops,
                  linear_params)
    )  # fmt: skip
    return Description(
        arch=format_arch(arch),
        resolution=arch.resolution,
        num_classes=num_classes,
        flops=total_quarters // 4 + linear_flops,
        params=total_params + linear_params,
        blocks=tuple(rows),
    )
