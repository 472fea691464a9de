"""experiments/mbv2_key_replay.py against the engine: the keys it replays from architectures
alone are, piece by piece and direction by direction, the ones WRCor's pass meets."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, require

from wrcor_jax.data import load_batch
from wrcor_jax.spaces.mbv2 import sampling
from wrcor_jax.spaces.mbv2.engine import SE_KINDS, MBV2Engine
from wrcor_jax.spaces.mbv2.network import init_params
from wrcor_jax.spaces.mbv2.precompile import piece_stand_ins, signatures_met

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # for its dataclass
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_replayed_keys_are_the_pieces_keys():
    replay = _load("mbv2_key_replay")
    images, labels = load_batch("cifar10", 2, 42, require(SAMPLE), None)
    archs = sampling.sample(np.random.default_rng(0), 2, flops_limit=600_000_000)
    engine = MBV2Engine(SE_KINDS)
    with piece_stand_ins() as stand_ins:
        for arch in archs:
            engine.site_sums(arch, init_params(arch, 42, 10), images, labels, 10)
    replayed = Counter(f"{key[1]}/{key[0]}" for key in replay.keys_met(archs))
    assert replayed == signatures_met(stand_ins)


def test_pointwise_tiles_key_only_the_1x1_pieces_by_their_tile():
    """The what-if of a row-tiled engine: the same calls, the 1x1 pieces keyed by the
    largest tile their rows hold instead of the rows (so never more keys), every other
    piece keyed as the engine keys it."""
    replay = _load("mbv2_key_replay")
    archs = sampling.sample(np.random.default_rng(0), 20, flops_limit=600_000_000)
    tiled = replay.Buckets(pointwise_tiles=(64, 4096))
    pointwise = {"expand", "shortcut", "project"}
    for arch in archs:
        engine, with_tiles = replay.piece_calls(arch), replay.piece_calls(arch, tiled)
        assert [frozen for _, frozen in engine] == [frozen for _, frozen in with_tiles]
        for (key, _), (other, _) in zip(engine, with_tiles, strict=True):
            assert key[0] == other[0]
            if key[0] not in pointwise:
                assert key == other
            else:
                assert other[1] == (4096 if key[1] >= 4096 else 64)
    assert len(replay.keys_met(archs, tiled)) < len(replay.keys_met(archs))
