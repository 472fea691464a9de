"""Training and evaluation of one architecture, laid out as Flax's ImageNet example but
sharded the modern way: one `jax.jit`ed step over a `Mesh` of every device.

Batches become global arrays split along the mesh's `data` axis
(`jax.make_array_from_process_local_data`); the state is replicated. BatchNorm statistics are
therefore those of the global batch, and 1 or N devices compute the same step. On N
processes the global batch holds the one-process batch's rows in another order
(`canonical_order`) and mixup pairs the same examples, so N processes compute the step of one
too (to float rounding). Mixup, label smoothing and the per-step randomness
(`fold_in(seed, step)`) live inside the step, so a resumed run replays exactly the batches
and keys of an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from wrcor_jax.train import configs, input_pipeline, metrics
from wrcor_jax.train.checkpoints import Checkpoints
from wrcor_jax.train.configs import TrainConfig
from wrcor_jax.train.models import Network, build_network
from wrcor_jax.train.targets import distill, mixup, smooth_labels, soft_cross_entropy

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the BatchNorm running averages."""

    batch_stats: Any = None


def create_learning_rate_fn(
    config: TrainConfig, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """Linear warmup over `warmup_epochs`, then cosine decay to 0 at `total_steps`, per step;
    the peak is `learning_rate` scaled from `lr_batch_size` to the global batch."""
    peak = config.learning_rate * config.batch_size / config.lr_batch_size
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    if warmup == 0:
        return cosine
    ramp = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([ramp, cosine], boundaries=[warmup])


def weight_decay_mask(params: Any, decay_bn_and_bias: bool) -> Any:
    """Which parameters weight decay reaches: all, or only conv and linear kernels."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay_bn_and_bias or path[-1].key == "kernel", params
    )


def create_optimizer(
    config: TrainConfig, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """Clip the gradient's global norm, add weight decay, SGD with momentum: the order in
    which PyTorch's `clip_grad_norm_` and `SGD(weight_decay=...)` apply them."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity(),
        optax.add_decayed_weights(
            config.weight_decay,
            functools.partial(weight_decay_mask, decay_bn_and_bias=config.decay_bn_and_bias),
        ),
        optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov),
    )


def create_train_state(
    config: TrainConfig, network: Network, learning_rate_fn: optax.Schedule
) -> TrainState:
    """Step 0: the network's initial variables and the optimizer's state (host arrays)."""
    resolution = config.data.resolution
    variables = network.init_variables(config.seed, (1, resolution, resolution, 3))
    return TrainState.create(
        apply_fn=network.apply_train,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=create_optimizer(config, learning_rate_fn),
    )


def train_step(
    state: TrainState,
    batch: dict,
    teacher_variables: dict | None = None,
    *,
    network: Network,
    config: TrainConfig,
    learning_rate_fn: optax.Schedule,
    teacher: Network | None = None,
    order: np.ndarray | None = None,
) -> tuple[TrainState, dict]:
    """One SGD step on a (global) batch: smoothed labels, mixup, the teacher's distribution
    (if any) on the mixed images, soft cross-entropy. `order`: where the batch's rows are
    (`canonical_order`)."""
    targets = smooth_labels(batch["label"], network.num_classes, config.label_smoothing)
    images = batch["image"]
    if config.mixup_alpha > 0:
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        images, targets = mixup(key, images, targets, config.mixup_alpha, order)
    if teacher is not None:
        targets = distill(targets, teacher.apply_eval(teacher_variables, images), config.kd_ratio)

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, batch_stats = network.apply_train(variables, images)
        return soft_cross_entropy(logits, targets).mean(), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    step_metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate_fn(state.step),
    }
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), step_metrics


