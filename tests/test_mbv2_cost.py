"""cost.describe: the reference's FLOPs and parameter counts (SPEC 8, the shared CSV, and our
own measurements of the reference in tests/data/mbv2_reference_counts.csv)."""

import csv
import json
from pathlib import Path

import pytest

from wrcor_jax.spaces.base import ArchError
from wrcor_jax.spaces.mbv2.arch import (
    EA_OUR_VOTE,
    EA_OUR_VOTE_600M,
    MOBILENET_V2,
    ConvBlock,
    MBV2Arch,
    ResBlock,
    format_arch,
    parse,
)
from wrcor_jax.spaces.mbv2.cost import BlockCost, Description, describe

SHARED_SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "mbv2_reference_sample.csv"
REFERENCE_COUNTS = Path(__file__).parent / "data" / "mbv2_reference_counts.csv"


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        pytest.skip(f"{path} not found")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("text", "mflops", "mparams", "flops", "params"),
    [
        (EA_OUR_VOTE, 1658.3, 8.504, 1_658_275_280, 8_503_880),
        (EA_OUR_VOTE_600M, 591.7, 10.807, 591_710_478, 10_807_432),
        (MOBILENET_V2, 277.0, 4.466, 277_036_312, 4_465_880),
    ],
)
def test_spec_numbers(text: str, mflops: float, mparams: float, flops: int, params: int) -> None:
    """SPEC 8's rounded numbers, and the exact integers the reference gave for them."""
    d = describe(parse(text))
    assert (round(d.flops / 1e6, 1), round(d.params / 1e6, 3)) == (mflops, mparams)
    assert (d.flops, d.params) == (flops, params)


def test_shared_reference_sample() -> None:
    """All 12 rows of ../shared/data/mbv2_reference_sample.csv, exactly."""
    rows = read_csv(SHARED_SAMPLE)
    assert len(rows) == 12
    for row in rows:
        d = describe(parse(row["arch"]), 1000)
        assert (d.flops, d.params) == (int(row["flops_1000cls"]), int(row["params_1000cls"]))


def test_reference_counts_fixture() -> None:
    """Our measurements of the reference on seeded random networks, in and out of the space
    (experiments/mbv2_reference_counts.py)."""
    rows = read_csv(REFERENCE_COUNTS)
    assert len(rows) >= 100
    assert {int(row["num_classes"]) for row in rows} >= {10, 1000}
    for row in rows:
        d = describe(parse(row["arch"]), int(row["num_classes"]))
        assert (d.flops, d.params) == (int(row["flops"]), int(row["params"])), row["arch"]


def test_block_rows() -> None:
    arch = parse(EA_OUR_VOTE_600M)
    d = describe(arch, 10)
    assert isinstance(d, Description)
    assert d.arch == EA_OUR_VOTE_600M and d.resolution == 224 and d.num_classes == 10
    assert [row.name for row in d.blocks] == [b.name for b in arch.blocks] + ["Linear"]
    assert [row.output_resolution for row in d.blocks] == [112, 56, 28, 28, 14, 14, 7, 7, 7, 1]
    assert sum(row.flops for row in d.blocks) == d.flops
    assert sum(row.params for row in d.blocks) == d.params
    stem, first, linear = d.blocks[0], d.blocks[1], d.blocks[-1]
    assert (stem.bottleneck, stem.dw_channels, stem.stride, stem.layers) == (None, None, 2, 1)
    assert (first.in_channels, first.out_channels, first.bottleneck, first.dw_channels) == (
        48, 32, 40, 80,
    )  # fmt: skip
    assert linear == BlockCost("Linear", 1264, 10, 1, 1, None, None, 1, 12_640, 12_650)


def test_as_dict_is_json_ready() -> None:
    d = describe(parse(MOBILENET_V2))
    data = json.loads(json.dumps(d.as_dict()))
    assert data["flops"] == d.flops and data["params"] == d.params and data["arch"] == d.arch
    assert len(data["blocks"]) == 10 and data["blocks"][-1]["name"] == "Linear"
    assert data["blocks"][2]["dw_channels"] == 96 and data["blocks"][0]["bottleneck"] is None


def test_classes_change_only_the_classifier() -> None:
    arch = parse(MOBILENET_V2)
    a, b = describe(arch, 1000), describe(arch, 10)
    assert a.flops - b.flops == 1280 * 990
    assert a.params - b.params == 1281 * 990
    assert a.blocks[:-1] == b.blocks[:-1]


def test_stride2_shortcut_quirk() -> None:
    """The first sub-block's shortcut (1x1 conv with bias, BN) is counted at (output
    resolution / stride)^2: hand counts of one sub-block (in = out = dw = 8, SE 8 -> 2) at an
    8x8 input; the reference gives 19,496 and 7,496."""

    def one_block(stride: int) -> int:
        block = ResBlock(1, 3, 8, 8, stride, 8, 1)
        return describe(MBV2Arch((ConvBlock(3, 3, 8, 1, 1), block), 8), 1).blocks[1].flops

    def by_hand(r_out: int, shortcut_area: int) -> int:
        expand = 8 * 8 * 8**2 + 8**2 * 8  # 1x1 conv at the input resolution, BN
        depthwise = 8 * 9 * r_out**2 + r_out**2 * 8  # 3x3 depthwise, BN
        se = 2 * 8 * 2 + 8 + 8 * r_out**2
        project = 8 * 8 * r_out**2 + r_out**2 * 8  # 1x1 conv, BN
        return expand + depthwise + se + project + (8 * 8 + 8) * shortcut_area

    assert one_block(1) == by_hand(8, 8**2) == 19_496
    assert one_block(2) == by_hand(4, 2**2) == 7_496  # (4 / 2)^2, not 4^2


def test_fractional_reference_flops_truncate() -> None:
    """A stride-2 block with an odd output resolution and out x (in + 1) not a multiple of
    4 has a fractional reference count; `flops` is its int() (the reference: 42,746.5)."""
    d = describe(parse("SuperConvK3BNRELU(3,5,1,1)SuperResIDWE1K3(5,3,2,1,1)@14"), 1)
    assert (d.flops, d.blocks[1].flops) == (42_746, 15_303)


def test_bad_input() -> None:
    arch = parse(MOBILENET_V2)
    for bad in (0, -3, True, 2.0, "10"):
        with pytest.raises(ValueError, match="num_classes"):
            describe(arch, bad)
    unchained = MBV2Arch((ConvBlock(3, 3, 16, 2, 1), ConvBlock(1, 8, 8, 1, 1)), 32)
    with pytest.raises(ArchError, match="does not match"):
        describe(unchained)
    assert format_arch(arch) == MOBILENET_V2
