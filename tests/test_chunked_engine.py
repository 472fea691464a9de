"""The chunked engine (conv ops run only on the slots of the architectures that use them)
agrees with the composed engine, and its planner keeps every chunk within its slots."""

import jax
import numpy as np
import pytest
from conftest import BEST_CIFAR10, SAMPLE, require

from wrcor_jax.proxies import RESPONSE_PROXIES
from wrcor_jax.spaces import nb201
from wrcor_jax.spaces.nb201_chunked import (
    CPU_CHUNK,
    ChunkedEngine,
    ChunkShape,
    chunk_inputs,
    chunk_shape_for,
    plan_chunks,
)


def test_plan_places_every_arch_once_within_the_slots():
    archs = nb201.sample_archs(np.random.default_rng(3), 500)
    shape = ChunkShape.for_archs(16)
    plan = plan_chunks(archs, shape)
    assert sorted(np.concatenate(plan)) == list(range(len(archs)))
    assert len(plan) <= 33  # 500 / 16 = 31.25: the slots cost at most a chunk or two
    for members in plan:
        ops = archs[members]
        assert len(members) <= shape.archs
        assert (ops == nb201.OPS.index("nor_conv_3x3")).sum(axis=0).max() <= shape.conv3x3
        assert (ops == nb201.OPS.index("nor_conv_1x1")).sum(axis=0).max() <= shape.conv1x1
        padded, slots = chunk_inputs(ops, shape)
        index, valid = slots["nor_conv_3x3"]
        for e in range(nb201.NUM_EDGES):
            users = np.flatnonzero(padded[:, e] == nb201.OPS.index("nor_conv_3x3"))
            assert list(index[e][valid[e]]) == list(users)
            assert np.all(np.diff(index[e]) > 0)  # distinct and sorted, as declared


def test_chunk_inputs_refuse_an_overfull_chunk():
    all_3x3 = np.full((3, nb201.NUM_EDGES), nb201.OPS.index("nor_conv_3x3"))
    with pytest.raises(ValueError, match="nor_conv_3x3 on edge 0"):
        chunk_inputs(all_3x3, ChunkShape(4, 2, 2))


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_chunk_size_follows_free_device_memory():
    assert chunk_shape_for(_Device(None), 64).archs == CPU_CHUNK
    big = chunk_shape_for(_Device({"bytes_limit": 140e9, "bytes_in_use": 1e9}), 64)
    small = chunk_shape_for(_Device({"bytes_limit": 16e9, "bytes_in_use": 1e9}), 64)
    assert big.archs % 8 == 0 and small.archs % 8 == 0
    assert 8 <= small.archs < big.archs <= 4096
    assert big.conv3x3 == big.conv1x1 == -(-big.archs // 4)


# Float32's own error in the gradient kinds' sums, which differ by summation order between
# the engines: on one machine of this kind they agreed within 1e-5; on another, same packages
# (XLA:CPU compiles for the CPU it runs on), each was 2.1e-3 (act_grad) and 2.9e-3 (bn_grad)
# from the composed engine in float64 on BEST_CIFAR10, and up to 2.1e-3 from each other.
GRADIENT_ATOL = 1e-2


@pytest.mark.slow
def test_chunked_scores_equal_composed_scores(params, small_batch, engine):
    # On the noise fallback a few near-zero gradients flip their sign code between the two
    # engines' float32 summation orders (site sums off by 4e-4 at scale 5; scores by 5e-9
    # relative): the bounds hold for real images, which the engines score.
    require(SAMPLE)
    images, labels = small_batch
    archs = np.stack(
        [
            nb201.parse_arch(BEST_CIFAR10),
            nb201.parse_arch("|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|none~0|none~1|none~2|"),
            nb201.parse_arch("|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"),
            *nb201.sample_archs(np.random.default_rng(9), 3),
        ]
    )
    # 2 chunks of 4 places with 2 3x3 slots and 1 1x1 slot per edge: padding, full slots
    shape = ChunkShape(4, 2, 1)
    assert len(plan_chunks(archs, shape)) >= 2
    chunked = ChunkedEngine(shape).site_sums(archs, params, images, labels)
    for ops, got in zip(archs, chunked, strict=True):
        want = engine.site_sums(ops, params, images, labels)
        for kind in want.counts:
            assert np.array_equal(got.counts[kind], want.counts[kind]), kind
            atol = GRADIENT_ATOL if kind.endswith("grad") else 1e-5
            np.testing.assert_allclose(got.sums[kind], want.sums[kind], rtol=1e-5, atol=atol)
        for name, proxy in RESPONSE_PROXIES.items():
            assert proxy(got) == pytest.approx(proxy(want), rel=1e-5), name


def test_scorer_hands_the_chunked_engine_a_chunk_per_device():
    from wrcor_jax.scoring import NB201Scorer, ScoreConfig

    config = ScoreConfig(engine="chunked", batch_size=4, chunk_size=1, data=str(require(SAMPLE)))
    scorer = NB201Scorer(config)
    assert scorer.archs_per_call == CPU_CHUNK * jax.local_device_count()
