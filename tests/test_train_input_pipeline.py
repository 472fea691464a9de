"""The trainer's input pipeline: sources, batches, determinism, iterator state (plain and in
an orbax checkpoint), per-process shards, the padded eval pass, tfds' mock ImageNet, errors."""

from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from conftest import SAMPLE, require

from wrcor_jax.data.batch import normalize
from wrcor_jax.data.datasets import DataError, get_dataset_info
from wrcor_jax.train import augment
from wrcor_jax.train.input_pipeline import (
    DataConfig,
    TrainTransform,
    dataset_info,
    eval_batches,
    train_loader,
)

CIFAR = get_dataset_info("cifar10")
OFF = {"flip": False, "color_jitter": None, "lighting": 0.0, "autoaugment": False}
OFF_ALL = {**OFF, "random_erasing": 0.0}


def _sample_config(**overrides) -> DataConfig:
    fields = {"dataset": "cifar10", "data": str(require(SAMPLE)), "resolution": 32}
    return DataConfig(**{**fields, "crop": "pad_crop", **overrides})


def _take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def _equal(a: list[dict], b: list[dict]) -> bool:
    return all(
        np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------- .npz source


def test_sample_batches_shapes_dtypes_labels_and_normalisation() -> None:
    cfg = _sample_config()
    assert dataset_info(cfg) == (10000, 2000, 10)
    batches = _take(iter(train_loader(cfg, 64, seed=0)), 3)
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
        assert batch["label"].min() >= 0 and batch["label"].max() <= 9
    images = np.concatenate([b["image"] for b in batches])
    assert np.isfinite(images).all()
    assert abs(images.mean()) < 0.3 and 0.7 < images.std() < 1.4  # CIFAR's mean/std applied


def test_eval_images_are_the_test_split_normalised_in_order() -> None:
    cfg = _sample_config()
    with np.load(SAMPLE) as archive:
        images, labels = archive["test_images"], archive["test_labels"]
    batches = list(eval_batches(cfg, 512))
    assert [len(b["label"]) for b in batches] == [512] * 4
    got = np.concatenate([b["image"] for b in batches])[:2000]
    np.testing.assert_array_equal(got, normalize(images, CIFAR))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:2000], labels)


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    cfg = _sample_config()
    first = _take(iter(train_loader(cfg, 16, seed=3)), 2)
    assert _equal(first, _take(iter(train_loader(cfg, 16, seed=3)), 2))
    other = _take(iter(train_loader(cfg, 16, seed=4)), 2)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_everything_off_is_the_plain_resize_and_crop() -> None:
    """With flip, AutoAugment, jitter, lighting and erasing off, a record is only resized,
    randomly cropped and normalised, with the crop drawn first from the record's rng."""
    cfg = DataConfig(dataset="cifar10", resolution=24, **OFF_ALL)
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    out = TrainTransform(cfg, CIFAR).random_map((image, 7), np.random.default_rng(5))
    crop = augment.resize_random_crop(image, 24, 0.875, np.random.default_rng(5))
    np.testing.assert_array_equal(out["image"], normalize(crop, CIFAR))
    assert out["label"] == 7 and out["label"].dtype == np.int32


# --------------------------------------------------------------------------- iterator state


def test_iterator_state_restores_the_same_batches() -> None:
    cfg = _sample_config(resolution=16)
    iterator = iter(train_loader(cfg, 8, seed=1))
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 4)
    restored = iter(train_loader(cfg, 8, seed=1))
    restored.set_state(state)
    assert _equal(_take(restored, 4), expected)


def test_iterator_state_round_trips_through_an_orbax_composite(tmp_path: Path) -> None:
    """How the trainer checkpoints the pipeline: one item of an orbax Composite."""
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _sample_config(resolution=16)
    iterator = iter(train_loader(cfg, 8, seed=2))
    _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path, item_names=("params", "data")) as manager:
        manager.save(
            5,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave({"w": np.arange(3.0)}),
                data=grain.checkpoint.CheckpointSave(iterator),
            ),
        )
        expected = _take(iterator, 3)
        manager.wait_until_finished()
        assert (tmp_path / "5" / "data" / "process_0-of-1.json").exists()
        fresh = iter(train_loader(cfg, 8, seed=2))
        restored = manager.restore(
            5,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore({"w": np.zeros(3)}),
                data=grain.checkpoint.CheckpointRestore(fresh),
            ),
        )
    assert restored["data"] is fresh
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
    assert _equal(_take(fresh, 3), expected)


