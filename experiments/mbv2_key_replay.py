"""Piece keys of the MobileNetV2 engine from the architectures alone (issue #12).

`mbv2_compiles.py --trace-only` counts the keys by tracing each new one (minutes per hundred
architectures). This replays the engine's keying in plain Python -- which piece runs on which
padded shapes and static arguments, and which backwards WRCor's SE sites need -- so that
questions over many samples take seconds: how the keys grow from 20 to 40 architectures over
several sample seeds, and how much of a search's keys a precompiled sample
(`search_mbv2.py --precompile`) covers. `tests/test_mbv2_key_replay.py` holds it to the
keys the engine's pieces actually meet.

    python experiments/mbv2_key_replay.py --seeds 10
    python experiments/mbv2_key_replay.py --sample 200,500,1000 \\
        --cover experiments/runs/search_mbv2_1000/evolution_vote_0/history.csv

One JSON line per result on stdout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wrcor_jax.spaces import get_space
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.arch import MBV2Arch, ResBlock
from wrcor_jax.spaces.mbv2.network import se_channels
from wrcor_jax.spaces.mbv2.padding import (
    FINE_CHANNELS,
    FINE_ROWS,
    MIN_CHANNELS,
    TILE_ROWS,
    WHOLE_FROM,
    WIDE_STEP,
    bucket,
)

Key = tuple


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The engine's padding and tiling rules (`padding.bucket`, `padding.tile_rows`) with their
    parameters, the engine's by default, so that other choices can be replayed before the
    engine takes them."""

    min_channels: int = MIN_CHANNELS
    fine_channels: int = FINE_CHANNELS
    fine_rows: int = FINE_ROWS
    tile_rows: int = TILE_ROWS
    whole_from: int = WHOLE_FROM
    wide_step: int = WIDE_STEP

    def channels(self, channels: int) -> int:
        return bucket(channels, self.min_channels, self.fine_channels)

    def expanded(self, channels: int, rows: int) -> int:
        """A sub-block's expanded width on inputs of `rows` padded rows (`padding.wide_bucket`;
        `wide_step` 0: a bucket everywhere)."""
        bucketed = self.channels(channels)
        if self.wide_step and rows >= self.whole_from:
            return min(bucketed, -(-channels // self.wide_step) * self.wide_step)
        return bucketed

    def rows(self, pixels: int) -> int:
        return bucket(pixels, 1, self.fine_rows)

    def tile(self, pixels: int) -> int:
        """Rows per image of the tiles the 1x1 pieces run over (`padding.tile_rows`)."""
        rows = self.rows(pixels)
        return rows if rows <= self.tile_rows or rows >= self.whole_from else self.tile_rows


Backward = tuple | None
"""What a backward's key adds to its forward's: the inputs it leaves without a cotangent
(and "carried" where it adds one from another reader); None where it does not run."""


def _pointwise(
    tile: int, c_in: int, c_out: int, backward: Backward, residual: bool, **static
) -> list[tuple[Key, Backward]]:
    """The pieces of `MBV2Engine._pointwise` (each key once, whatever the tile count): the
    covariance path where the output is not narrower, else the conv and the output's
    statistics; `backward` for each but the BatchNorm's, which leaves out the residual too
    where the others leave out anything (`backward` (0,): the first project).
    `read_again`: the input tiles have readers after these (a sub-block's input)."""
    flags = ("relu", "site", "gated", "biased", "read_again")
    relu, site, gated, biased, read_again = (static.get(k, False) for k in flags)
    if not gated and not biased and c_in <= c_out:
        return [
            (("rows_sum", tile, c_in), backward),
            (("centred_gram", tile, c_in), backward),
            (("expand", tile, c_in, c_out, relu), backward),
        ]
    norm_backward = backward if not backward else (3,)
    # a sub-block's input is read again (residual, shortcut): its first reader's backward
    # takes that cotangent in, a program of its own
    carried = (*backward, "carried") if read_again and backward is not None else backward
    return [
        (("conv_rows", tile, c_in, c_out, gated, biased), carried),
        (("centred_squares", tile, c_out), () if backward is not None else None),
        (("batch_norm_tile", tile, c_out, relu, site, residual), norm_backward),
    ]


def piece_calls(arch: MBV2Arch, buckets: Buckets = Buckets()) -> list[tuple[Key, Backward]]:
    """Each piece of WRCor's pass over `arch`, in order (once per tile run: the tiles of one
    piece share its key): its key (piece, padded rows or tile and channels, static
    arguments) and, where its backward runs, the inputs that backward leaves without a
    cotangent (None: it does not run). Below the first squeeze-excite no backward runs, so
    the first sub-block's depthwise + SE and project backwards leave out the inputs from
    there: `MBV2Engine._needed`."""
    channel_bucket, rows_bucket, tile = buckets.channels, buckets.rows, buckets.tile
    stem, *rest = arch.blocks
    side = -(-arch.resolution // stem.stride)
    stem_key = ("stem", arch.resolution, stem.layers, stem.stride, stem.kernel)
    calls: list[tuple[Key, Backward]] = [
        ((*stem_key, channel_bucket(stem.out_channels), rows_bucket(side * side)), None)
    ]
    below_se = True

    def above(frozen_below: tuple[int, ...] | None = None) -> Backward:
        """A sub-block piece's backward: none below the first squeeze-excite, where the
        SE's own pieces (`frozen_below` given) leave out the inputs from there."""
        return () if not below_se else frozen_below

    for block in rest:
        if not isinstance(block, ResBlock):  # a 1x1 conv block: expand pieces with the ReLU
            for j in range(block.layers):
                c_in = block.in_channels if j == 0 else block.out_channels
                c_out = channel_bucket(block.out_channels)
                calls += _pointwise(
                    tile(side * side), channel_bucket(c_in), c_out, above(), False, relu=True,
                    site=True,
                )  # fmt: skip
            continue
        mid = channel_bucket(se_channels(block.dw_channels))
        out = channel_bucket(block.out_channels)
        for j in range(block.layers):
            stride = block.stride if j == 0 else 1
            c_in = channel_bucket(block.in_channels if j == 0 else block.out_channels)
            out_side = -(-side // stride)
            rows, rows_out = rows_bucket(side * side), rows_bucket(out_side * out_side)
            dw = buckets.expanded(block.dw_channels, rows)
            calls += _pointwise(
                tile(side * side), c_in, dw, above(), False, site=True, read_again=True
            )
            tiles_in = rows // tile(side * side)
            calls.append(
                (("depthwise_se", rows, dw, mid, stride, rows_out), above(tuple(range(tiles_in))))
            )
            if j == 0:
                if stride == 2:
                    calls.append((("subsample", rows, c_in, rows_out), above()))
                calls += _pointwise(
                    tile(out_side * out_side), c_in, out, above(), False, biased=True
                )
            calls += _pointwise(
                tile(out_side * out_side), dw, out, above((0,)), True, relu=True, site=True,
                gated=True,
            )  # fmt: skip
            below_se, side = False, out_side
    last = channel_bucket(arch.blocks[-1].out_channels)
    calls.append((("head", rows_bucket(side * side), last), above()))
    return calls


def keys_met(archs: Iterable[MBV2Arch], buckets: Buckets = Buckets()) -> set[Key]:
    """The compiled programs scoring `archs` needs: each piece key forward, and backward
    where the backward runs."""
    met = set()
    for arch in archs:
        for key, frozen in piece_calls(arch, buckets):
            met.add(("forward", *key))
            if frozen is not None:
                met.add(("backward", *key, frozen))
    return met


def growth(
    archs: list[MBV2Arch], checkpoints: Iterable[int], buckets: Buckets = Buckets()
) -> dict[int, int]:
    """Keys met by the first n architectures, for each checkpoint n."""
    return {n: len(keys_met(archs[:n], buckets)) for n in checkpoints}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="sample seeds 0..S-1")
    parser.add_argument("--checkpoints", default="20,40,100,200")
    parser.add_argument("--flops-limit", type=int, default=600_000_000)
    parser.add_argument("--cover", type=Path, help="a search's history.csv to cover")
    parser.add_argument("--sample", default="1000", help="precompiled sample sizes (--cover)")
    parser.add_argument("--sample-seed", type=int, default=42, help="the precompiled sample's")
    what_if = parser.add_argument_group("other buckets than the engine's (growth only)")
    what_if.add_argument("--min-channels", type=int, default=MIN_CHANNELS)
    what_if.add_argument("--fine-channels", type=int, default=FINE_CHANNELS)
    what_if.add_argument("--fine-rows", type=int, default=FINE_ROWS)
    what_if.add_argument("--tile-rows", type=int, default=TILE_ROWS)
    what_if.add_argument(
        "--whole-from",
        type=int,
        default=WHOLE_FROM,
        help="padded rows from which the 1x1 pieces take an image whole (not in tiles)",
    )
    what_if.add_argument(
        "--wide-step",
        type=int,
        default=WIDE_STEP,
        help="expanded widths on images from --whole-from rows: multiples of this (0: buckets)",
    )
    args = parser.parse_args()
    buckets = Buckets(
        args.min_channels, args.fine_channels, args.fine_rows, args.tile_rows, args.whole_from,
        args.wide_step,
    )  # fmt: skip
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    for seed in range(args.seeds):
        archs = sampling.sample(
            np.random.default_rng(seed), checkpoints[-1], flops_limit=args.flops_limit
        )
        keys = growth(archs, checkpoints, buckets)
        ratio = keys[40] / keys[20] if {20, 40} <= keys.keys() else None
        print(json.dumps({"sample_seed": seed, "keys": keys, "ratio_40_20": ratio}))
    if args.cover:
        space = get_space("mbv2", flops_limit=args.flops_limit)
        with args.cover.open() as rows:
            searched = keys_met(space.parse(row["arch"]) for row in csv.DictReader(rows))
        for size in (int(s) for s in args.sample.split(",")):
            sample = keys_met(space.sample(np.random.default_rng(args.sample_seed), size))
            print(
                json.dumps(
                    {
                        "search_keys": len(searched),
                        "sample": size,
                        "sample_keys": len(sample),
                        "covered": len(searched & sample),
                        "fraction": round(len(searched & sample) / len(searched), 4),
                    }
                )
            )


if __name__ == "__main__":
    main()