def eval_step(state: TrainState, batch: dict, *, network: Network) -> dict:
    """Sums over the unmasked examples of a batch: loss, top-1 and top-5 hits, count."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = network.apply_eval(variables, batch["image"])
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    loss = soft_cross_entropy(logits, jax.nn.one_hot(labels, network.num_classes))
    k = min(5, network.num_classes)
    top_k = jax.lax.top_k(logits, k)[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((top_k[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top_k == labels[:, None], axis=1) * mask),
        "count": jnp.sum(mask),
    }


# --------------------------------------------------------------------------- the run


def initialize_distributed() -> None:
    """Join the other processes when launched on several hosts ($JAX_COORDINATOR_ADDRESS with
    $JAX_NUM_PROCESSES and $JAX_PROCESS_ID or a cluster JAX detects, or a TPU slice of several
    workers), as `wrcor-jax train --distributed auto` does; a no-op on one host or when
    already joined. Cross-process collectives on CPU go through gloo (JAX's default)."""
    several_tpu_hosts = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if (os.environ.get("JAX_COORDINATOR_ADDRESS") or several_tpu_hosts) and not (
        jax.distributed.is_initialized()
    ):
        from wrcor_jax.distributed import connect

        connect()


def data_mesh() -> Mesh:
    """Every device of every process on one `data` axis, sharded automatically inside the
    step (`Auto`: the compiler places mixup's gather and BatchNorm's reductions)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """A process's batch (NumPy) as slices of one global array per key."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local.items()
    }


def canonical_order(sharding: NamedSharding, batch_size: int) -> np.ndarray | None:
    """Where the rows of a one-process global batch lie in the assembled one, or None when
    in place (one process).

    Process r's local row k is row N * k + r of the one-process batch (the loader's
    interleaving); `jax.make_array_from_process_local_data` puts a process's rows, in order,
    into the slices its devices hold: on a process-major mesh, row r * (B / N) + k. The
    result, order[t] = assembled row of canonical row t, is read off the sharding, so it
    holds for any device order."""
    count = jax.process_count()
    if count == 1:
        return None
    slices: dict[int, list[int]] = {}
    for device, (rows,) in sharding.devices_indices_map((batch_size,)).items():
        slices.setdefault(device.process_index, []).extend(range(batch_size)[rows])
    order = np.empty(batch_size, np.int64)
    for process, rows in slices.items():
        order[process::count] = sorted(set(rows))
    return order


def run_length(config: TrainConfig, num_train: int) -> tuple[int, int]:
    """Steps per epoch and in all; the batch must split over the devices and fit the data."""
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"batch size {config.batch_size} does not split over {jax.device_count()} devices"
        )
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} exceeds the {num_train} train images")
    return steps_per_epoch, config.num_steps or math.ceil(config.num_epochs * steps_per_epoch)


