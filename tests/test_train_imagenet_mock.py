"""The SPEC 9 recipe end to end on tfds' mock ImageNet (no TensorFlow, no download): every
augmentation, mixup and label smoothing on, a few steps, an eval pass, a checkpoint that
`evaluate_checkpoint` reads back."""

import dataclasses

import pytest

from wrcor_jax.train import configs, metrics
from wrcor_jax.train.train import evaluate_checkpoint, train_and_evaluate

TINY = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,32,1,1)@32"


def test_imagenet_recipe_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    recipe = configs.PRESETS["imagenet_mbv2"]
    config = dataclasses.replace(
        recipe,
        arch=TINY,
        data=dataclasses.replace(recipe.data, data_dir=str(tmp_path / "tfds"), resolution=32),
        batch_size=4,
        num_steps=3,
        log_every_steps=1,
    )
    with tfds.testing.mock_data(
        num_examples=10,
        policy=tfds.testing.MockPolicy.USE_CODE,
        mock_array_record_data_source=tfds.testing.PickableDataSourceMock(),
    ):
        result = train_and_evaluate(config, tmp_path / "run")
        again = evaluate_checkpoint(tmp_path / "run")
    records = metrics.read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"step", "loss", "lr", "grad_norm", "images_per_s"} <= set(records[0])
    assert 0 <= result["eval_top1"] <= result["eval_top5"] <= 1
    assert again == {"step": 3, **result}
