"""sampling: the MobileNetV2 search space (SPEC 7, 8) drawn as the reference's search.py does."""

import csv
import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from wrcor_jax.spaces.base import ArchError
from wrcor_jax.spaces.mbv2.arch import (
    EA_OUR_VOTE,
    ConvBlock,
    MBV2Arch,
    ResBlock,
    format_arch,
    parse,
)
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.spaces.mbv2.sampling import (
    REFERENCE_RANGES,
    Draws,
    NumpyDraws,
    PythonDraws,
    SearchRanges,
    choices,
    draws,
    from_choices,
    mutate,
    problems,
    sample,
    smallest_flops,
    to_choices,
)

SHARED_SAMPLE = Path(__file__).parents[1].parent / "shared" / "data" / "mbv2_reference_sample.csv"
LIMIT = 600_000_000


def reference_sample() -> list[str]:
    if not SHARED_SAMPLE.exists():
        pytest.skip(f"{SHARED_SAMPLE} not found")
    with SHARED_SAMPLE.open(newline="") as f:
        return [row["arch"] for row in csv.DictReader(f)]


def texts(archs: list[MBV2Arch]) -> list[str]:
    return [format_arch(arch) for arch in archs]


@pytest.fixture(scope="module")
def archs() -> list[MBV2Arch]:
    """300 numpy-drawn samples within 600M FLOPs at 1000 classes."""
    return sample(np.random.default_rng(0), n=300)


def test_python_random_replays_the_reference_sampler() -> None:
    """The shared CSV's 12 archs are the reference's sample_arch after random.seed(11)."""
    assert texts(sample(random.Random(11), n=12)) == reference_sample()


# Chains of 3 mutations of the CSV's first arch by the reference's own Evolved_NAS.mutate
# after random.seed(seed) (run from its source with our harness; dataset ImageNet1k = 1000
# classes, cifar10 = 10).
REFERENCE_MUTANTS = [
    (5, 1.0, 1000, LIMIT,
     "SuperConvK3BNRELU(3,48,2,1)SuperResIDWE1K5(48,48,2,24,1)SuperResIDWE1K5(48,48,1,24,3)"
     "SuperResIDWE1K7(48,40,2,48,3)SuperResIDWE6K7(40,96,2,48,2)SuperResIDWE4K7(96,128,2,88,6)"
     "SuperResIDWE1K3(128,96,1,104,3)SuperResIDWE2K7(96,392,1,120,1)"
     "SuperConvK1BNRELU(392,1104,1,1)@256"),
    (6, 0.5, 10, LIMIT,
     "SuperConvK3BNRELU(3,40,2,1)SuperResIDWE6K7(40,48,2,32,1)SuperResIDWE1K5(48,48,1,24,3)"
     "SuperResIDWE1K7(48,56,2,48,3)SuperResIDWE2K3(56,88,2,40,2)SuperResIDWE2K7(88,128,2,56,6)"
     "SuperResIDWE1K3(128,96,1,104,3)SuperResIDWE6K7(96,392,1,208,2)"
     "SuperConvK1BNRELU(392,1104,1,1)@256"),
    (7, 1.0, 1000, 300_000_000,
     "SuperConvK3BNRELU(3,24,2,1)SuperResIDWE1K7(24,48,2,32,2)SuperResIDWE1K5(48,16,1,24,3)"
     "SuperResIDWE6K7(16,64,2,16,2)SuperResIDWE2K3(64,56,2,48,4)SuperResIDWE2K3(56,128,2,72,5)"
     "SuperResIDWE1K3(128,128,1,104,3)SuperResIDWE6K7(128,392,1,216,1)"
     "SuperConvK1BNRELU(392,1104,1,1)@224"),
]  # fmt: skip


@pytest.mark.parametrize(("seed", "p", "num_classes", "limit", "expected"), REFERENCE_MUTANTS)
def test_python_random_replays_the_reference_mutation(
    seed: int, p: float, num_classes: int, limit: int, expected: str
) -> None:
    rng = random.Random(seed)
    child = parse(reference_sample()[0])
    for _ in range(3):
        child = mutate(rng, child, flops_limit=limit, num_classes=num_classes, p=p)
    assert format_arch(child) == expected


