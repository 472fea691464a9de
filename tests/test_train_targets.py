"""Label smoothing, mixup and the soft cross-entropy against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.train.targets import distill, mixup, smooth_labels, soft_cross_entropy


def test_label_smoothing_by_hand():
    targets = np.asarray(smooth_labels(jnp.array([2, 0]), 4, 0.1))
    expected = np.array([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


def test_mixup_by_hand():
    key = jax.random.key(3)
    images = jnp.arange(4 * 2 * 2 * 1, dtype=jnp.float32).reshape(4, 2, 2, 1)
    targets = smooth_labels(jnp.array([0, 1, 2, 3]), 4, 0.0)
    mixed, mixed_targets = mixup(key, images, targets, 0.4)
    beta_key, perm_key = jax.random.split(key)
    lam = float(jax.random.beta(beta_key, 0.4, 0.4))
    perm = np.asarray(jax.random.permutation(perm_key, 4))
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[perm], rtol=1e-6)
    expected = lam * np.eye(4) + (1 - lam) * np.eye(4)[perm]
    np.testing.assert_allclose(mixed_targets, expected, rtol=1e-6)
    assert 0 <= lam <= 1 and sorted(perm) == [0, 1, 2, 3]


def test_mixup_pairs_the_same_examples_whatever_the_row_order():
    """2 processes' batches of 4 assembled process-major: canonical row t = 2k + r sits at
    row 4r + k. With that order, every example is mixed as in the canonical batch."""
    key = jax.random.key(5)
    order = np.array([4 * (t % 2) + t // 2 for t in range(8)])
    images = jax.random.normal(jax.random.key(0), (8, 2, 2, 3))
    targets = smooth_labels(jnp.arange(8) % 4, 4, 0.1)
    canonical = mixup(key, images, targets, 0.4)
    rows = np.argsort(order)  # the assembled batch: its row p is canonical row rows[p]
    assembled = mixup(key, images[rows], targets[rows], 0.4, order)
    for got, expected in zip(assembled, canonical, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[order], expected)
    identity = mixup(key, images, targets, 0.4, np.arange(8))
    np.testing.assert_array_equal(identity[0], canonical[0])


def test_soft_cross_entropy_by_hand():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    targets = jnp.array([[0.2, 0.3, 0.5]])
    log_p = np.array([1.0, 2.0, 3.0]) - np.log(np.exp([1.0, 2.0, 3.0]).sum())
    expected = -(0.2 * log_p[0] + 0.3 * log_p[1] + 0.5 * log_p[2])
    np.testing.assert_allclose(soft_cross_entropy(logits, targets), [expected], rtol=1e-6)


def test_distillation_mixes_the_teachers_softmax_in():
    targets = jnp.array([[1.0, 0.0, 0.0]])
    teacher_logits = jnp.array([[0.0, 1.0, 2.0]])
    soft = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(
        distill(targets, teacher_logits, 0.25),
        0.75 * np.array([[1, 0, 0]]) + 0.25 * soft,
        rtol=1e-6,
    )
    logits = jnp.array([[0.3, -0.2, 0.5]])
    combined = soft_cross_entropy(logits, distill(targets, teacher_logits, 0.25))
    separate = 0.75 * soft_cross_entropy(logits, targets) + 0.25 * soft_cross_entropy(
        logits, jax.nn.softmax(teacher_logits)
    )
    np.testing.assert_allclose(combined, separate, rtol=1e-6)
