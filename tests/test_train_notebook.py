"""notebooks/train_tpu.ipynb runs top to bottom at toy size: a tiny architecture, 3 steps of
a global batch of 4 split over 2 forced host devices, on tensorflow-datasets' mock ImageNet
(the `imagenet_mbv2` recipe: every augmentation, mixup, label smoothing), then the curves
and a re-evaluation of the checkpoint. Executed as `tests/test_notebook.py` executes the
other notebooks (its `execute`: a kernel of this interpreter, parameters from the
environment).
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("tensorflow_datasets")
nbformat = pytest.importorskip("nbformat")
from test_notebook import execute  # noqa: E402  (skips the module without nbclient)

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "train_tpu.ipynb"
TINY = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,16,1,1)@32"


def test_committed_train_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_train_notebook_runs_on_mock_imagenet(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("WRCOR_NB_ARCH", TINY)
    monkeypatch.setenv("WRCOR_NB_DATASET", "imagenet2012")
    monkeypatch.setenv("WRCOR_NB_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("WRCOR_NB_MOCK_EXAMPLES", "12")
    monkeypatch.setenv("WRCOR_NB_STEPS", "3")
    monkeypatch.setenv("WRCOR_NB_BATCH", "4")
    monkeypatch.setenv("WRCOR_NB_WORKDIR", str(workdir))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = execute(NOTEBOOK, tmp_path)

    config = json.loads((workdir / "config.json").read_text())
    assert config["arch"] == TINY and config["data"]["dataset"] == "imagenet2012"
    assert config["mixup_alpha"] == 0.4 and config["data"]["autoaugment"] is True
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval_top1" in r] == [3]
    assert max(r["step"] for r in records if "loss" in r) == 3
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "JAX devices:" in text and "2 device(s), global batch 4" in text
    assert "wrcor-jax train --space mbv2" in text and "checkpoint of step 3 top-1" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
