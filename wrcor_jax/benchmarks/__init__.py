"""Ground-truth benchmark tables and the rank correlations proxies are judged by."""

from wrcor_jax.benchmarks.nb201 import (
    ArchRecord,
    BenchmarkError,
    GroundTruth,
    evaluate_scores,
    evaluate_table,
    load_ground_truth,
    parse_score,
    rank_correlations,
    score_table,
)

__all__ = [
    "ArchRecord",
    "BenchmarkError",
    "GroundTruth",
    "evaluate_scores",
    "evaluate_table",
    "load_ground_truth",
    "parse_score",
    "rank_correlations",
    "score_table",
]
