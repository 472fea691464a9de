"""The pure pieces of `wrcor_jax.train.train`: learning-rate schedule values, the weight
decay mask, the optimizer against PyTorch's SGD + clip_grad_norm_, BatchNorm's running
averages against torch's, and one train and eval step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_tiny import TINY

from wrcor_jax.spaces.running_norm import running_batch_norm
from wrcor_jax.train import configs
from wrcor_jax.train.models import build_network
from wrcor_jax.train.train import (
    create_learning_rate_fn,
    create_optimizer,
    create_train_state,
    eval_step,
    train_step,
    weight_decay_mask,
)


def test_learning_rate_scales_with_batch_warms_up_and_decays_by_cosine():
    config = dataclasses.replace(configs.PRESETS["imagenet_mbv2"], batch_size=1024, warmup_epochs=1)
    lr = create_learning_rate_fn(config, steps_per_epoch=10, total_steps=110)
    peak = 0.1 * 1024 / 256
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(peak / 2)
    assert float(lr(10)) == pytest.approx(peak)
    assert float(lr(60)) == pytest.approx(peak / 2, rel=1e-5)  # half way through the cosine
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-7)
    no_warmup = create_learning_rate_fn(configs.PRESETS["imagenet_mbv2"], 10, 100)
    assert float(no_warmup(0)) == pytest.approx(0.1)
    assert float(no_warmup(25)) == pytest.approx(0.1 * (1 + np.cos(np.pi / 4)) / 2)


def test_weight_decay_mask_spares_batch_norm_and_biases():
    params = {"conv": {"kernel": 1, "scale": 1, "bias": 1}, "classifier": {"kernel": 1, "bias": 1}}
    assert weight_decay_mask(params, True) == jax.tree.map(lambda _: True, params)
    mask = weight_decay_mask(params, False)
    assert mask == {
        "conv": {"kernel": True, "scale": False, "bias": False},
        "classifier": {"kernel": True, "bias": False},
    }


def test_optimizer_is_torch_sgd_with_clipping():
    torch = pytest.importorskip("torch")
    config = dataclasses.replace(
        configs.PRESETS["imagenet_mbv2"], clip_norm=1.0, weight_decay=0.01, nesterov=True
    )
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32)}
    grads = [{"kernel": 3 * rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(3)]
    tx = create_optimizer(config, lambda step: 0.1)
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree.map(jnp.add, p, updates)
    weight = torch.nn.Parameter(torch.tensor(params["kernel"]))
    sgd = torch.optim.SGD([weight], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for g in grads:
        weight.grad = torch.tensor(g["kernel"])
        torch.nn.utils.clip_grad_norm_([weight], 1.0)
        sgd.step()
    np.testing.assert_allclose(p["kernel"], weight.detach().numpy(), rtol=1e-5, atol=1e-6)


class _Norm(nn.Module):
    mode: str

    @nn.compact
    def __call__(self, y):
        return running_batch_norm(self, "bn", y, jnp.ones(3), jnp.zeros(3), self.mode, 1e-3)


def test_running_averages_are_torchs():
    torch = pytest.importorskip("torch")
    batches = np.random.default_rng(1).normal(2.0, 3.0, size=(4, 5, 6, 6, 3)).astype(np.float32)
    variables = _Norm("train").init(jax.random.key(0), batches[0])
    bn = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.1)
    for y in batches:
        out, updates = _Norm("train").apply(variables, y, mutable=["batch_stats"])
        variables = updates
        expected = bn(torch.tensor(y).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    stats = variables["batch_stats"]["bn"]
    np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-5)
    bn.eval()
    expected = bn(torch.tensor(batches[0]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = _Norm("eval").apply(variables, batches[0])
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_train_step_lowers_the_loss_on_a_repeated_batch_and_eval_counts():
    config = configs.override(
        configs.PRESETS["cifar10"], [f"arch={TINY}", "batch_size=8", "data.resolution=16"]
    )
    network = build_network("mbv2", TINY, 10)
    lr = create_learning_rate_fn(config, 10, 10)
    state = create_train_state(config, network, lr)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32) % 10,
    }
    step = jax.jit(lambda s, b: train_step(s, b, network=network, config=config,
                                           learning_rate_fn=lr))  # fmt: skip
    losses = []
    for _ in range(5):
        state, step_metrics = step(state, batch)
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < losses[0] and int(state.step) == 5
    assert float(step_metrics["lr"]) == pytest.approx(float(lr(4)))
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    sums = eval_step(state, {**batch, "mask": mask}, network=network)
    assert float(sums["count"]) == 6 and 0 <= float(sums["top1"]) <= float(sums["top5"]) <= 6
