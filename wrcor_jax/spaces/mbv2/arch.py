"""MobileNetV2-space architectures as data: the Zen-NAS block grammar (SPEC 8).

An architecture is a block string plus an input resolution. Its one-token text form, used on
the command line, in arch files and in results, is `<block string>@<resolution>`, e.g.
`SuperConvK3BNRELU(3,32,2,1)SuperResIDWE1K3(32,16,1,32,1)...SuperConvK1BNRELU(320,1280,1,1)@224`.
`parse` and `format_arch` round-trip exactly; `parse` rejects what cannot be built, with a
message that names the problem.
"""

from __future__ import annotations

import dataclasses
import re

from wrcor_jax.spaces.base import ArchError

CONV_KERNELS = (1, 3, 5, 7)
RES_KERNELS = (3, 5, 7)
EXPANSIONS = (1, 2, 4, 6)
IN_CHANNELS = 3  # the network reads RGB images

# Landmarks (SPEC 8): the architecture the reference README trains (evolution + vote; the
# paper's 22.1% top-1 error is reported for its best search result), its 600M-FLOPs sibling,
# and MobileNetV2 itself in this grammar (SE in every block).
EA_OUR_VOTE = (
    "SuperConvK3BNRELU(3,48,2,1)SuperResIDWE6K7(48,32,2,32,2)SuperResIDWE6K5(32,40,2,48,3)"
    "SuperResIDWE6K7(40,40,1,32,3)SuperResIDWE6K7(40,72,2,64,4)SuperResIDWE6K7(72,176,1,56,6)"
    "SuperResIDWE4K5(176,240,2,232,6)SuperResIDWE2K7(240,136,1,176,2)"
    "SuperConvK1BNRELU(136,424,1,1)@320"
)
EA_OUR_VOTE_600M = (
    "SuperConvK3BNRELU(3,48,2,1)SuperResIDWE2K7(48,32,2,40,2)SuperResIDWE2K7(32,32,2,48,3)"
    "SuperResIDWE6K7(32,64,1,40,3)SuperResIDWE6K7(64,88,2,40,4)SuperResIDWE6K7(88,104,1,56,6)"
    "SuperResIDWE6K5(104,152,2,192,6)SuperResIDWE6K5(152,240,1,136,2)"
    "SuperConvK1BNRELU(240,1264,1,1)@224"
)
MOBILENET_V2 = (
    "SuperConvK3BNRELU(3,32,2,1)SuperResIDWE1K3(32,16,1,32,1)SuperResIDWE6K3(16,24,2,16,2)"
    "SuperResIDWE6K3(24,32,2,24,3)SuperResIDWE6K3(32,64,2,32,4)SuperResIDWE6K3(64,96,1,64,3)"
    "SuperResIDWE6K3(96,160,2,96,3)SuperResIDWE6K3(160,320,1,160,1)"
    "SuperConvK1BNRELU(320,1280,1,1)@224"
)
LANDMARKS = {
    "EA_our_vote": EA_OUR_VOTE,
    "EA_our_vote_600M": EA_OUR_VOTE_600M,
    "MobileNetV2": MOBILENET_V2,
}
"""SPEC 8's architectures by the names the paper's code gives them (`spaces.LANDMARKS`)."""

_TOKEN = re.compile(r"(SuperConvK(\d+)BNRELU|SuperResIDWE(\d+)K(\d+))\(([^()]*)\)")


def smart_round(x: float, base: int | None = None) -> int:
    """Zen-NAS's channel rounding: the nearest multiple of `base` (Python's round, halves to
    even), never below `base`; without a base, 8 up to 128, 16 up to 256, 32 above."""
    if base is None:
        base = 32 if x > 256 else 16 if x > 128 else 8
    return max(base, round(x / float(base)) * base)


@dataclasses.dataclass(frozen=True)
class ConvBlock:
    """`SuperConvK{kernel}BNRELU(in,out,stride,layers)`: `layers` x (conv k x k, BN, ReLU);
    the stride applies to the first layer."""

    kernel: int
    in_channels: int
    out_channels: int
    stride: int
    layers: int

    @property
    def name(self) -> str:
        return f"SuperConvK{self.kernel}BNRELU"

    def text(self) -> str:
        return f"{self.name}({self.in_channels},{self.out_channels},{self.stride},{self.layers})"


@dataclasses.dataclass(frozen=True)
class ResBlock:
    """`SuperResIDWE{expansion}K{kernel}(in,out,stride,bottleneck,layers)`: `layers` inverted
    residual sub-blocks with squeeze-and-excitation; the stride applies to the first."""

    expansion: int
    kernel: int
    in_channels: int
    out_channels: int
    stride: int
    bottleneck: int
    layers: int

    @property
    def name(self) -> str:
        return f"SuperResIDWE{self.expansion}K{self.kernel}"

    @property
    def dw_channels(self) -> int:
        """Width of the depthwise part: round8(bottleneck x expansion)."""
        return smart_round(self.bottleneck * self.expansion, base=8)

    def text(self) -> str:
        return (
            f"{self.name}({self.in_channels},{self.out_channels},{self.stride},"
            f"{self.bottleneck},{self.layers})"
        )


