"""The training targets, made on device inside the train step: label smoothing, mixup,
distillation and the soft cross-entropy they need (as Zen-NAS's ImageNet script: smoothed
one-hot labels, then one mixup coefficient per batch with a random partner for every image)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets (B, C) with `smoothing` of the mass spread evenly over all classes."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def mixup(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    alpha: float,
    order: np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array]:
    """lam x + (1 - lam) x[perm] for images and targets alike, lam ~ Beta(alpha, alpha) and
    perm a random permutation of the (global) batch.

    `order` (static) says where the batch's rows are: row t of the canonical batch (the
    one-process run's) is row `order[t]` of `images`. The permutation is drawn over canonical
    rows and carried to these rows, so every example gets the partner it has in a one-process
    run, however the processes' local batches were assembled. None: canonical order."""
    beta_key, perm_key = jax.random.split(key)
    lam = jax.random.beta(beta_key, alpha, alpha)
    perm = jax.random.permutation(perm_key, images.shape[0])
    if order is not None:  # row order[t] takes the row of t's partner, order[perm[t]]
        order = np.asarray(order)
        perm = jnp.asarray(order)[perm][np.argsort(order)]
    mixed_images = lam * images + (1.0 - lam) * images[perm]
    return mixed_images.astype(images.dtype), lam * targets + (1.0 - lam) * targets[perm]


def distill(targets: jax.Array, teacher_logits: jax.Array, ratio: float) -> jax.Array:
    """Targets moved `ratio` of the way to the teacher's softmax. The soft cross-entropy
    being linear in its targets, this is (1 - ratio) CE(targets) + ratio CE(teacher)."""
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits))
    return (1.0 - ratio) * targets + ratio * teacher


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against a distribution over classes."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
