"""PyTorch eager training of the MobileNetV2 twin with the trainer's recipe, step for step.

The side-by-side baseline of `wrcor_jax.train`: the same `TrainConfig` gives SGD with
momentum (optionally Nesterov), weight decay on every parameter or only on conv and linear
kernels, the gradient's global norm clipped first (as the trainer's optax chain: clip, decay,
momentum), label smoothing, mixup and a soft cross-entropy. The learning rate of each step is
the trainer's own schedule (`create_learning_rate_fn`) and mixup's coefficient and partner
permutation are the trainer's draws (`mixup_draw`), so on the same batches both sides take
the same steps up to float32 rounding. BatchNorm runs in train mode (batch statistics,
running averages with momentum 0.1 and the unbiased variance: what the Flax side copies).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import jax
import numpy as np
import optax
import torch
import torch.nn.functional as F

from wrcor_jax.torch_ref.mbv2 import MBV2TorchNetwork, _leaf_pairs, build_network
from wrcor_jax.train.configs import TrainConfig


def mixup_draw(seed: int, step: int, batch_size: int, alpha: float) -> tuple[float, np.ndarray]:
    """The mixup coefficient and partner permutation the trainer's `train_step` draws at
    `step` (`targets.mixup` under `fold_in(key(seed), step)`), so torch mixes alike."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    beta_key, perm_key = jax.random.split(key)
    lam = jax.random.beta(beta_key, alpha, alpha)
    perm = jax.random.permutation(perm_key, batch_size)
    return float(lam), np.asarray(perm)