@pytest.mark.slow
def test_worker_processes_give_the_in_process_batches_and_state() -> None:
    """grain workers (spawned processes, ~4 s to start here) yield the in-process batches;
    their state restores only into a loader with the same worker count."""
    cfg = _sample_config(resolution=16)
    with_workers = _sample_config(resolution=16, worker_count=1)
    in_process = _take(iter(train_loader(cfg, 8, seed=0)), 3)
    workers = iter(train_loader(with_workers, 8, seed=0))
    assert _equal(_take(workers, 3), in_process)
    state = workers.get_state()
    with pytest.raises(ValueError, match="Worker count in checkpoint does not match"):
        iter(train_loader(cfg, 8, seed=0)).set_state(state)
    restored = iter(train_loader(with_workers, 8, seed=0))
    restored.set_state(state)
    assert _equal(_take(restored, 2), _take(workers, 2))


# --------------------------------------------------------------------------- processes


def _indexed_npz(path: Path, train: int, test: int) -> str:
    """Images of one grey value each = their index, so a batch tells which records it has."""
    np.savez(
        path,
        train_images=np.broadcast_to(
            np.arange(train, dtype=np.uint8)[:, None, None, None], (train, 8, 8, 3)
        ),
        train_labels=np.arange(train) % 10,
        test_images=np.broadcast_to(
            np.arange(test, dtype=np.uint8)[:, None, None, None], (test, 8, 8, 3)
        ),
        test_labels=np.arange(test) % 10,
    )
    return str(path)


def _indices(batch: dict) -> np.ndarray:
    pixels = batch["image"][:, 0, 0, 0] * CIFAR.std[0] + CIFAR.mean[0]
    return np.rint(pixels * 255).astype(int)


def _as_process(monkeypatch, index: int, count: int) -> None:
    """What grain's ShardByJaxProcess and the batch split read."""
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def _process_batches(monkeypatch, cfg: DataConfig, global_batch: int, count: int) -> list:
    """Each of `count` processes' first 3 local batches (seed 0)."""
    shares = []
    for index in range(count):
        _as_process(monkeypatch, index, count)
        shares.append(_take(iter(train_loader(cfg, global_batch, seed=0)), 3))
    return shares


def test_two_processes_interleave_into_the_one_process_batches(monkeypatch) -> None:
    """Row k of process r's local batch j is row 2k + r of the one-process batch j: the same
    record with the same augmentation (every one of SPEC 9's on), so the global batch of a
    step does not depend on the process count."""
    cfg = _sample_config(resolution=16)
    (one,) = _process_batches(monkeypatch, cfg, 8, 1)
    shares = _process_batches(monkeypatch, cfg, 8, 2)
    for j, batch in enumerate(one):
        for r, share in enumerate(shares):
            assert share[j]["image"].shape == (4, 16, 16, 3)
            np.testing.assert_array_equal(share[j]["image"], batch["image"][r::2])
            np.testing.assert_array_equal(share[j]["label"], batch["label"][r::2])


def test_processes_together_read_each_epoch_once(monkeypatch, tmp_path: Path) -> None:
    """61 records, 2 processes, global batches of 10: the first 61 records read are an epoch
    (the global sampler's; no remainder dropped per process), the next ones a reshuffle."""
    cfg = DataConfig(
        dataset="cifar10",
        data=_indexed_npz(tmp_path / "i.npz", 61, 4),
        resolution=8,
        crop_pct=1.0,
        **OFF_ALL,
    )
    shares = []
    for index in range(2):
        _as_process(monkeypatch, index, 2)
        shares.append([_indices(b) for b in _take(iter(train_loader(cfg, 10, seed=0)), 7)])
    order = np.stack([np.concatenate(share) for share in shares], axis=1).reshape(-1)
    assert sorted(order[:61]) == list(range(61)) and len(set(order[61:])) == 9
    assert not np.array_equal(order[:9], order[61:])