def test_parse_format_round_trip(archs: list[MBV2Arch]) -> None:
    for arch in archs:
        assert parse(format_arch(arch)) == arch


@pytest.mark.parametrize("make", [np.random.default_rng, random.Random])
def test_deterministic_per_seed(make) -> None:
    assert texts(sample(make(3), n=5)) == texts(sample(make(3), n=5))
    assert texts(sample(make(3), n=5)) != texts(sample(make(4), n=5))
    parent = sample(make(0))[0]
    assert mutate(make(9), parent) == mutate(make(9), parent)


def test_samples_inside_the_space_and_limit(archs: list[MBV2Arch]) -> None:
    for arch in archs:
        assert problems(arch) == []
        assert describe(arch).flops <= LIMIT
    assert len(set(texts(archs))) == len(archs)
    for arch in sample(random.Random(1), n=30, flops_limit=200_000_000, num_classes=10):
        assert problems(arch) == [] and describe(arch, 10).flops <= 200_000_000
    unlimited = sample(np.random.default_rng(1), n=60, flops_limit=None)
    assert all(problems(arch) == [] for arch in unlimited)
    assert max(describe(arch).flops for arch in unlimited) > LIMIT


def test_sampled_values_cover_the_ranges(archs: list[MBV2Arch]) -> None:
    """Rounding the raw draws reaches both ends of the ranges and every resolution."""
    widths = list(zip(*[[b.out_channels for b in arch.blocks] for arch in archs], strict=True))
    assert [(min(w), max(w)) for w in widths[:7]] == list(REFERENCE_RANGES.widths[:7])
    assert {arch.resolution for arch in archs} == {192, 224, 256, 288, 320}
    assert {len([b for b in arch.blocks if b.stride == 2]) for arch in archs} == {5}


def changed_fields(before: object, after: object) -> set[str]:
    return {f for f in vars(before) if getattr(before, f) != getattr(after, f)}


@pytest.mark.parametrize("p", [1.0, 0.0])
def test_mutation_changes_only_what_it_may(archs: list[MBV2Arch], p: float) -> None:
    rng = np.random.default_rng(5)
    for parent in archs[:100]:
        child = mutate(rng, parent, num_classes=10, p=p)
        assert problems(child) == [] and describe(child, 10).flops <= LIMIT
        changed = [
            i for i, (a, b) in enumerate(zip(parent.blocks, child.blocks, strict=True)) if a != b
        ]
        if not changed:  # the same (expansion, kernel) and the same draws; p = 0 only
            assert p == 0.0
            continue
        i = max(changed)  # the mutated SuperResIDWE block (its input width may be unchanged)
        assert 1 <= i <= 7 and min(changed) >= i - 1
        old, new = parent.blocks[i], child.blocks[i]
        allowed = {"in_channels", "bottleneck", "layers", "expansion", "kernel"}
        assert changed_fields(old, new) <= allowed
        assert changed_fields(parent.blocks[i - 1], child.blocks[i - 1]) <= {"out_channels"}
        assert child.blocks[i - 1].out_channels == new.in_channels
        pair_changed = (old.expansion, old.kernel) != (new.expansion, new.kernel)
        assert pair_changed == (p == 1.0)


def test_mutation_of_a_parent_above_the_limit() -> None:
    """EA_our_vote (1658M at 320) mutates under the limit; with no limit anything goes."""
    parent = parse(EA_OUR_VOTE)
    child = mutate(random.Random(0), parent, flops_limit=1_000_000_000)
    assert describe(child).flops <= 1_000_000_000
    assert mutate(random.Random(0), parent, flops_limit=None) != parent