def create_optimizer(net: torch.nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with the config's momentum and weight decay; with `decay_bn_and_bias` False only
    conv and linear kernels (the tensors of rank > 1) decay, as the trainer's mask."""
    decayed = [p for p in net.parameters() if config.decay_bn_and_bias or p.ndim > 1]
    ids = {id(p) for p in decayed}
    others = [p for p in net.parameters() if id(p) not in ids]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=0.0, momentum=config.momentum, nesterov=config.nesterov)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """A trainer batch's NHWC float32 images as a contiguous NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


@dataclass
class TorchTrainer:
    """The twin network, its optimizer and the trainer's schedule; `step` counts the steps
    taken (the trainer's `state.step`)."""

    config: TrainConfig
    net: MBV2TorchNetwork
    optimizer: torch.optim.SGD
    learning_rate_fn: optax.Schedule
    num_classes: int
    step: int = 0
    _params: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._params = list(self.net.parameters())

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, mix: tuple[float, np.ndarray] | None
    ) -> dict:
        """One SGD step on an NCHW batch; `mix` (lam, perm) mixes it as the trainer would."""
        config = self.config
        targets = F.one_hot(labels.long(), self.num_classes).float()
        targets = targets * (1.0 - config.label_smoothing) + config.label_smoothing / (
            self.num_classes
        )
        if mix is not None:
            lam = torch.tensor(mix[0], dtype=torch.float32)
            perm = torch.as_tensor(np.array(mix[1]), dtype=torch.long)
            images = lam * images + (1.0 - lam) * images[perm]
            targets = lam * targets + (1.0 - lam) * targets[perm]
        self.net.train()
        logits = self.net(images)
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.clip_norm if config.clip_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        lr = float(self.learning_rate_fn(self.step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr}

    def train_batch(self, batch: dict) -> dict:
        """`train_step` on a trainer batch ({"image": NHWC, "label"}), with the trainer's
        mixup draw for this step when the config mixes."""
        images = to_nchw(batch["image"])
        alpha = self.config.mixup_alpha
        mix = mixup_draw(self.config.seed, self.step, len(images), alpha) if alpha > 0 else None
        return self.train_step(images, torch.from_numpy(np.asarray(batch["label"])), mix)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict:
        """Top-1, top-5 and mean loss with the running averages, over masked eval batches
        (`input_pipeline.eval_batches`), as the trainer's `evaluate`."""
        self.net.eval()
        top1 = top5 = loss = count = 0.0
        for batch in batches:
            logits = self.net(to_nchw(batch["image"]))
            labels = torch.from_numpy(np.asarray(batch["label"])).long()
            mask = torch.from_numpy(np.asarray(batch["mask"])).float()
            k = min(5, self.num_classes)
            top_k = logits.topk(k, dim=-1).indices
            top1 += float(((top_k[:, 0] == labels).float() * mask).sum())
            top5 += float(((top_k == labels[:, None]).any(dim=1).float() * mask).sum())
            loss += float((F.cross_entropy(logits, labels, reduction="none") * mask).sum())
            count += float(mask.sum())
        self.net.train()
        count = max(count, 1.0)
        return {"eval_top1": top1 / count, "eval_top5": top5 / count, "eval_loss": loss / count}

    def state_dict(self) -> dict:
        """Network, optimizer (momentum buffers) and step: what a resumed run needs."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`."""
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def create_trainer(
    config: TrainConfig, params: dict, num_classes: int, learning_rate_fn: optax.Schedule
) -> TorchTrainer:
    """The mbv2 twin of `config.arch` holding the Flax tree `params` (the JAX run's initial
    weights), in train mode, with its optimizer and the trainer's schedule."""
    if config.space != "mbv2":
        raise ValueError(f"the PyTorch trainer builds the mbv2 twin, not {config.space!r}")
    if config.compute_dtype != "float32":
        raise ValueError("the PyTorch trainer computes in float32 only")
    net = build_network(config.arch, num_classes, params)
    return TorchTrainer(config, net, create_optimizer(net, config), learning_rate_fn, num_classes)


def train_loop(
    trainer: TorchTrainer,
    batches: Iterator[dict],
    total_steps: int,
    *,
    eval_every: int,
    eval_batches: Callable[[], Iterable[dict]],
    on_record: Callable[[dict], None],
    on_eval: Callable[[int], None] | None = None,
) -> dict:
    """Steps `trainer.step + 1 .. total_steps` (a restored trainer continues), evaluating
    every `eval_every` steps and at the end, as the JAX trainer's loop. Each step's record
    carries `step_s`: loading the batch and the step, the span the trainer's images/s covers.
    `on_eval(step)` runs after each evaluation (a checkpoint). Returns the last evaluation."""
    result: dict = {}
    while trainer.step < total_steps:
        start = time.perf_counter()
        batch = next(batches)
        record = trainer.train_batch(batch)
        step = trainer.step
        on_record({"step": step, **record, "step_s": time.perf_counter() - start})
        if step % eval_every == 0 or step == total_steps:
            result = trainer.evaluate(eval_batches())
            on_record({"step": step, **result})
            if on_eval is not None:
                on_eval(step)
    return result


# --------------------------------------------------------------------------- BN averages


def _stats_path(param_path: tuple[str, ...]) -> tuple[str, ...]:
    """Where the Flax network keeps the running averages of the BatchNorm whose scale sits
    at `param_path` (`spaces.mbv2.network._module_norm`'s `{prefix}{name}_stats`)."""
    block, layer, *rest = param_path[:-1]
    if not rest:  # a SuperConvK{k}BNRELU layer: the block's `layer_j_conv_stats`
        return (block, f"{layer}_conv_stats")
    name = "shortcut" if rest[0] == "shortcut" else "_".join(rest)
    return (block, layer, f"{name}_stats")


def to_flax_batch_stats(net: MBV2TorchNetwork) -> dict:
    """The twin's BatchNorm running averages as the Flax `batch_stats` tree
    ({..., "mean", "var"} per BatchNorm), to compare with a JAX state's."""
    owners = {
        id(module.weight): module
        for module in net.modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    }
    tree: dict = {}
    for path, tensor, _ in _leaf_pairs(net):
        if path[-1] != "scale":
            continue
        bn = owners[id(tensor)]
        node = tree
        *parents, leaf = _stats_path(path)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = {
            "mean": bn.running_mean.detach().numpy().copy(),
            "var": bn.running_var.detach().numpy().copy(),
        }
    return tree
