"""Searching any registered space with zero-shot proxies: random, evolution, REINFORCE (SPEC 7)."""

from wrcor_jax.search.algorithms import ALGORITHMS, random_search, regularized_evolution, reinforce
from wrcor_jax.search.cache import CachedFitness, ScoreCache, cached_fitness, score_key
from wrcor_jax.search.core import VOTES, Criterion, Fitness, SearchResult

__all__ = [
    "ALGORITHMS",
    "VOTES",
    "CachedFitness",
    "Criterion",
    "Fitness",
    "ScoreCache",
    "SearchResult",
    "cached_fitness",
    "random_search",
    "regularized_evolution",
    "reinforce",
    "score_key",
]
