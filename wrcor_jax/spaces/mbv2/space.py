"""The MobileNetV2 (Zen-NAS) space behind the `Space` interface (SPEC 7, 8).

Sampling, mutation and the REINFORCE policy keep to the reference's ranges and, when one is
set, its FLOPs limit (600M by default), counted as the reference counts them for the
1000-class ImageNet network whatever the dataset scored: the limit is about the network
that will be trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.compilation import ExecutableBudget
from wrcor_jax.proxies import PROXIES
from wrcor_jax.proxies.wrcor import mbv2_act_cor, mbv2_wrcor, mbv2_wrcor_allrelu
from wrcor_jax.spaces.base import Space
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.arch import MBV2Arch, format_arch, parse
from wrcor_jax.spaces.mbv2.capture import site_sums
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.spaces.mbv2.engine import MBV2Engine
from wrcor_jax.spaces.mbv2.measures import MEASUREMENTS, MBV2Measurer, zen_inputs, zen_params
from wrcor_jax.spaces.mbv2.network import init_params
from wrcor_jax.spaces.mbv2.pieces import BLOCK_KINDS, SE_KINDS
from wrcor_jax.spaces.mbv2.rows import native_cpu

if TYPE_CHECKING:
    from wrcor_jax.scoring import ScoreConfig

DEFAULT_FLOPS_LIMIT = 600_000_000
IMAGENET_CLASSES = 1000
COUNTED = ("params", "flops")  # fields of the 1000-class cost description
RESPONSE_PROXIES = {  # read the site sums
    "wrcor": mbv2_wrcor,
    "wrcor_allrelu": mbv2_wrcor_allrelu,
    "act_cor": mbv2_act_cor,
}
MEASURED = tuple(name for name, proxy in PROXIES.items() if proxy.measurement in MEASUREMENTS)
"""The proxies scored from `measures.MBV2Measurer`'s measurements, as on NB201."""
SCORED = (*COUNTED, *RESPONSE_PROXIES, *MEASURED)
ON_THE_ENGINE_PASS = ("input_jacobian", "loss_grads", "activations")
"""Measurements the composed engine takes from the forward pass of the WRCor sums."""
ENGINE_MEASURED = frozenset({*ON_THE_ENGINE_PASS, "half_batch_grads", "synflow_grads", "zen"})
"""The measurements the composed engine takes, compile-bounded: all of them."""