def check_workdir(workdir: Path, config: TrainConfig) -> None:
    """Record `config` in a new workdir; refuse one that holds another run's config. Every
    process reads what is there before process 0 writes."""
    path = workdir / CONFIG_FILE
    saved = configs.from_json(path.read_text()) if path.exists() else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("wrcor_jax: config read")
    if saved is not None:
        if saved != config:
            changed = sorted(
                key
                for key, value in configs.flatten(config).items()
                if configs.flatten(saved).get(key) != value
            )
            raise ValueError(
                f"{workdir} holds a run with another config (differs in {', '.join(changed)}); "
                "use another --workdir or the same options"
            )
        return
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_json())


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then: save, exit 0). On
    several processes JAX's preemption service catches the signal instead and every process
    stops at the same step (`Checkpoints.reached_preemption`)."""

    def __init__(self):
        self.requested = False

    def __enter__(self) -> _Preemption:
        handler = self._handle if jax.process_count() == 1 else signal.getsignal(signal.SIGTERM)
        self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def evaluate(
    state: TrainState, batches: Iterator[dict], step_fn: Callable, sharding: NamedSharding
) -> dict:
    """Top-1, top-5 and mean loss over one pass of the eval split."""
    totals = None
    for batch in batches:
        sums = step_fn(state, global_batch(batch, sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        "eval_top1": float(totals["top1"]) / count,
        "eval_top5": float(totals["top5"]) / count,
        "eval_loss": float(totals["loss"]) / count,
    }


def _jit_eval_step(network: Network, replicated: NamedSharding) -> Callable:
    return jax.jit(functools.partial(eval_step, network=network), out_shardings=replicated)


def train_and_evaluate(config: TrainConfig, workdir: str | Path) -> dict:
    """Train `config.arch` as `config` says, checkpointing under `workdir` and resuming from
    its last checkpoint; returns the final evaluation (`eval_top1`, `eval_top5`, ...)."""
    initialize_distributed()
    workdir = Path(workdir)
    num_train, _, num_classes = input_pipeline.dataset_info(config.data)
    network = build_network(config.space, config.arch, num_classes, config.compute_dtype)
    steps_per_epoch, total_steps = run_length(config, num_train)
    eval_every = config.eval_every_steps or steps_per_epoch
    mesh = data_mesh()
    teacher, teacher_variables = load_teacher(config, num_classes, mesh)
    check_workdir(workdir, config)

    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
    state = create_train_state(config, network, learning_rate_fn)
    iterator = iter(input_pipeline.train_loader(config.data, config.batch_size, config.seed))
    checkpoints = Checkpoints(
        workdir / "checkpoints", config.checkpoint_every_steps, config.keep_checkpoints
    )
    start = checkpoints.latest_step() or 0
    state = jax.device_put(state, replicated)
    if start:
        state = checkpoints.restore(start, state, iterator)

    step_fn = jax.jit(
        functools.partial(
            train_step,
            network=network,
            config=config,
            learning_rate_fn=learning_rate_fn,
            teacher=teacher,
            order=canonical_order(data_sharding, config.batch_size),
        ),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = _jit_eval_step(network, replicated)
    is_writer = jax.process_index() == 0
    # every process reads the last evaluation before process 0 rewrites the file
    evals = [
        r for r in metrics.read(workdir / METRICS_FILE) if "eval_top1" in r and r["step"] <= start
    ]
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("wrcor_jax: metrics read")
    log = metrics.MetricsLog(workdir / METRICS_FILE, start) if is_writer else None
    result = {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=not is_writer)
    throughput = metrics.Throughput(config.batch_size, start)
    step = start
    with _Preemption() as preemption:
        for step in range(start + 1, total_steps + 1):
            batch = global_batch(next(iterator), data_sharding)
            state, step_metrics = step_fn(state, batch, teacher_variables)
            bar.update()
            if step % config.log_every_steps == 0 or step == total_steps:
                record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                record["images_per_s"] = throughput.read(step)
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                if log:
                    log.write({"step": step, **record})
            if step % eval_every == 0 or step == total_steps:
                result = evaluate(
                    state,
                    input_pipeline.eval_batches(config.data, config.batch_size),
                    eval_fn,
                    data_sharding,
                )
                if log:
                    log.write({"step": step, **result})
                throughput.pause_ended()
            stop = preemption.requested or checkpoints.reached_preemption(step)
            checkpoints.save(step, state, iterator, force=step == total_steps or stop)
            if stop:
                break
    bar.close()
    checkpoints.close()
    if log and step == total_steps:
        metrics.plot(workdir / METRICS_FILE, workdir / CURVES_FILE)
    return result


def restore_run(
    workdir: str | Path, mesh: Mesh, step: int | None = None
) -> tuple[TrainConfig, Network, TrainState, int]:
    """The config, network and replicated state of a run's checkpoint `step` (default: the
    latest), for re-evaluation or as a distillation teacher."""
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"{workdir} holds no training run ({CONFIG_FILE} missing)")
    config = configs.from_json(path.read_text())
    checkpoints = Checkpoints(
        workdir / "checkpoints", config.checkpoint_every_steps, config.keep_checkpoints
    )
    step = step or checkpoints.latest_step()
    if step is None:
        raise ValueError(f"{workdir} holds no checkpoint yet")
    _, _, num_classes = input_pipeline.dataset_info(config.data)
    network = build_network(config.space, config.arch, num_classes, config.compute_dtype)
    template = create_train_state(config, network, optax.constant_schedule(0.0))
    state = checkpoints.restore(step, jax.device_put(template, NamedSharding(mesh, P())))
    checkpoints.close()
    return config, network, state, step


def load_teacher(
    config: TrainConfig, num_classes: int, mesh: Mesh
) -> tuple[Network | None, dict | None]:
    """The distillation teacher of `config` and its variables (None, None without one)."""
    if config.teacher_workdir is None:
        return None, None
    _, teacher, state, _ = restore_run(config.teacher_workdir, mesh)
    if teacher.num_classes != num_classes:
        raise ValueError(
            f"teacher {config.teacher_workdir} has {teacher.num_classes} classes, not {num_classes}"
        )
    return teacher, {"params": state.params, "batch_stats": state.batch_stats}


def evaluate_checkpoint(workdir: str | Path, step: int | None = None) -> dict:
    """Re-evaluate the checkpoint of `step` (default: the latest) of the run in `workdir`."""
    mesh = data_mesh()
    config, network, state, step = restore_run(workdir, mesh, step)
    batches = input_pipeline.eval_batches(config.data, config.batch_size)
    eval_fn = _jit_eval_step(network, NamedSharding(mesh, P()))
    return {"step": step, **evaluate(state, batches, eval_fn, NamedSharding(mesh, P("data")))}
