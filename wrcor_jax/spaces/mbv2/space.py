"""The MobileNetV2 (Zen-NAS) space behind the `Space` interface (SPEC 7, 8).

Sampling, mutation and the REINFORCE policy keep to the reference's ranges and, when one is
set, its FLOPs limit (600M by default), counted as the reference counts them for the
1000-class ImageNet network whatever the dataset scored: the limit is about the network
that will be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wrcor_jax.spaces.base import Space
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.arch import MBV2Arch, format_arch, parse
from wrcor_jax.spaces.mbv2.cost import describe

if TYPE_CHECKING:
    from wrcor_jax.scoring import ScoreConfig

DEFAULT_FLOPS_LIMIT = 600_000_000
IMAGENET_CLASSES = 1000
COUNTED = {"params": "params", "flops": "flops"}  # proxy -> field of the cost description


class CostScorer:
    """The `params` and `flops` proxies of MobileNetV2-space architectures: the reference's
    counts of the 1000-class network (SPEC 8), whatever the dataset.

    The proxies that read the network's responses (WRCor, synflow, ...) need this space's
    scoring engine, which is not built yet: asking for one is an error, not a wrong score.
    """

    def __init__(self, config: ScoreConfig):
        self.proxies = config.proxies
        missing = [name for name in config.proxies if name not in COUNTED]
        if missing:
            raise ValueError(
                f"the mbv2 space scores only {', '.join(COUNTED)} so far; "
                f"{', '.join(missing)} need its scoring engine (not yet built)"
            )

    def score(
        self, archs: Sequence[MBV2Arch], proxies: Sequence[str] | None = None
    ) -> list[list[float]]:
        names = self.proxies if proxies is None else proxies
        costs = [describe(arch, IMAGENET_CLASSES) for arch in archs]
        return [[float(getattr(cost, COUNTED[name])) for name in names] for cost in costs]


class MBV2Space(Space):
    """Block string + resolution architectures; `flops_limit` None searches without one."""

    name = "mbv2"
    default_num_classes = IMAGENET_CLASSES

    def __init__(self, flops_limit: int | None = DEFAULT_FLOPS_LIMIT):
        self.flops_limit = flops_limit
        self._options = {"flops_limit": flops_limit, "num_classes": IMAGENET_CLASSES}

    def parse(self, text: str) -> MBV2Arch:
        return parse(text)

    def format(self, arch: MBV2Arch) -> str:
        return format_arch(arch)

    def _over_limit(self, arch: MBV2Arch) -> str | None:
        flops = describe(arch, IMAGENET_CLASSES).flops
        if self.flops_limit is not None and flops > self.flops_limit:
            return f"{flops:,} FLOPs (1000 classes) is over the limit of {self.flops_limit:,}"
        return None

    def search_problems(self, arch: MBV2Arch) -> list[str]:
        over = self._over_limit(arch)
        return sampling.problems(arch) + ([over] if over else [])

    def sample(self, rng: np.random.Generator, n: int) -> list[MBV2Arch]:
        return sampling.sample(rng, n, **self._options)

    def mutate(self, rng: np.random.Generator, arch: MBV2Arch) -> MBV2Arch:
        return sampling.mutate(rng, arch, **self._options)

    def choices(self) -> tuple[int, ...]:
        return sampling.choices()

    def from_choices(self, indices: Sequence[int]) -> MBV2Arch | None:
        arch = sampling.from_choices(indices)
        return None if self._over_limit(arch) else arch

    def describe(self, arch: MBV2Arch, num_classes: int) -> dict[str, Any]:
        return describe(arch, num_classes).as_dict()

    def scorer(self, config: ScoreConfig) -> CostScorer:
        return CostScorer(config)