Block = ConvBlock | ResBlock


@dataclasses.dataclass(frozen=True)
class MBV2Arch:
    """A block list and the input resolution the network resizes its images to."""

    blocks: tuple[Block, ...]
    resolution: int

    @property
    def block_string(self) -> str:
        return "".join(block.text() for block in self.blocks)

    @property
    def last_width(self) -> int:
        """Width of the classifier's input (the last block's output)."""
        return self.blocks[-1].out_channels

    def resolutions(self) -> list[int]:
        """The output resolution of every block (the reference's `res // stride`)."""
        out, res = [], self.resolution
        for block in self.blocks:
            res //= block.stride
            out.append(res)
        return out


def _short(text: str) -> str:
    """An architecture quoted in an error: long block strings are cut in the middle."""
    return repr(text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}")


def _block(match: re.Match, arch: str) -> Block:
    name, args_text, where = match.group(1), match.group(5), _short(arch)
    try:
        args = [int(a) for a in args_text.split(",")]
    except ValueError:
        raise ArchError(f"{where}: {name}({args_text}) must have integer arguments") from None
    if match.group(2) is not None:
        kernel = int(match.group(2))
        if kernel not in CONV_KERNELS:
            raise ArchError(f"{where}: {name}: kernel must be one of {CONV_KERNELS}")
        if len(args) != 4:
            raise ArchError(f"{where}: {name} takes 4 arguments (in,out,stride,layers)")
        return ConvBlock(kernel, *args)
    expansion, kernel = int(match.group(3)), int(match.group(4))
    if expansion not in EXPANSIONS or kernel not in RES_KERNELS:
        raise ArchError(
            f"{where}: {name}: expansion must be one of {EXPANSIONS} and kernel one of "
            f"{RES_KERNELS}"
        )
    if len(args) != 5:
        raise ArchError(f"{where}: {name} takes 5 arguments (in,out,stride,bottleneck,layers)")
    return ResBlock(expansion, kernel, *args)


def parse(text: str) -> MBV2Arch:
    """`<block string>@<resolution>` -> MBV2Arch, validated (`validate`)."""
    if not isinstance(text, str):
        raise ArchError(f"architecture must be a string, got {type(text).__name__}")
    arch = text.strip()
    where = _short(arch)
    blocks_text, at, resolution_text = arch.rpartition("@")
    if not at:
        raise ArchError(f"{where}: missing '@<resolution>' after the block string")
    if not resolution_text.isdigit():
        raise ArchError(f"{where}: resolution {resolution_text!r} must be a positive integer")
    blocks, position = [], 0
    for match in _TOKEN.finditer(blocks_text):
        if match.start() != position:
            raise ArchError(
                f"{where}: unknown block at {blocks_text[position : match.start()][:40]!r}"
            )
        blocks.append(_block(match, arch))
        position = match.end()
    if position != len(blocks_text):
        raise ArchError(f"{where}: unknown block at {blocks_text[position:][:40]!r}")
    return validate(MBV2Arch(tuple(blocks), int(resolution_text)))


def validate(arch: MBV2Arch) -> MBV2Arch:
    """Check that `arch` can be built: widths chain from RGB, strides are 1 or 2, depths and
    widths positive, and every stride-2 layer halves an even resolution."""
    text = format_arch(arch)
    if not arch.blocks:
        raise ArchError(f"{_short(text)}: no block")
    if arch.resolution < 1:
        raise ArchError(f"{_short(text)}: resolution must be positive")
    previous = IN_CHANNELS
    res = arch.resolution
    for index, block in enumerate(arch.blocks):
        where = f"{_short(text)}: block {index} {block.text()}"
        widths = [block.in_channels, block.out_channels]
        if isinstance(block, ResBlock):
            widths.append(block.bottleneck)
        if min(widths) < 1 or block.layers < 1:
            raise ArchError(f"{where}: widths and layers must be positive")
        if block.in_channels != previous:
            raise ArchError(
                f"{where}: input width {block.in_channels} does not match the "
                f"{'image channels' if index == 0 else 'previous output width'} {previous}"
            )
        if block.stride not in (1, 2):
            raise ArchError(f"{where}: stride must be 1 or 2")
        if block.stride == 2 and res % 2:
            raise ArchError(
                f"{where}: stride 2 on an odd resolution {res} (input {arch.resolution}); "
                "use a resolution divisible by 2 per stride-2 block"
            )
        res //= block.stride
        previous = block.out_channels
    return arch


def format_arch(arch: MBV2Arch) -> str:
    """MBV2Arch -> its one-token text form `<block string>@<resolution>`."""
    return f"{arch.block_string}@{arch.resolution}"
