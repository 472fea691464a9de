"""Random search, regularized (aging) evolution and REINFORCE over any space (SPEC 7).

Each takes a fitness, a budget of evaluations, a seed and an output folder, and returns a
`SearchResult` (also written to result.json); see `core` for the conventions shared by all
three (budget, comparison, history and resume). They reach the architectures only through
the space (`evaluations.space`): sample, mutate, and the policy's choices.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wrcor_jax.search.core import Evaluations, Fitness, SearchResult, run_search
from wrcor_jax.spaces import Space
from wrcor_jax.vote import zscores

CHUNK = 8  # architectures per fitness call where the order of evaluation does not matter
MAX_POLICY_DRAWS = 10_000  # REINFORCE draws per evaluation before giving up on the limits
UNAVAILABLE = -1e9  # logit of a category a decision does not have


def _evaluate_in_chunks(evaluations: Evaluations, archs: Sequence) -> np.ndarray:
    return np.concatenate(
        [evaluations.evaluate(archs[i : i + CHUNK]) for i in range(0, len(archs), CHUNK)]
    )


def random_search(
    fitness: Fitness,
    budget: int,
    seed: int,
    out_dir: str | Path,
    *,
    vote: str = "hard",
    ground_truth: Mapping[str, Any] | None = None,
    progress: bool = False,
    space: Space | None = None,
) -> SearchResult:
    """`budget` architectures drawn uniformly (with replacement); the best is the result."""

    def program(evaluations: Evaluations, rng: np.random.Generator) -> dict[str, Any]:
        _evaluate_in_chunks(evaluations, evaluations.space.sample(rng, budget))
        return {}

    return run_search(
        "random",
        program,
        fitness,
        budget,
        seed,
        out_dir,
        vote=vote,
        ground_truth=ground_truth,
        progress=progress,
        space=space,
    )


def regularized_evolution(
    fitness: Fitness,
    budget: int,
    seed: int,
    out_dir: str | Path,
    *,
    vote: str = "hard",
    ground_truth: Mapping[str, Any] | None = None,
    progress: bool = False,
    space: Space | None = None,
    population_size: int = 64,
    tournament_size: int = 10,
    children: int = 1,
) -> SearchResult:
    """Aging evolution: a random population, then generations of tournament, mutation, and
    the oldest member replaced by the child.

    With `children` = k > 1 (the batched variant) each generation runs k tournaments on the
    same population and scores the k mutants in one fitness call, so a scorer can work on
    them together; the k oldest then make way. k = 1 is the reference algorithm. The final
    population (oldest first) is in the result's details.
    """
    if population_size < 1 or tournament_size < 1 or children < 1:
        raise ValueError("population, tournament and children must each be at least 1")

    def program(evaluations: Evaluations, rng: np.random.Generator) -> dict[str, Any]:
        space = evaluations.space
        initial = space.sample(rng, min(population_size, budget))
        population = deque(zip(initial, _evaluate_in_chunks(evaluations, initial), strict=True))
        while evaluations.remaining:
            kids = []
            for _ in range(min(children, evaluations.remaining)):
                drawn = rng.choice(
                    len(population), min(tournament_size, len(population)), replace=False
                )
                scores = np.stack([population[i][1] for i in drawn])
                parent = drawn[evaluations.criterion.best(scores, evaluations.seen())]
                kids.append(space.mutate(rng, population[parent][0]))
            for member in zip(kids, evaluations.evaluate(kids), strict=True):
                population.append(member)
                population.popleft()
        return {"population": [space.format(arch) for arch, _ in population]}

    options = {"population": population_size, "tournament": tournament_size, "children": children}
    return run_search(
        "evolution",
        program,
        fitness,
        budget,
        seed,
        out_dir,
        vote=vote,
        options=options,
        ground_truth=ground_truth,
        progress=progress,
        space=space,
    )


@functools.cache
def _policy_step(learning_rate: float):
    """One jitted REINFORCE update: Adam on -advantage * log pi(arch)."""
    optimizer = optax.adam(learning_rate)

    def loss(logits: jax.Array, ops: jax.Array, advantage: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -advantage * jnp.take_along_axis(log_probs, ops[:, None], axis=-1).sum()

    @jax.jit
    def step(logits, state, ops, advantage):
        updates, state = optimizer.update(jax.grad(loss)(logits, ops, advantage), state)
        return optax.apply_updates(logits, updates), state

    return optimizer, step


def _softmax(logits: jax.Array) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _initial_logits(counts: np.ndarray) -> jax.Array:
    """(decisions, most categories) zeros; a decision's padding categories (it has fewer than
    the widest) get a logit whose probability is exactly 0 and whose gradient stays 0."""
    real = np.arange(counts.max())[None, :] < counts[:, None]
    return jnp.asarray(np.where(real, 0.0, UNAVAILABLE), jnp.float32)


def _draw(rng: np.random.Generator, logits: jax.Array, counts: np.ndarray) -> np.ndarray:
    """One category per decision, by inverting each row's CDF at a uniform draw."""
    cdf = np.cumsum(_softmax(logits), axis=-1)
    draws = rng.random(len(counts))
    return np.minimum((cdf < draws[:, None]).sum(axis=-1), counts - 1)


