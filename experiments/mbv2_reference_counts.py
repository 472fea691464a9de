"""Measure the paper's code's FLOPs and parameter counts on seeded random MobileNetV2-space
networks and write them as the fixture `tests/data/mbv2_reference_counts.csv`, which
`tests/test_mbv2_cost.py` checks `cost.describe` against (the reference is not there in CI).

    python experiments/mbv2_reference_counts.py --ref /path/to/ZSNAS-WRCor [--n 100]

Rows cycle over three kinds: search-space samples within 600M FLOPs, search-space samples
with no limit, and odd chains outside the ranges (any widths, bottlenecks, depths, conv
blocks in the middle, strides wherever the resolution is even, odd resolutions); the class
count is drawn from 1, 10, 100, 1000. `flops` is `int(net.get_FLOPs())` (its float is
fractional only for some odd widths; the script says how many), `params` is
`sum(p.numel())`. The script also compares every row with `describe` and exits non-zero on
a mismatch.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from wrcor_jax.spaces.mbv2.arch import (
    CONV_KERNELS,
    EXPANSIONS,
    RES_KERNELS,
    ConvBlock,
    MBV2Arch,
    ResBlock,
    format_arch,
    validate,
)
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.spaces.mbv2.sampling import sample

OUT = Path(__file__).parents[1] / "tests" / "data" / "mbv2_reference_counts.csv"
CLASS_COUNTS = (1, 10, 100, 1000)


def odd_arch(rng: np.random.Generator) -> MBV2Arch:
    """A buildable chain outside the search space's ranges and shape."""
    res = int(rng.integers(8, 129))
    blocks, width, here = [], 3, res

    def stride() -> int:
        return 2 if here % 2 == 0 and rng.random() < 0.5 else 1

    def conv(kernel: int) -> ConvBlock:
        return ConvBlock(kernel, width, int(rng.integers(1, 97)), stride(), int(rng.integers(1, 3)))

    blocks.append(conv(int(rng.choice(CONV_KERNELS))))
    for _ in range(int(rng.integers(1, 9))):
        width, here = blocks[-1].out_channels, here // blocks[-1].stride
        if rng.random() < 0.15:
            blocks.append(conv(int(rng.choice(CONV_KERNELS))))
        else:
            blocks.append(
                ResBlock(
                    int(rng.choice(EXPANSIONS)), int(rng.choice(RES_KERNELS)), width,
                    int(rng.integers(1, 201)), stride(), int(rng.integers(1, 161)),
                    int(rng.integers(1, 4)),
                )
            )  # fmt: skip
    if rng.random() < 0.7:
        width, here = blocks[-1].out_channels, here // blocks[-1].stride
        blocks.append(ConvBlock(1, width, int(rng.integers(1, 1601)), 1, 1))
    return validate(MBV2Arch(tuple(blocks), res))


def draw(rng: np.random.Generator, index: int) -> MBV2Arch:
    kind = index % 3
    if kind == 2:
        return odd_arch(rng)
    return sample(rng, flops_limit=600_000_000 if kind == 0 else None)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="the ZSNAS-WRCor checkout")
    parser.add_argument("--n", type=int, default=100, help="number of networks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.ref))
    import torch
    from foresight.models import get_MobileNetV2_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    rows, fractional, mismatches = [], 0, 0
    with torch.no_grad():
        for index in range(args.n):
            arch = draw(rng, index)
            num_classes = int(rng.choice(CLASS_COUNTS))
            net = get_MobileNetV2_model(
                arch.block_string, num_classes=num_classes, input_resolution=arch.resolution
            )
            flops = net.get_FLOPs()
            fractional += flops != int(flops)
            params = sum(p.numel() for p in net.parameters())
            row = (format_arch(arch), num_classes, int(flops), int(params))
            ours = describe(arch, num_classes)
            if (ours.flops, ours.params) != row[2:]:
                mismatches += 1
                print(f"MISMATCH {row}: describe gives {ours.flops}, {ours.params}")
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("arch", "num_classes", "flops", "params"))
        writer.writerows(rows)
    print(
        f"wrote {args.out}: {len(rows)} networks ({fractional} with fractional reference FLOPs);"
        f" describe matches {len(rows) - mismatches} of {len(rows)}"
    )
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
