"""The MobileNetV2 search space (SPEC 7, 8): its ranges, random sampling, the evolutionary
mutation and the categorical choices of REINFORCE, drawn the way the paper's search code
draws them.

The drawing logic is written once against `Draws` (choice, k distinct, uniform float), with
two adapters: `numpy.random.Generator`, what the project's searches pass around, and
Python's `random.Random`, the reference's generator. With the latter the draws are the
reference's call for call: `sample(random.Random(11), n=12)` gives the 12 architectures of
`mbv2_reference_sample.csv` in order, as the reference's `sample_arch` did after
`random.seed(11)`.

Quirks of the reference kept here:

- Widths, bottlenecks and the resolution are drawn uniformly from the raw integer range
  and then rounded (`smart_round`, halves to even), so the rounded values are not uniform:
  16..48 gives 16, 24, 32, 40, 48 with weights 5, 7, 9, 7, 5 of 33, and 192..320 gives
  the resolutions 192, 224, 256, 288, 320 with weights 17, 31, 33, 31, 17 of 129.
- REINFORCE's grid (`from_choices`) is uniform over the same values instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from wrcor_jax.spaces.base import ArchError
from wrcor_jax.spaces.mbv2.arch import (
    EXPANSIONS,
    IN_CHANNELS,
    RES_KERNELS,
    ConvBlock,
    MBV2Arch,
    ResBlock,
    smart_round,
    validate,
)
from wrcor_jax.spaces.mbv2.cost import describe

T = TypeVar("T")

N_RES_BLOCKS = 7
MAX_REDRAWS = 10_000  # draws per architecture before a FLOPs limit is declared unreachable

Span = tuple[int, int]  # an inclusive integer range (lo, hi)


@dataclasses.dataclass(frozen=True)
class SearchRanges:
    """The space's ranges, inclusive. Widths are the 9 positions (stem out, the 7 SuperResIDWE
    blocks' outs, the final 1x1 conv's out), bottlenecks and depths the 7 blocks'. Ends of
    width and resolution ranges are multiples of their rounding base, so the values the
    rounded draws reach, the REINFORCE grid min + base x i, and the range agree."""

    widths: tuple[Span, ...] = (
        (16, 48), (16, 48), (16, 48), (32, 64), (48, 96),
        (80, 256), (80, 256), (128, 512), (128, 1536),
    )  # fmt: skip
    bottlenecks: tuple[Span, ...] = (
        (16, 48), (16, 48), (16, 48), (32, 64), (48, 96), (80, 256), (80, 256),
    )  # fmt: skip
    depths: tuple[Span, ...] = ((1, 2), (2, 3), (2, 3), (2, 4), (2, 6), (2, 6), (1, 2))
    expansions: tuple[int, ...] = EXPANSIONS
    kernels: tuple[int, ...] = RES_KERNELS
    stride2_blocks: int = 4
    resolutions: Span = (192, 320)
    width_base: int = 8
    resolution_base: int = 32

    def __post_init__(self) -> None:
        for name in ("widths", "bottlenecks", "depths"):  # lists become hashable tuples
            object.__setattr__(self, name, tuple(tuple(span) for span in getattr(self, name)))
        for name in ("expansions", "kernels", "resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problem = self._problem()
        if problem:
            raise ValueError(f"SearchRanges: {problem}")

    def _problem(self) -> str | None:
        if (len(self.widths), len(self.bottlenecks), len(self.depths)) != (9, 7, 7):
            return "need 9 width, 7 bottleneck and 7 depth ranges"
        if any(len(span) != 2 for span in (*self.widths, *self.bottlenecks, *self.depths)):
            return "every range must be a (lo, hi) pair"
        if self.width_base < 1 or self.resolution_base < 1:
            return "rounding bases must be positive"
        aligned = [(span, self.width_base) for span in self.widths + self.bottlenecks]
        aligned.append((self.resolutions, self.resolution_base))
        for (lo, hi), base in aligned:
            if not base <= lo <= hi or lo % base or hi % base:
                return f"range {lo}..{hi} must have base <= lo <= hi, multiples of {base}"
        if any(not 1 <= lo <= hi for lo, hi in self.depths):
            return "depth ranges need 1 <= lo <= hi"
        for name, allowed in (("expansions", EXPANSIONS), ("kernels", RES_KERNELS)):
            values = getattr(self, name)
            if not values or not set(values) <= set(allowed) or len(set(values)) < len(values):
                return f"{name} must be distinct values of {allowed}"
        if not 0 <= self.stride2_blocks <= N_RES_BLOCKS:
            return f"stride2_blocks must be in 0..{N_RES_BLOCKS}"
        if self.resolution_base % 2 ** (self.stride2_blocks + 1):
            return (
                f"resolution_base must be a multiple of {2 ** (self.stride2_blocks + 1)} so "
                f"the stem and {self.stride2_blocks} stride-2 blocks halve it evenly"
            )
        return None


REFERENCE_RANGES = SearchRanges()


def _values(span: Span, step: int = 1) -> range:
    return range(span[0], span[1] + 1, step)


def _stride_patterns(ranges: SearchRanges) -> tuple[tuple[int, ...], ...]:
    """The sets of stride-2 blocks, in lexicographic order (REINFORCE's categories)."""
    return tuple(itertools.combinations(range(N_RES_BLOCKS), ranges.stride2_blocks))


# ---- draws -----------------------------------------------------------------------------


@runtime_checkable
class Draws(Protocol):
    """The random draws the space needs; the two adapters below implement it."""

    def choice(self, options: Sequence[T]) -> T: ...

    def sample(self, options: Sequence[T], k: int) -> list[T]: ...

    def random(self) -> float: ...


class PythonDraws:
    """`random.Random`'s own choice/sample/random: the reference's draws, call for call."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: Sequence[T]) -> T:
        return self.rng.choice(options)

    def sample(self, options: Sequence[T], k: int) -> list[T]:
        return self.rng.sample(options, k)

    def random(self) -> float:
        return self.rng.random()


class NumpyDraws:
    """The same draws from a `numpy.random.Generator` (different numbers, same law)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def sample(self, options: Sequence[T], k: int) -> list[T]:
        return [options[int(i)] for i in self.rng.choice(len(options), size=k, replace=False)]

    def random(self) -> float:
        return float(self.rng.random())


def draws(rng: np.random.Generator | random.Random | Draws) -> Draws:
    """The `Draws` adapter for a numpy Generator or a Python Random (a Draws passes through)."""
    if isinstance(rng, random.Random):
        return PythonDraws(rng)
    if isinstance(rng, np.random.Generator):
        return NumpyDraws(rng)
    if isinstance(rng, Draws):
        return rng
    raise ValueError(
        f"rng must be a numpy.random.Generator or a random.Random, got {type(rng).__name__}"
    )


# ---- the space's shape and ranges ---------------------------------------------------------


def _shape_problems(arch: MBV2Arch, ranges: SearchRanges) -> list[str]:
    """What keeps `arch` from having the space's block structure and stride count."""
    if len(arch.blocks) != N_RES_BLOCKS + 2:
        return [
            f"{len(arch.blocks)} blocks; the space has 9 (stem, 7 SuperResIDWE, final 1x1 conv)"
        ]
    stem, *res_blocks, final = arch.blocks
    out = []
    if not (
        isinstance(stem, ConvBlock)
        and (stem.kernel, stem.in_channels, stem.stride, stem.layers) == (3, IN_CHANNELS, 2, 1)
    ):
        out.append(f"block 0 is {stem.text()}, not the stem SuperConvK3BNRELU(3,c,2,1)")
    for index, block in enumerate(res_blocks, start=1):
        if not isinstance(block, ResBlock):
            out.append(f"block {index} is {block.text()}, not a SuperResIDWE block")
    if not (
        isinstance(final, ConvBlock) and (final.kernel, final.stride, final.layers) == (1, 1, 1)
    ):
        out.append(f"block 8 is {final.text()}, not the final SuperConvK1BNRELU(c,c,1,1)")
    stride2 = sum(block.stride == 2 for block in res_blocks)
    if stride2 != ranges.stride2_blocks:
        out.append(
            f"{stride2} SuperResIDWE blocks have stride 2; the space has {ranges.stride2_blocks}"
        )
    return out


def _widths(arch: MBV2Arch) -> list[int]:
    return [block.out_channels for block in arch.blocks]


def problems(arch: MBV2Arch, ranges: SearchRanges = REFERENCE_RANGES) -> list[str]:
    """Why `arch` is outside the search space, one line each; empty when it is inside."""
    try:
        validate(arch)
    except ArchError as error:
        return [str(error)]
    out = _shape_problems(arch, ranges)
    if out:
        return out
    res_blocks = arch.blocks[1:-1]
    base = ranges.width_base
    checks = [
        (f"width {i}", value, _values(span, base))
        for i, (value, span) in enumerate(zip(_widths(arch), ranges.widths, strict=True))
    ]
    for i, block in enumerate(res_blocks):
        checks += [
            (f"block {i + 1} bottleneck", block.bottleneck, _values(ranges.bottlenecks[i], base)),
            (f"block {i + 1} depth", block.layers, _values(ranges.depths[i])),
            (f"block {i + 1} expansion", block.expansion, ranges.expansions),
            (f"block {i + 1} kernel", block.kernel, ranges.kernels),
        ]
    checks.append(
        ("resolution", arch.resolution, _values(ranges.resolutions, ranges.resolution_base))
    )
    return [
        f"{what} is {value}, not in {_describe_values(allowed)}"
        for what, value, allowed in checks
        if value not in allowed
    ]


def _describe_values(allowed: Sequence[int]) -> str:
    if isinstance(allowed, range) and len(allowed) > 1:
        step = f" step {allowed.step}" if allowed.step != 1 else ""
        return f"{allowed.start}..{allowed[-1]}{step}"
    return str(tuple(allowed))


def _build(
    widths: Sequence[int],
    bottlenecks: Sequence[int],
    depths: Sequence[int],
    expansions: Sequence[int],
    kernels: Sequence[int],
    stride2: Sequence[int],
    resolution: int,
) -> MBV2Arch:
    """The space's block list from its 9 widths and the 7 blocks' settings."""
    blocks: list[ConvBlock | ResBlock] = [ConvBlock(3, IN_CHANNELS, widths[0], 2, 1)]
    for i in range(N_RES_BLOCKS):
        stride = 2 if i in stride2 else 1
        blocks.append(
            ResBlock(
                expansions[i], kernels[i], widths[i], widths[i + 1], stride, bottlenecks[i],
                depths[i],
            )
        )  # fmt: skip
    blocks.append(ConvBlock(1, widths[7], widths[8], 1, 1))
    return validate(MBV2Arch(tuple(blocks), resolution))


# ---- sampling and mutation ----------------------------------------------------------------


def _count(value: object, name: str, least: int = 1) -> int:
    """`value` as a plain int >= `least` (numpy integers too; bools and floats rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


@functools.cache
def smallest_flops(num_classes: int = 1000, ranges: SearchRanges = REFERENCE_RANGES) -> int:
    """The fewest FLOPs (at `num_classes`) of any architecture of the space: every width,
    bottleneck, depth, expansion, kernel and the resolution at its least (each count grows
    with every one of them), over the stride patterns."""
    counts = choices(ranges)
    patterns = range(counts[-2])
    return min(
        describe(from_choices([0] * (len(counts) - 2) + [s, 0], ranges), num_classes).flops
        for s in patterns
    )


def _within_limit(
    draw: Callable[[], MBV2Arch], flops_limit: int | None, num_classes: int, ranges: SearchRanges
) -> MBV2Arch:
    """Draw until the reference's FLOPs (at `num_classes`) are within the limit, as the
    reference does, but give up at once below the space's least FLOPs, and after
    MAX_REDRAWS draws."""
    if flops_limit is not None and flops_limit < smallest_flops(num_classes, ranges):
        raise ValueError(
            f"no architecture of the space is within flops_limit={flops_limit:,}: the "
            f"smallest has {smallest_flops(num_classes, ranges):,} FLOPs (at {num_classes} "
            "classes)"
        )
    for _ in range(MAX_REDRAWS):
        arch = draw()
        if flops_limit is None or describe(arch, num_classes).flops <= flops_limit:
            return arch
    raise ValueError(
        f"no architecture within flops_limit={flops_limit:,} (at {num_classes} classes) in "
        f"{MAX_REDRAWS:,} draws; the limit is too small for this space"
    )


def _draw(d: Draws, ranges: SearchRanges) -> MBV2Arch:
    """One draw of the reference's `sample_arch`, in its order of calls."""
    base = ranges.width_base
    widths = [smart_round(d.choice(_values(span)), base=base) for span in ranges.widths]
    bottlenecks = [smart_round(d.choice(_values(span)), base=base) for span in ranges.bottlenecks]
    depths = [d.choice(_values(span)) for span in ranges.depths]
    expansions = [d.choice(ranges.expansions) for _ in range(N_RES_BLOCKS)]
    kernels = [d.choice(ranges.kernels) for _ in range(N_RES_BLOCKS)]
    stride2 = d.sample(range(N_RES_BLOCKS), ranges.stride2_blocks)
    resolution = smart_round(d.choice(_values(ranges.resolutions)), base=ranges.resolution_base)
    return _build(widths, bottlenecks, depths, expansions, kernels, stride2, resolution)


def sample(
    rng: np.random.Generator | random.Random | Draws,
    n: int = 1,
    flops_limit: int | None = 600_000_000,
    num_classes: int = 1000,
    ranges: SearchRanges = REFERENCE_RANGES,
) -> list[MBV2Arch]:
    """`n` random architectures of the space, each redrawn until its FLOPs at `num_classes`
    are <= `flops_limit` (None: no limit), as the reference's `sample_arch`."""
    n, num_classes = _count(n, "n", least=0), _count(num_classes, "num_classes")
    limit = None if flops_limit is None else _count(flops_limit, "flops_limit")
    d = draws(rng)
    return [_within_limit(lambda: _draw(d, ranges), limit, num_classes, ranges) for _ in range(n)]


def mutate(
    rng: np.random.Generator | random.Random | Draws,
    arch: MBV2Arch,
    flops_limit: int | None = 600_000_000,
    num_classes: int = 1000,
    ranges: SearchRanges = REFERENCE_RANGES,
    p: float = 1.0,
) -> MBV2Arch:
    """SPEC 7's MobileNetV2 mutation, the reference's `Evolved_NAS.mutate`, call for call.

    Pick SuperResIDWE block i (0..6); with probability p a different (expansion, kernel)
    pair, else keep it; draw its input width from width range i (the width the previous
    block, or the stem for i = 0, now outputs), its bottleneck from bottleneck range i and
    its depth from depth range i; keep its output width and stride; draw a new resolution.
    Redraw everything, from the parent, until the FLOPs are within the limit.

    The reference finds block i by counting ')' in the block string (block i + 1 of the
    list, the previous one being block i) and indexes its ranges with i as `sample_arch`
    does: no off-by-one, checked by replaying its draws. It draws `random()` against p even
    when p = 1, and a changed pair by redrawing both until one differs; both are kept so the
    Python adapter replays it call for call. A child can equal its parent only when p < 1.
    The parent needs the space's block structure and stride count, not its ranges (a parent
    above the limit, or a hand-made one, mutates the same way).
    """
    num_classes = _count(num_classes, "num_classes")
    limit = None if flops_limit is None else _count(flops_limit, "flops_limit")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if p > 0 and len(ranges.expansions) * len(ranges.kernels) < 2:
        raise ValueError("mutation needs at least two (expansion, kernel) pairs in the ranges")
    shape = _shape_problems(validate(arch), ranges)
    if shape:
        raise ArchError(f"cannot mutate an architecture outside the space's shape: {shape[0]}")
    d = draws(rng)

    def draw() -> MBV2Arch:
        i = d.choice(range(N_RES_BLOCKS))
        old = arch.blocks[i + 1]
        assert isinstance(old, ResBlock)
        expansion, kernel = old.expansion, old.kernel
        if d.random() < p:
            while (expansion, kernel) == (old.expansion, old.kernel):
                expansion, kernel = d.choice(ranges.expansions), d.choice(ranges.kernels)
        width = smart_round(d.choice(_values(ranges.widths[i])), base=ranges.width_base)
        bottleneck = smart_round(d.choice(_values(ranges.bottlenecks[i])), ranges.width_base)
        depth = d.choice(_values(ranges.depths[i]))
        resolution = smart_round(d.choice(_values(ranges.resolutions)), ranges.resolution_base)
        blocks = list(arch.blocks)
        blocks[i] = dataclasses.replace(blocks[i], out_channels=width)
        blocks[i + 1] = ResBlock(
            expansion, kernel, width, old.out_channels, old.stride, bottleneck, depth
        )
        return validate(MBV2Arch(tuple(blocks), resolution))

    return _within_limit(draw, limit, num_classes, ranges)


# ---- REINFORCE's categorical choices ------------------------------------------------------


def choices(ranges: SearchRanges = REFERENCE_RANGES) -> tuple[int, ...]:
    """The number of categories of each decision of the REINFORCE policy, in the reference's
    order: 9 widths, 7 bottlenecks, 7 depths, 7 expansions, 7 kernels, the stride pattern,
    the resolution (39 decisions).

    Widths and bottlenecks take min + 8 i up to the range's max, depths min + i, the
    resolution min + 32 i (the reference's `generate_arch`; with the ranges' ends multiples
    of the base both ends are reachable). The reference draws the stride-2 blocks as 4
    categoricals over the 7 blocks and redraws until the 4 differ; one categorical over the
    C(7, 4) = 35 sets has the same support (every set of 4 distinct blocks, and nothing
    else, since the order of the 4 does not change the architecture) with one log-prob.
    """
    width_counts = [len(_values(span, ranges.width_base)) for span in ranges.widths]
    bottleneck_counts = [len(_values(span, ranges.width_base)) for span in ranges.bottlenecks]
    return (
        *width_counts,
        *bottleneck_counts,
        *(len(_values(span)) for span in ranges.depths),
        *[len(ranges.expansions)] * N_RES_BLOCKS,
        *[len(ranges.kernels)] * N_RES_BLOCKS,
        math.comb(N_RES_BLOCKS, ranges.stride2_blocks),
        len(_values(ranges.resolutions, ranges.resolution_base)),
    )


def _split(values: Sequence[int]) -> tuple[Sequence[int], ...]:
    """Decisions by kind: widths, bottlenecks, depths, expansions, kernels, strides, res."""
    edges = list(itertools.accumulate((0, 9, 7, 7, 7, 7, 1, 1)))
    return tuple(values[a:b] for a, b in itertools.pairwise(edges))


def from_choices(indices: Sequence[int], ranges: SearchRanges = REFERENCE_RANGES) -> MBV2Arch:
    """The architecture that one category per decision (`choices` order) picks. No FLOPs
    check: the caller applies the limit, as the reference's `select_generate` does."""
    counts = choices(ranges)
    indices = list(indices)
    if len(indices) != len(counts):
        raise ValueError(f"need {len(counts)} choice indices, got {len(indices)}")
    for position, (index, count) in enumerate(zip(indices, counts, strict=True)):
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise ValueError(f"choice {position} must be an integer, got {index!r}")
        if not 0 <= index < count:
            raise ValueError(f"choice {position} is {index}, must be in 0..{count - 1}")
    w, b, depth, e, k, s, r = _split([int(i) for i in indices])
    base = ranges.width_base
    return _build(
        [span[0] + base * i for span, i in zip(ranges.widths, w, strict=True)],
        [span[0] + base * i for span, i in zip(ranges.bottlenecks, b, strict=True)],
        [span[0] + i for span, i in zip(ranges.depths, depth, strict=True)],
        [ranges.expansions[i] for i in e],
        [ranges.kernels[i] for i in k],
        _stride_patterns(ranges)[s[0]],
        ranges.resolutions[0] + ranges.resolution_base * r[0],
    )


def to_choices(arch: MBV2Arch, ranges: SearchRanges = REFERENCE_RANGES) -> tuple[int, ...]:
    """The category indices that pick `arch` (`from_choices`'s inverse); every architecture
    inside the space has them, others raise ArchError."""
    found = problems(arch, ranges)
    if found:
        raise ArchError(f"outside the search space: {found[0]}")
    res_blocks = [block for block in arch.blocks[1:-1] if isinstance(block, ResBlock)]
    base = ranges.width_base
    stride2 = tuple(i for i, block in enumerate(res_blocks) if block.stride == 2)
    return (
        *((w - span[0]) // base for w, span in zip(_widths(arch), ranges.widths, strict=True)),
        *(
            (blk.bottleneck - span[0]) // base
            for blk, span in zip(res_blocks, ranges.bottlenecks, strict=True)
        ),
        *(blk.layers - span[0] for blk, span in zip(res_blocks, ranges.depths, strict=True)),
        *(ranges.expansions.index(blk.expansion) for blk in res_blocks),
        *(ranges.kernels.index(blk.kernel) for blk in res_blocks),
        _stride_patterns(ranges).index(stride2),
        (arch.resolution - ranges.resolutions[0]) // ranges.resolution_base,
    )