def reinforce(
    fitness: Fitness,
    budget: int,
    seed: int,
    out_dir: str | Path,
    *,
    vote: str = "hard",
    ground_truth: Mapping[str, Any] | None = None,
    progress: bool = False,
    space: Space | None = None,
    warmup: int = 100,
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    draws: int = 1,
) -> SearchResult:
    """REINFORCE with a factorised categorical policy: one categorical per decision of the
    space (NB201: 6 edges x 5 ops), logits start at 0. A draw the space rejects (over its
    limits, e.g. a FLOPs limit) is drawn again and does not count.

    `warmup` random architectures (part of the budget) fix each proxy's mean and std; the
    reward is the sum of the proxies' z-scores. A non-finite z-score (a -inf WRCor of a
    disconnected cell, a NaN) would poison the update, so it is replaced by the lowest
    (NaN, -inf) or highest (+inf) z-score seen in the warm-up. The baseline is an
    exponential moving average of the rewards (bias-corrected, current reward included);
    one Adam step per sampled architecture. `vote` only decides the best architecture.
    The final policy's probabilities are in the result's details.

    With `draws` = k > 1 (the batched variant) each round draws k architectures from the
    same policy and scores them in one fitness call (so a scorer or several processes can
    work on them together), then takes their k steps in order; k = 1 is the reference.
    """
    if warmup < 1 or learning_rate <= 0 or not 0 <= momentum < 1 or draws < 1:
        raise ValueError(
            "warmup >= 1, learning rate > 0, momentum in [0, 1) and draws >= 1 required"
        )

    def draw(rng: np.random.Generator, logits: jax.Array, space: Space, counts: np.ndarray):
        for _ in range(MAX_POLICY_DRAWS):
            indices = _draw(rng, logits, counts)
            arch = space.from_choices(indices)
            if arch is not None:
                return arch, indices
        raise ValueError(
            f"the policy drew no architecture within the {space.name} space's limits "
            f"in {MAX_POLICY_DRAWS} tries"
        )

    def program(evaluations: Evaluations, rng: np.random.Generator) -> dict[str, Any]:
        space = evaluations.space
        reference = _evaluate_in_chunks(evaluations, space.sample(rng, min(warmup, budget)))
        warm_z = zscores(reference)
        finite = np.isfinite(warm_z)
        low = np.where(finite, warm_z, np.inf).min(axis=0)
        high = np.where(finite, warm_z, -np.inf).max(axis=0)
        low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)

        optimizer, step = _policy_step(learning_rate)
        counts = np.asarray(space.choices())
        logits = _initial_logits(counts)
        state = optimizer.init(logits)
        ema, weight = 0.0, 0.0
        while evaluations.remaining:
            drawn = [
                draw(rng, logits, space, counts) for _ in range(min(draws, evaluations.remaining))
            ]
            rows = evaluations.evaluate([arch for arch, _ in drawn])
            for (_, indices), z in zip(drawn, zscores(rows, reference=reference), strict=True):
                z = np.where(np.isnan(z) | (z == -np.inf), low, np.where(z == np.inf, high, z))
                reward = float(z.sum())
                ema = momentum * ema + (1 - momentum) * reward
                weight = momentum * weight + 1 - momentum
                advantage = reward - ema / weight
                logits, state = step(logits, state, jnp.asarray(indices, jnp.int32), advantage)
        policy = _softmax(logits).round(6).tolist()
        return {"policy": [row[:n] for row, n in zip(policy, counts, strict=True)]}

    options = {"warmup": warmup, "learning_rate": learning_rate, "momentum": momentum}
    if draws > 1:  # absent at 1, so the folders of searches from before the option resume
        options["draws"] = draws
    return run_search(
        "reinforce",
        program,
        fitness,
        budget,
        seed,
        out_dir,
        vote=vote,
        options=options,
        ground_truth=ground_truth,
        progress=progress,
        space=space,
    )


ALGORITHMS = {
    "random": random_search,
    "evolution": regularized_evolution,
    "reinforce": reinforce,
}
