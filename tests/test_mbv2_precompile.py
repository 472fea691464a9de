"""Precompiling a search's pieces: a later process scoring the same architectures compiles
nothing and reads every program back from the persistent cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE, require

from wrcor_jax.scoring import ScoreConfig
from wrcor_jax.spaces.mbv2.precompile import precompile
from wrcor_jax.spaces.mbv2.space import MBV2Scorer

ARCHS = [
    "SuperConvK3BNRELU(3,12,2,1)SuperResIDWE2K3(12,20,2,12,1)SuperConvK1BNRELU(20,40,1,1)@24",
    "SuperConvK3BNRELU(3,17,2,1)SuperResIDWE6K5(17,33,2,4,2)SuperResIDWE1K7(33,9,1,40,1)"
    "SuperConvK1BNRELU(9,20,1,1)@36",
]
# One process per step: the cache is configured per process, and a process keeps what it
# compiled in memory.
CHILD = """
import json, sys
from wrcor_jax.compilation import CompileCounter, use_persistent_cache
from wrcor_jax.scoring import ScoreConfig
from wrcor_jax.spaces.mbv2.arch import parse
from wrcor_jax.spaces.mbv2.network import init_params
from wrcor_jax.spaces.mbv2.precompile import precompile
from wrcor_jax.spaces.mbv2.space import MBV2Scorer

step, cache, data, *texts = sys.argv[1:]
use_persistent_cache(cache)
CompileCounter.install()
config = ScoreConfig(space="mbv2", proxies=("synflow", "jacob_cov", "wrcor"), batch_size=8,
                     data=data)
scorer = MBV2Scorer(config)
archs = [parse(text) for text in texts]
if step == "precompile":
    print(json.dumps(vars(precompile(scorer, archs, workers=2))))
else:
    before = CompileCounter.count
    print(json.dumps({"scores": scorer.score(archs), "compiled": CompileCounter.count - before,
                      "loaded": CompileCounter.loads}))
"""


def _run(step: str, cache: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, step, str(cache), str(require(SAMPLE)), *ARCHS],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scoring_after_precompile_compiles_nothing(tmp_path):
    report = _run("precompile", tmp_path)
    assert report["archs"] == 2 and report["keys"] > 20 and report["compiled"] >= report["keys"]
    scored = _run("score", tmp_path)
    assert scored["compiled"] == 0
    assert scored["loaded"] >= report["keys"]


def test_counted_proxies_have_nothing_to_compile():
    scorer = MBV2Scorer(ScoreConfig(space="mbv2", proxies=("params", "flops")))
    with pytest.raises(ValueError, match="nothing to compile ahead"):
        precompile(scorer, [])
