"""NAS-Bench-201 behind the `Space` interface: the functions of `nb201` under their seam names.

An architecture is int32[6] op indices; its text form is the NB201 string. Sampling,
mutation and `--sample` draw exactly as they did before the seam existed, so searches and
score files made then resume unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.base import Space

if TYPE_CHECKING:
    from wrcor_jax.scoring import NB201Scorer, ScoreConfig

DESCRIBE_IMAGE_SHAPE = (1, 32, 32, 3)
"""`describe` counts FLOPs for CIFAR's 32 x 32 images."""


class NB201Space(Space):
    """The 15,625 cells of NAS-Bench-201 (SPEC 1)."""

    name = "nb201"
    default_num_classes = 10

    def parse(self, text: str) -> np.ndarray:
        return nb201.parse_arch(text)

    def format(self, arch: np.ndarray) -> str:
        return nb201.arch_string(arch)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return nb201.sample_archs(rng, n)

    def mutate(self, rng: np.random.Generator, arch: np.ndarray) -> np.ndarray:
        return nb201.mutate_arch(rng, arch)

    def choices(self) -> tuple[int, ...]:
        return (len(nb201.OPS),) * nb201.NUM_EDGES

    def from_choices(self, indices: Sequence[int]) -> np.ndarray:
        return nb201.validate_ops(np.asarray(indices))

    def draw(self, n: int, seed: int) -> list[str]:
        """`n` distinct architectures: a seeded choice without replacement from all 15,625."""
        if not 1 <= n <= nb201.NUM_ARCHS:
            raise ValueError(f"--sample must be in 1..{nb201.NUM_ARCHS}, got {n}")
        rng = np.random.default_rng(seed)
        chosen = nb201.all_archs()[rng.choice(nb201.NUM_ARCHS, n, replace=False)]
        return [nb201.arch_string(ops) for ops in chosen]

    def enumerate(self) -> list[str]:
        return [nb201.arch_string(ops) for ops in nb201.all_archs()]

    def describe(self, arch: np.ndarray, num_classes: int) -> dict[str, Any]:
        """Per block (stem, 17 cells, head BN, classifier): FLOPs as multiply-accumulates
        on a 32 x 32 image, parameters of the used weights (BN included, as torch counts)."""
        used = nb201.used_params(nb201.param_shapes(num_classes), arch)
        macs = nb201.block_macs(arch, DESCRIBE_IMAGE_SHAPE, num_classes)
        resolution = DESCRIBE_IMAGE_SHAPE[1]

        def size(tree: dict) -> int:
            return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))

        ops = nb201.validate_ops(arch)
        blocks = [_row("stem", 3, nb201.STEM_CHANNELS, 1, resolution, macs[0], size(used["stem"]))]
        for index, (c_in, c_out, reduction) in enumerate(nb201.CELL_PLAN):
            stride = 2 if reduction else 1
            resolution //= stride
            name = "reduction cell" if reduction else _cell_ops(ops)
            cell = used[nb201.cell_name(index)]
            blocks.append(_row(name, c_in, c_out, stride, resolution, macs[index + 1], size(cell)))
        c_last = nb201.CELL_PLAN[-1][1]
        blocks.append(_row("BN-ReLU-pool", c_last, c_last, 1, 1, 0, size(used["head"]["bn"])))
        classifier = size(used["head"]["classifier"])
        blocks.append(_row("Linear", c_last, num_classes, 1, 1, macs[-1], classifier))
        return {
            "arch": nb201.arch_string(ops),
            "resolution": DESCRIBE_IMAGE_SHAPE[1],
            "num_classes": num_classes,
            "flops": sum(row["flops"] for row in blocks),
            "params": sum(row["params"] for row in blocks),
            "blocks": blocks,
        }

    def scorer(self, config: ScoreConfig) -> NB201Scorer:
        from wrcor_jax.scoring import NB201Scorer

        return NB201Scorer(config)


def _cell_ops(ops: np.ndarray) -> str:
    """A normal cell's conv ops in short form, e.g. 'cell 3x3,3x3,1x1'."""
    convs = [nb201.OPS[op].removeprefix("nor_conv_") for op in ops if op in nb201.CONV_OPS]
    return "cell " + (",".join(convs) if convs else "no conv")


def _row(
    name: str, c_in: int, c_out: int, stride: int, resolution: int, flops: int, params: int
) -> dict[str, Any]:
    return {
        "name": name,
        "in_channels": c_in,
        "out_channels": c_out,
        "stride": stride,
        "output_resolution": resolution,
        "flops": int(flops),
        "params": int(params),
    }