def test_choices_of_the_reference_space() -> None:
    counts = choices()
    widths, bottlenecks = (5, 5, 5, 5, 7, 23, 23, 49, 177), (5, 5, 5, 5, 7, 23, 23)
    depths = (2, 2, 2, 3, 5, 5, 2)
    assert counts == (*widths, *bottlenecks, *depths, *[4] * 7, *[3] * 7, 35, 5)


def test_choice_ends_and_round_trip(archs: list[MBV2Arch]) -> None:
    counts = choices()
    smallest = from_choices([0] * len(counts))
    largest = from_choices([c - 1 for c in counts])
    assert [b.out_channels for b in smallest.blocks] == [lo for lo, _ in REFERENCE_RANGES.widths]
    assert [b.out_channels for b in largest.blocks] == [hi for _, hi in REFERENCE_RANGES.widths]
    assert (smallest.resolution, largest.resolution) == (192, 320)
    assert [b.stride for b in smallest.blocks[1:-1]] == [2, 2, 2, 2, 1, 1, 1]
    assert [b.stride for b in largest.blocks[1:-1]] == [1, 1, 1, 2, 2, 2, 2]
    rng = np.random.default_rng(2)
    for _ in range(200):
        indices = tuple(int(rng.integers(c)) for c in counts)
        arch = from_choices(indices)
        assert problems(arch) == [] and to_choices(arch) == indices
    for arch in archs:
        assert from_choices(to_choices(arch)) == arch


def test_stride_categories_are_the_4_sets() -> None:
    """One categorical over C(7,4) = 35 patterns: each set of 4 stride-2 blocks once."""
    base = [0] * 37
    sets = []
    for s in range(35):
        arch = from_choices([*base[:37], s, 0])
        sets.append(tuple(i for i, b in enumerate(arch.blocks[1:-1]) if b.stride == 2))
    assert sets == list(itertools.combinations(range(7), 4))


def test_problems_name_what_is_outside() -> None:
    inside = parse(reference_sample()[0])
    assert problems(inside) == []
    blocks = list(inside.blocks)
    blocks[1] = ResBlock(1, 5, 48, 48, 2, 20, 3)  # bottleneck 20, depth 3
    assert problems(MBV2Arch(tuple(blocks), 352)) == [
        "block 1 bottleneck is 20, not in 16..48 step 8",
        "block 1 depth is 3, not in 1..2",
        "resolution is 352, not in 192..320 step 32",
    ]
    blocks = list(inside.blocks)
    blocks[0], blocks[1] = ConvBlock(3, 3, 56, 2, 1), ResBlock(1, 5, 56, 48, 2, 24, 1)
    assert problems(MBV2Arch(tuple(blocks), 320)) == ["width 0 is 56, not in 16..48 step 8"]
    no_k7 = SearchRanges(kernels=(3, 5))
    k7 = [i for i, b in enumerate(inside.blocks[1:-1], start=1) if b.kernel == 7]
    assert problems(inside, no_k7) == [f"block {i} kernel is 7, not in (3, 5)" for i in k7]
    assert "8 blocks" in problems(MBV2Arch(inside.blocks[:-1], 320))[0]
    stem5 = MBV2Arch((ConvBlock(5, 3, 48, 2, 1), *inside.blocks[1:]), 320)
    assert "not the stem" in problems(stem5)[0]
    one_more_stride = list(inside.blocks)
    one_more_stride[2] = ResBlock(1, 5, 48, 48, 2, 24, 3)
    assert (
        "5 SuperResIDWE blocks have stride 2" in problems(MBV2Arch(tuple(one_more_stride), 320))[0]
    )
    unchained = MBV2Arch((ConvBlock(3, 3, 16, 2, 1), ConvBlock(1, 8, 8, 1, 1)), 32)
    assert "does not match" in problems(unchained)[0]


def test_custom_draws_and_adapters() -> None:
    assert isinstance(draws(random.Random(0)), PythonDraws)
    assert isinstance(draws(np.random.default_rng(0)), NumpyDraws)
    own = NumpyDraws(np.random.default_rng(4))
    assert isinstance(own, Draws) and draws(own) is own
    assert sample(own) == sample(np.random.default_rng(4))


