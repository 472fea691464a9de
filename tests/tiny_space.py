"""A third search space that lives in the tests only: proof that a space plugs into scoring,
search, results and the CLI through `wrcor_jax.spaces.Space` and one registry line.

An architecture is a stack of 1-3 conv 3x3 + ReLU layers with widths from WIDTHS, then
global pooling and a linear classifier; its text form is `tiny:8-16`. The scorer computes
the weight-only proxies (`params`, `flops`) from a real Flax parameter tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.layers import torch_default_init
from wrcor_jax.proxies import PROXIES
from wrcor_jax.scoring import ScoreConfig
from wrcor_jax.spaces.base import ArchError, Space

WIDTHS = (4, 8, 16, 32)
MAX_DEPTH = 3
RESOLUTION = 8  # describe's input size


class TinyNet(nn.Module):
    widths: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.widths:
            x = jax.nn.relu(nn.Conv(width, (3, 3), use_bias=False)(x))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class TinyScorer:
    """`params` and `flops` of tiny architectures, read by the library's own proxies."""

    def __init__(self, space: TinySpace, config: ScoreConfig):
        self.space, self.config = space, config
        self.archs_per_call = config.chunk_size
        unsupported = [p for p in config.proxies if PROXIES[p].measurement not in (None, "macs")]
        if unsupported:
            raise ValueError(f"the tiny space cannot score {', '.join(unsupported)}")

    def score(
        self, archs: Sequence[tuple[int, ...]], proxies: Sequence[str] | None = None
    ) -> list[list[float]]:
        rows = []
        for arch in archs:
            net = TinyNet(tuple(arch), 10)
            images = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
            shapes = jax.eval_shape(net.init, jax.random.key(0), images)["params"]
            params = torch_default_init(self.config.seed, shapes)
            flops = self.space.describe(arch, 10)["flops"]
            row = []
            for name in proxies or self.config.proxies:
                proxy = PROXIES[name]
                row.append(proxy.score(None if proxy.measurement is None else flops, params))
            rows.append(row)
        return rows


class TinySpace(Space):
    name = "tiny"
    default_num_classes = 10

    def __init__(self, flops_limit: int | None = None):
        self.flops_limit = flops_limit

    def parse(self, text: str) -> tuple[int, ...]:
        body = text.strip().removeprefix("tiny:")
        try:
            widths = tuple(int(w) for w in body.split("-"))
        except ValueError:
            raise ArchError(f"{text!r}: expected tiny:W-W-W") from None
        if not 1 <= len(widths) <= MAX_DEPTH or not set(widths) <= set(WIDTHS):
            raise ArchError(f"{text!r}: 1-{MAX_DEPTH} widths from {WIDTHS}")
        return widths

    def format(self, arch: Sequence[int]) -> str:
        return "tiny:" + "-".join(map(str, arch))

    def _within(self, arch: tuple[int, ...]) -> bool:
        return self.flops_limit is None or self.describe(arch, 10)["flops"] <= self.flops_limit

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[int, ...]]:
        out = []
        while len(out) < n:
            depth = int(rng.integers(1, MAX_DEPTH + 1))
            arch = tuple(int(WIDTHS[i]) for i in rng.integers(0, len(WIDTHS), depth))
            if self._within(arch):
                out.append(arch)
        return out

    def mutate(self, rng: np.random.Generator, arch: tuple[int, ...]) -> tuple[int, ...]:
        for _ in range(1000):  # one layer's width changes; narrower stacks always fit
            child = list(arch)
            child[int(rng.integers(len(child)))] = int(rng.choice(WIDTHS))
            if tuple(child) != tuple(arch) and self._within(tuple(child)):
                return tuple(child)
        raise ValueError(f"no mutant of {self.format(arch)} within {self.flops_limit} FLOPs")

    def choices(self) -> tuple[int, ...]:
        return (MAX_DEPTH, *(len(WIDTHS),) * MAX_DEPTH)

    def from_choices(self, indices: Sequence[int]) -> tuple[int, ...] | None:
        depth = int(indices[0]) + 1
        arch = tuple(WIDTHS[int(i)] for i in indices[1 : 1 + depth])
        return arch if self._within(arch) else None

    def describe(self, arch: Sequence[int], num_classes: int) -> dict[str, Any]:
        blocks, c_in = [], 3
        for width in arch:
            flops = c_in * width * 9 * RESOLUTION**2
            blocks.append({"name": "conv3x3", "flops": flops, "params": c_in * width * 9})
            c_in = width
        linear = c_in * num_classes
        blocks.append({"name": "Linear", "flops": linear, "params": linear + num_classes})
        return {
            "arch": self.format(arch),
            "resolution": RESOLUTION,
            "num_classes": num_classes,
            "flops": sum(b["flops"] for b in blocks),
            "params": sum(b["params"] for b in blocks),
            "blocks": blocks,
        }

    def scorer(self, config: ScoreConfig) -> TinyScorer:
        return TinyScorer(self, config)