def batch_sharding(batch_size: int) -> jax.sharding.NamedSharding | None:
    """The batch axis split over every local device, or None on one device or when they do
    not divide the batch.

    Architectures of this space differ in shapes, so unlike NB201's they cannot share one
    vectorised program; nor are they spread one per device, since a program compiled for
    one device is compiled again for each other (measured: 4 host devices, 4 compilations
    of one function, 4 entries in the persistent cache). Splitting the batch keeps one
    compilation per piece for all the devices.
    """
    count = jax.local_device_count()
    if count == 1 or batch_size % count:
        return None
    mesh = jax.make_mesh(
        (count,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices()
    )
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


ACCELERATOR_NOTE = (
    "the mbv2 engine compiles its pieces on this accelerator in seconds each and runs them in "
    "milliseconds: the first architectures take minutes, and a search stays compile-bound "
    "(measured on an H200: docs/timing.md) unless its pieces are compiled ahead "
    "(experiments/search_mbv2.py --precompile); the CPU is the measured path for this space"
)
"""Warned when a scorer that runs the network is made off the CPU (once per process, by
Python's default filter): the pieces are a CPU design (docs/mbv2_engine.md)."""


class MBV2Scorer:
    """Proxy scores of MobileNetV2-space architectures on one batch.

    `params` and `flops` are the reference's counts of the 1000-class network (SPEC 8),
    whatever the dataset. The others score the dataset's network with PyTorch-default
    weights drawn per architecture from the seed. `wrcor` and `act_cor` read the reference's
    sites (the SE ReLUs, SPEC 3b), `wrcor_allrelu` every ReLU, all from one pass of the
    compile-bounded `engine.MBV2Engine` (engine "composed"; otherwise one capture of the
    Flax network per architecture, `capture.site_sums`); so do what every other proxy reads
    (jacob_cov, snip, grad_norm, naswot and meco from the WRCor sums' forward pass; zico,
    synflow and zen from passes of their own), with the site choices of `measures`. With
    another engine, or an architecture the pieces do not build, `measures` takes them,
    compiled per architecture.
    `wrcor_clean`
    and `act_grad_cor` (NB201 site sets) are refused. The compiled programs are released
    whenever the process outgrows its `ExecutableBudget` (a fifth of the machine's memory, or
    half the kernel's cap on memory mappings).

    With several local devices the batch is split over them (`batch_sharding`): every
    compiled piece then runs on all of them as one program, and XLA adds the reductions
    BatchNorm and the correlations need across the split.
    """

    def __init__(self, config: ScoreConfig):
        from wrcor_jax.data import get_dataset_info, load_batch

        missing = [name for name in config.proxies if name not in SCORED]
        if missing:
            raise ValueError(
                f"the mbv2 space does not score {', '.join(missing)}; it scores {', '.join(SCORED)}"
            )
        self.config = config
        self.num_classes = get_dataset_info(config.dataset).num_classes
        if self.runs_network:
            images, labels = load_batch(
                config.dataset, config.batch_size, config.seed, config.data, config.data_dir
            )
            self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
            sharding = batch_sharding(config.batch_size)
            if sharding is not None:
                self.images = jax.device_put(self.images, sharding)
                self.labels = jax.device_put(self.labels, sharding)
            self.measurer = MBV2Measurer(self.images, self.labels, self.num_classes, config.seed)
            if jax.default_backend() != "cpu":
                warnings.warn(ACCELERATOR_NOTE, stacklevel=2)
        kinds = (*SE_KINDS, *(BLOCK_KINDS if "wrcor_allrelu" in config.proxies else ()))
        self.engine = MBV2Engine(kinds) if config.engine == "composed" else None
        self.executables = ExecutableBudget()

    @property
    def runs_network(self) -> bool:
        """Whether a proxy of its configuration reads the network (not only counts it)."""
        return any(name not in COUNTED for name in self.config.proxies)

    @property
    def native_calls(self) -> bool:
        """Whether the engine's pieces run on its native CPU calls (said in the summary line:
        they need a C++ compiler and one local device)."""
        return self.runs_network and self.engine is not None and native_cpu()

    def measure(self, arch: MBV2Arch, params: dict, names: Sequence[str]) -> dict:
        """What the proxies `names` read, each taken once: `site_sums` and ENGINE_MEASURED
        from the compile-bounded engine where it applies, the rest from `measures`'
        per-architecture programs."""
        reads = {PROXIES[name].measurement for name in names if name in MEASURED}
        sums = any(name in RESPONSE_PROXIES for name in names)
        batch = (arch, params, self.images, self.labels, self.num_classes)
        measured: dict = {}
        if self.engine is not None and self.engine.supports(arch):
            asked = {name: name in reads for name in ON_THE_ENGINE_PASS}
            if sums or any(asked.values()):
                measured |= self.engine.measure(*batch, site_sums=sums, **asked)
            if "half_batch_grads" in reads:
                measured["half_batch_grads"] = self.engine.half_batch_grads(*batch)
            if "synflow_grads" in reads:
                measured["synflow_grads"] = self.engine.synflow_grads(
                    arch, params, self.images.shape
                )
            if "zen" in reads:
                seed, n = self.config.seed, self.images.shape[0]
                gaussian = zen_params(arch, seed, self.num_classes)
                measured["zen"] = self.engine.zen(arch, gaussian, *zen_inputs(arch, seed, n))
            reads -= ENGINE_MEASURED
        elif sums:
            measured["site_sums"] = site_sums(*batch)
        if reads:
            measured |= self.measurer.measure_many(sorted(reads), arch, params)
        return measured

    def _row(self, arch: MBV2Arch, names: Sequence[str]) -> list[float]:
        cost = describe(arch, IMAGENET_CLASSES)
        if all(name in COUNTED for name in names):
            return [float(getattr(cost, name)) for name in names]
        params = init_params(arch, self.config.seed, self.num_classes)
        measured = self.measure(arch, params, names)

        def score(name: str) -> float:
            if name in COUNTED:
                return float(getattr(cost, name))
            if name in RESPONSE_PROXIES:
                return RESPONSE_PROXIES[name](measured["site_sums"])
            proxy = PROXIES[name]
            return proxy.score(measured[proxy.measurement], params)

        return [score(name) for name in names]

    @property
    def archs_per_call(self) -> int:
        """Architectures per `score` call in a scoring run: the configured chunk size."""
        return self.config.chunk_size

    def score(
        self, archs: Sequence[MBV2Arch], proxies: Sequence[str] | None = None
    ) -> list[list[float]]:
        names = self.config.proxies if proxies is None else proxies
        foreign = [name for name in names if name not in self.config.proxies]
        if foreign:
            raise ValueError(
                f"proxy {foreign[0]!r} is not one this scorer was configured for "
                f"({', '.join(self.config.proxies)})"
            )
        rows = []
        for arch in archs:
            rows.append(self._row(arch, names))
            self.executables.check()  # nearly every arch compiles new pieces or programs
        return rows


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
