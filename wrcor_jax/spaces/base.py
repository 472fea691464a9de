"""The one interface through which scoring, search, results and the CLI reach a search space.

A space turns text into architectures and back (the `arch` column of every file is the
space's text form), draws and mutates architectures for the searches, describes their cost,
and builds the scorer that takes the proxies' measurements. Nothing outside
`wrcor_jax/spaces/` knows what an architecture is made of: it is an opaque value that only
the space that made it reads. Registering a space is one line in `wrcor_jax.spaces.SPACES`.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from wrcor_jax.scoring import ScoreConfig

Arch = Any
"""A space's own value for one architecture (NB201: int32[6] op indices)."""

MAX_DRAWS = 10_000
"""Redraws allowed per distinct architecture asked of `Space.draw` before giving up."""


class ArchError(ValueError):
    """A malformed or unbuildable architecture, with a message naming the problem."""


class Scorer(Protocol):
    """Turns architectures of one space into rows of proxy scores, in `proxies` order (the
    scorer's configured proxies when None). `archs_per_call` is how many architectures a
    scoring run hands it at a time (one results append each): usually the configured
    chunk size, more for an engine that scores many in one program."""

    archs_per_call: int

    def score(
        self, archs: Sequence[Arch], proxies: Sequence[str] | None = None
    ) -> list[list[float]]: ...


class Space(abc.ABC):
    """A search space: text form, sampling, mutation, policy choices, cost and scorer."""

    name: ClassVar[str]
    default_num_classes: ClassVar[int]
    """The classifier width `describe` counts when none is given."""

    # ------------------------------------------------------------------ text
    @abc.abstractmethod
    def parse(self, text: str) -> Arch:
        """The architecture of a text form; `ArchError` naming the problem if malformed."""

    @abc.abstractmethod
    def format(self, arch: Arch) -> str:
        """The one-token, CSV-safe text form; `parse(format(a))` gives `a` back."""

    def canonical(self, text: str) -> str:
        """The text form an architecture is filed under (whitespace and spelling normalised)."""
        return self.format(self.read(text))

    def read(self, text: str) -> Arch:
        """`parse`, and when `text` is another registered space's text form, an error that
        says which space it belongs to (a common slip: an NB201 string given to mbv2)."""
        try:
            return self.parse(text)
        except ArchError as error:
            from wrcor_jax.spaces import space_of

            other = space_of(text, excluding=self.name)
            if other is None:
                raise
            hint = f"that is an architecture of the {other} space: use --space {other}"
            raise ArchError(f"{error} ({hint})") from None

    def search_problems(self, arch: Arch) -> list[str]:
        """Why `arch` lies outside the space's search ranges and limits (empty: inside);
        every architecture that parses is inside unless a space says otherwise."""
        return []

    def options(self) -> dict[str, Any]:
        """The constructor options this space was built with (`get_space(name, **options)`),
        read from the attributes of the same name, which is how spaces keep them; a search's
        course depends on them (e.g. a FLOPs limit), so its search.json records them."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def landmarks(self) -> dict[str, Arch]:
        """Named architectures of the space from the literature (`spaces.LANDMARKS`), which a
        search's result is set against; empty when the space has none."""
        from wrcor_jax.spaces import landmark_texts

        return {name: self.parse(text) for name, text in landmark_texts(self.name).items()}

    # ------------------------------------------------------------------ sampling
    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> Sequence[Arch]:
        """`n` architectures drawn from the search space (with replacement), seeded by `rng`."""

    @abc.abstractmethod
    def mutate(self, rng: np.random.Generator, arch: Arch) -> Arch:
        """A random neighbour of `arch`: the space's mutation in regularized evolution."""

    @abc.abstractmethod
    def choices(self) -> tuple[int, ...]:
        """Number of categories of each decision of a factorised REINFORCE policy."""

    @abc.abstractmethod
    def from_choices(self, indices: Sequence[int]) -> Arch | None:
        """The architecture one category per decision picks, or None when it breaks the
        space's limits (the policy then draws again)."""

    def draw(self, n: int, seed: int) -> list[str]:
        """`n` distinct architectures (text forms) for `score --sample`, seeded by `seed`."""
        if n < 1:
            raise ValueError(f"--sample must be at least 1, got {n}")
        rng, chosen = np.random.default_rng(seed), {}
        for _ in range(MAX_DRAWS * n):
            chosen.setdefault(self.format(self.sample(rng, 1)[0]), None)
            if len(chosen) == n:
                return list(chosen)
        raise ValueError(f"drew only {len(chosen)} distinct {self.name} architectures of {n}")

    def enumerate(self) -> list[str]:
        """Every architecture of the space (text forms), for `score --all`."""
        raise ValueError(f"the {self.name} space is too large to enumerate; use --sample N")

    # ------------------------------------------------------------------ cost, scores
    @abc.abstractmethod
    def describe(self, arch: Arch, num_classes: int) -> dict[str, Any]:
        """Cost of `arch`: `{"arch", "resolution", "num_classes", "flops", "params",
        "blocks": [one dict per block, each with at least "name", "flops", "params"]}`,
        flops and params as integers."""

    @abc.abstractmethod
    def scorer(self, config: ScoreConfig) -> Scorer:
        """The scorer of `config`'s proxies on its batch (data, weights and compilation are
        set up here, so build it only when something needs scoring)."""
