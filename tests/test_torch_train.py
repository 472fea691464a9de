"""The PyTorch twin's training step (`torch_ref.train`) against the trainer's JAX
`train_step`: same initial weights, batch and recipe give the same loss, parameters,
BatchNorm running averages and learning rate, two steps in a row (momentum included).

Tolerances, float32 both sides, measured here (2 steps of batch 8, both recipes): the loss
to 1.1e-7 relative, the gradient's norm to 1.9e-7 relative, the parameters after each step
to 3.0e-8 of the largest |parameter|, the running averages to 5e-5 relative (the largest on
means near zero; 1e-6 absolute covers those). The bounds below leave about 10x.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SAMPLE

torch = pytest.importorskip("torch")

from wrcor_jax.torch_ref.mbv2 import to_flax_params  # noqa: E402
from wrcor_jax.torch_ref.train import (  # noqa: E402  (after the skip)
    create_trainer,
    mixup_draw,
    to_flax_batch_stats,
)
from wrcor_jax.train import configs, train  # noqa: E402
from wrcor_jax.train.models import build_network  # noqa: E402
from wrcor_jax.train.targets import mixup, smooth_labels  # noqa: E402

# Both sub-block kinds (projection shortcut, identity), SE, a depthwise conv, a conv stack.
ARCH = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,2)SuperConvK1BNRELU(16,24,1,1)@32"
BATCH = 8
LOSS_RTOL = 1e-6
PARAM_ATOL = 3e-7  # relative to the largest |parameter|
STATS_RTOL = 2e-5

RECIPES = {
    # SPEC 9's targets with the clip active (the gradient norm is ~1 here) and decay on all.
    "smoothing_mixup_clip": ["label_smoothing=0.1", "mixup_alpha=0.4", "clip_norm=0.3"],
    # Nesterov, decay on conv and linear kernels only, no clip, no mixup.
    "nesterov_kernel_decay": [
        "nesterov=true",
        "decay_bn_and_bias=false",
        "clip_norm=none",
        "mixup_alpha=0",
        "weight_decay=1e-2",
    ],
}


def _config(assignments: list[str]) -> configs.TrainConfig:
    config = configs.override(configs.PRESETS["cifar10"], assignments)
    return dataclasses.replace(config, arch=ARCH, batch_size=BATCH, learning_rate=0.4)


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    """Two batches of real CIFAR-10 images (normalised) when the sample exists, else noise."""
    rng = np.random.default_rng(0)
    if SAMPLE.exists():
        with np.load(SAMPLE) as archive:
            images = archive["train_images"][: 2 * BATCH].astype(np.float32) / 255.0
            labels = archive["train_labels"][: 2 * BATCH].astype(np.int32)
        images = (images - 0.5) / 0.25
    else:
        images = rng.normal(size=(2 * BATCH, 32, 32, 3)).astype(np.float32)
        labels = (np.arange(2 * BATCH) % 10).astype(np.int32)
    return [{"image": images[i : i + BATCH], "label": labels[i : i + BATCH]} for i in (0, BATCH)]


def _max_abs(a: dict, b: dict) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_torch_step_matches_jax_train_step(recipe, batches, one_torch_thread):
    config = _config(RECIPES[recipe])
    network = build_network("mbv2", ARCH, 10)
    schedule = train.create_learning_rate_fn(config, steps_per_epoch=2, total_steps=4)
    state = train.create_train_state(config, network, schedule)
    trainer = create_trainer(config, state.params, 10, schedule)
    step_fn = jax.jit(
        functools.partial(
            train.train_step, network=network, config=config, learning_rate_fn=schedule
        )
    )
    for batch in batches:
        state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
        record = trainer.train_batch(batch)

        assert record["lr"] == pytest.approx(float(metrics["lr"]), rel=1e-6)
        assert record["loss"] == pytest.approx(float(metrics["loss"]), rel=LOSS_RTOL)
        assert record["grad_norm"] == pytest.approx(float(metrics["grad_norm"]), rel=2e-6)
        if config.clip_norm:
            assert record["grad_norm"] > config.clip_norm  # the clip is exercised
        torch_params = to_flax_params(trainer.net, jax.device_get(state.params))
        scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(state.params))
        assert _max_abs(torch_params, jax.device_get(state.params)) <= PARAM_ATOL * scale
        stats = to_flax_batch_stats(trainer.net)
        assert jax.tree.structure(stats) == jax.tree.structure(jax.device_get(state.batch_stats))
        for ours, theirs in zip(
            jax.tree.leaves(stats), jax.tree.leaves(state.batch_stats), strict=True
        ):
            np.testing.assert_allclose(ours, theirs, rtol=STATS_RTOL, atol=1e-6)
    assert trainer.step == int(state.step) == 2


def test_mixup_draw_is_the_trainers_mixup():
    images = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4, 4, 3)), jnp.float32)
    targets = smooth_labels(jnp.arange(6) % 10, 10, 0.1)
    key = jax.random.fold_in(jax.random.key(3), 5)
    mixed_images, mixed_targets = mixup(key, images, targets, 0.4)
    lam, perm = mixup_draw(3, 5, 6, 0.4)
    np.testing.assert_allclose(mixed_images, lam * images + (1 - lam) * images[perm], rtol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[perm], rtol=1e-6)


def test_weight_decay_groups_follow_the_trainers_mask():
    config = _config(["decay_bn_and_bias=false"])
    network = build_network("mbv2", ARCH, 10)
    params = network.init_variables(0, (1, 32, 32, 3))["params"]
    trainer = create_trainer(config, params, 10, train.create_learning_rate_fn(config, 1, 1))
    decayed, plain = trainer.optimizer.param_groups
    mask = train.weight_decay_mask(params, decay_bn_and_bias=False)
    assert len(decayed["params"]) == sum(jax.tree.leaves(mask))
    assert len(plain["params"]) == len(jax.tree.leaves(mask)) - sum(jax.tree.leaves(mask))
    assert decayed["weight_decay"] == config.weight_decay and plain["weight_decay"] == 0.0


def test_bad_configs_are_refused():
    params = {}
    schedule = train.create_learning_rate_fn(_config([]), 1, 1)
    with pytest.raises(ValueError, match="mbv2 twin"):
        create_trainer(dataclasses.replace(_config([]), space="nb201"), params, 10, schedule)
    with pytest.raises(ValueError, match="float32"):
        create_trainer(
            dataclasses.replace(_config([]), compute_dtype="bfloat16"), params, 10, schedule
        )