def test_search_ranges() -> None:
    assert REFERENCE_RANGES.widths[-1] == (128, 1536) and REFERENCE_RANGES.depths[4] == (2, 6)
    listed = SearchRanges(widths=[list(w) for w in REFERENCE_RANGES.widths])
    assert listed == REFERENCE_RANGES and hash(listed) == hash(REFERENCE_RANGES)
    narrow = SearchRanges(expansions=(6,), kernels=(7,), resolutions=(224, 224))
    for arch in sample(random.Random(0), n=5, flops_limit=None, ranges=narrow):
        assert problems(arch, narrow) == [] and arch.resolution == 224
        assert all(b.expansion == 6 and b.kernel == 7 for b in arch.blocks[1:-1])
    for bad in (
        {"widths": REFERENCE_RANGES.widths[:8]},
        {"bottlenecks": ((20, 48),) * 7},
        {"depths": ((0, 2),) * 7},
        {"expansions": (3,)},
        {"kernels": (3, 3)},
        {"stride2_blocks": 8},
        {"resolution_base": 16},
    ):
        with pytest.raises(ValueError, match="SearchRanges"):
            SearchRanges(**bad)


def test_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = parse(reference_sample()[0])
    rng = np.random.default_rng(0)
    for kwargs in ({"flops_limit": 0}, {"flops_limit": 6e8}, {"num_classes": True}, {"n": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            sample(rng, **kwargs)
    with pytest.raises(ValueError, match="rng must be"):
        sample(3)
    with pytest.raises(ValueError, match="probability"):
        mutate(rng, parent, p=1.5)
    with pytest.raises(ValueError, match="two"):
        mutate(rng, parent, ranges=SearchRanges(expansions=(6,), kernels=(7,)))
    with pytest.raises(ArchError, match="cannot mutate"):
        mutate(rng, MBV2Arch(parent.blocks[:-1], 320))
    counts = choices()
    with pytest.raises(ValueError, match="39"):
        from_choices([0] * 38)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        from_choices([5] + [0] * 38)
    with pytest.raises(ValueError, match="integer"):
        from_choices([0.0] * len(counts))
    with pytest.raises(ArchError, match="outside the search space"):
        to_choices(MBV2Arch(parent.blocks, 240))
    smallest = smallest_flops()
    for draw in (
        lambda limit: sample(rng, flops_limit=limit),
        lambda limit: mutate(rng, parent, flops_limit=limit),
    ):
        with pytest.raises(ValueError, match=f"the smallest has {smallest:,} FLOPs"):
            draw(smallest - 1)  # at once, without drawing
    # Reachable by the smallest architecture only: the draws give up.
    monkeypatch.setattr("wrcor_jax.spaces.mbv2.sampling.MAX_REDRAWS", 50)
    with pytest.raises(ValueError, match="in 50 draws; the limit is too small"):
        sample(rng, flops_limit=smallest)
    with pytest.raises(ValueError, match="in 50 draws; the limit is too small"):
        mutate(rng, parent, flops_limit=smallest)


def test_smallest_flops_is_the_least_of_the_space() -> None:
    """Some architecture of the space has it; raising any one decision from its least, with
    any stride pattern, never gives fewer FLOPs; no random draw has fewer."""
    counts = choices()
    least = [0] * (len(counts) - 2)
    found = [describe(from_choices([*least, s, 0]), 1000).flops for s in range(counts[-2])]
    assert smallest_flops() == min(found) and smallest_flops(10) < smallest_flops()
    for s in range(counts[-2]):
        for position, count in enumerate(counts):
            if position == len(counts) - 2 or count == 1:
                continue
            indices = [*least, s, 0]
            indices[position] = count - 1
            assert describe(from_choices(indices), 1000).flops >= found[s]
    drawn = sample(np.random.default_rng(0), 200, flops_limit=None)
    assert min(describe(arch, 1000).flops for arch in drawn) > smallest_flops()
