"""The MobileNetV2 (Zen-NAS) space behind the `Space` interface (SPEC 7, 8).

Sampling, mutation and the REINFORCE policy keep to the reference's ranges and, when one is
set, its FLOPs limit (600M by default), counted as the reference counts them for the
1000-class ImageNet network whatever the dataset scored: the limit is about the network
that will be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from wrcor_jax.proxies.wrcor import mbv2_act_cor, mbv2_wrcor
from wrcor_jax.spaces.base import Space
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.arch import MBV2Arch, format_arch, parse
from wrcor_jax.spaces.mbv2.capture import site_sums
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.spaces.mbv2.network import init_params

if TYPE_CHECKING:
    from wrcor_jax.scoring import ScoreConfig

DEFAULT_FLOPS_LIMIT = 600_000_000
IMAGENET_CLASSES = 1000
COUNTED = ("params", "flops")  # fields of the 1000-class cost description
RESPONSE_PROXIES = {"wrcor": mbv2_wrcor, "act_cor": mbv2_act_cor}  # read the site sums


class MBV2Scorer:
    """Proxy scores of MobileNetV2-space architectures on one batch.

    `params` and `flops` are the reference's counts of the 1000-class network (SPEC 8),
    whatever the dataset. `wrcor` and `act_cor` use the reference's sites (the SE ReLUs,
    SPEC 3b) of the dataset's network, PyTorch-default weights drawn per architecture from
    the seed, captured from the Flax network (`capture.site_sums`): one compilation per
    architecture until the compile-bounded engine exists. The other proxies are refused
    rather than computed some other way.
    """

    def __init__(self, config: ScoreConfig):
        from wrcor_jax.data import get_dataset_info, load_batch

        known = (*COUNTED, *RESPONSE_PROXIES)
        missing = [name for name in config.proxies if name not in known]
        if missing:
            raise ValueError(
                f"the mbv2 space scores only {', '.join(known)} so far; "
                f"{', '.join(missing)} need its scoring engine (not yet built)"
            )
        self.config = config
        self.num_classes = get_dataset_info(config.dataset).num_classes
        if any(name in RESPONSE_PROXIES for name in config.proxies):
            images, labels = load_batch(
                config.dataset, config.batch_size, config.seed, config.data, config.data_dir
            )
            self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)

    def _row(self, arch: MBV2Arch, names: Sequence[str]) -> list[float]:
        cost = describe(arch, IMAGENET_CLASSES)
        sums = None
        if any(name in RESPONSE_PROXIES for name in names):
            params = init_params(arch, self.config.seed, self.num_classes)
            sums = site_sums(arch, params, self.images, self.labels, self.num_classes)
        return [
            float(getattr(cost, name)) if name in COUNTED else RESPONSE_PROXIES[name](sums)
            for name in names
        ]

    def score(
        self, archs: Sequence[MBV2Arch], proxies: Sequence[str] | None = None
    ) -> list[list[float]]:
        names = self.config.proxies if proxies is None else proxies
        return [self._row(arch, names) for arch in archs]


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

    def scorer(self, config: ScoreConfig) -> MBV2Scorer:
        return MBV2Scorer(config)