def test_eval_covers_every_example_once_across_processes(monkeypatch, tmp_path: Path) -> None:
    cfg = DataConfig(
        dataset="cifar10",
        data=_indexed_npz(tmp_path / "i.npz", 4, 61),
        resolution=8,
        crop="pad_crop",
    )
    seen, counts = [], []
    for index in range(2):
        _as_process(monkeypatch, index, 2)
        batches = list(eval_batches(cfg, 8))
        counts.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (4, 8, 8, 3) and batch["mask"].dtype == bool
            seen.extend(_indices(batch)[batch["mask"]])
            labels = batch["label"][batch["mask"]]
            np.testing.assert_array_equal(labels, _indices(batch)[batch["mask"]] % 10)
    assert counts == [8, 8]  # 31 and 30 examples: 8 batches of 4 each, padded
    assert sorted(seen) == list(range(61))


def test_global_batch_must_split_over_processes(monkeypatch) -> None:
    cfg = _sample_config()
    _as_process(monkeypatch, 0, 2)
    with pytest.raises(DataError, match="multiple of the 2 JAX process"):
        train_loader(cfg, 7, seed=0)
    with pytest.raises(DataError, match="positive multiple"):
        eval_batches(cfg, 0)


# --------------------------------------------------------------------------- tfds


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_mock_imagenet_end_to_end(tfds, tmp_path: Path) -> None:
    """tfds' mock ImageNet (random images of odd sizes, no TensorFlow): every augmentation
    on, batches at the configured resolution, ImageNet's 1000 classes, a full eval pass."""
    cfg = DataConfig(dataset="imagenet2012", data_dir=str(tmp_path), resolution=32)
    with tfds.testing.mock_data(
        num_examples=10,
        policy=tfds.testing.MockPolicy.USE_CODE,
        mock_array_record_data_source=tfds.testing.PickableDataSourceMock(),
    ):
        assert dataset_info(cfg) == (10, 10, 1000)
        batches = _take(iter(train_loader(cfg, 4, seed=0)), 4)  # crosses an epoch
        evals = list(eval_batches(cfg, 4))
    for batch in batches:
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0
        assert batch["label"].max() < 1000 and np.isfinite(batch["image"]).all()
    assert [int(b["mask"].sum()) for b in evals] == [4, 4, 2]
    assert all(b["image"].shape == (4, 32, 32, 3) for b in evals)


def test_unprepared_imagenet_says_how_to_prepare_it(tfds, tmp_path: Path) -> None:
    cfg = DataConfig(dataset="imagenet2012", data_dir=str(tmp_path))
    for call in (lambda: dataset_info(cfg), lambda: train_loader(cfg, 8, 0)):
        with pytest.raises(DataError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and f"{tmp_path}/downloads/manual/" in message
        assert f"tfds build imagenet2012 --data_dir {tmp_path}" in message
        assert "TensorFlow" in message
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_line_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        dataset_info(DataConfig(dataset="cifar10", data=str(tmp_path / "none.npz")))
    with pytest.raises(DataError, match="unknown dataset"):
        train_loader(DataConfig(dataset="mnist"), 8, 0)
    with pytest.raises(DataError, match="the trainer reads"):
        train_loader(DataConfig(dataset="imagenet16_120"), 8, 0)
    only_train = tmp_path / "train_only.npz"
    np.savez(only_train, train_images=np.zeros((2, 4, 4, 3), np.uint8), train_labels=[0, 1])
    with pytest.raises(DataError, match="lacks key"):
        dataset_info(DataConfig(dataset="cifar10", data=str(only_train)))
    with pytest.raises(DataError, match="crop must be one of"):
        DataConfig(crop="random")
    with pytest.raises(DataError, match="crop_pct"):
        DataConfig(crop_pct=0.0)


def test_config_from_json_lists_stays_hashable() -> None:
    cfg = DataConfig(color_jitter=[0.1, 0.2, 0.3, 0.1])
    assert cfg.color_jitter == (0.1, 0.2, 0.3, 0.1) and hash(cfg)
