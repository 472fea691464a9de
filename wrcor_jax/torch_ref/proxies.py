"""The other zero-shot proxies (SPEC 4) in PyTorch, computed the way the reference code does.

Module hooks and autograd on an eager `NB201TorchNetwork` or `MBV2TorchNetwork` (training
mode: BatchNorm uses the batch's statistics), with the final reductions in NumPy float64.
These are the independent side of the JAX proxies' parity checks, so each follows its
written definition literally; where the two networks differ, it says how:

- snip: sum over Conv2d/Linear weights of |w * dL/dw|, L the mean cross-entropy.
- grad_norm: sum over Conv2d/Linear layers of ||dL/dW||_F.
- jacob_cov: J = d(sum of logits)/dx per sample; v = eigvalsh(corrcoef(J));
  -sum(log(v + 1e-5) + 1/(v + 1e-5)). NaN when a row of J has zero variance (as the
  reference, whose try/except turns the failed eigen-decomposition into NaN).
- synflow: BatchNorm -> identity, float64, |parameters|, an all-ones input of batch 1;
  R = sum of logits; sum over Conv2d/Linear weights of |w * dR/dw|.
- naswot: binary codes at the reference's WRCor forward sites (SPEC 3a: every module whose
  class name contains "ReLU", so each conv op's input twice, the in-place final ReLU on its
  output; in MobileNetV2 that matches only each SE's nn.ReLU, SPEC 3b);
  K = sum c c^T + (1 - c)(1 - c)^T; slogdet(K)[1].
- params: every parameter's numel. flops: Conv2d/Linear multiply-accumulates per image.
- zico: the batch split in two halves, one backward each; per layer
  log(sum mean|g| / std(g)) over entries with nonzero std (Li et al., ICLR 2023).
- meco: minimum eigenvalue of the channel correlation of sample 0's feature map, summed over
  (NB201) the stem, the normal cells' non-none edge outputs, every cell's output, the
  reduction cells' conv_a/conv_b outputs and the final BN-ReLU output; (MobileNetV2) every
  block ReLU's (`RELU`) output (Jiang et al., NeurIPS 2023).
- zen: log(mean_i sum |f(x) - f(x_mixed)|) + sum over BatchNorms of log sqrt(mean over
  channels of the biased batch variance of its input on x), BatchNorms with a constant
  input (variance 0: a conv reading an all-zero node) left out; f = the features before
  global pooling (Lin et al., ICCV 2021). The caller supplies the Gaussian weights and
  inputs; in MobileNetV2 the network loses its residual links first (`zen_network`), as
  Zen-NAS computes it there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wrcor_jax.spaces.mbv2.arch import MBV2Arch
from wrcor_jax.torch_ref import mbv2, nb201
from wrcor_jax.torch_ref.nb201 import (
    ArchLike,
    InferCell,
    NB201TorchNetwork,
    ResNetBasicblock,
    Zero,
)

TorchNetwork = NB201TorchNetwork | mbv2.MBV2TorchNetwork

JACOB_COV_K = 1e-5
PROXY_NAMES = (
    "snip",
    "grad_norm",
    "jacob_cov",
    "synflow",
    "naswot",
    "params",
    "flops",
    "zico",
    "meco",
    "zen",
)


# --------------------------------------------------------------------------- helpers


def _weight_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear module, in `named_modules` order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy()


def _weight_grad(module: nn.Module) -> np.ndarray:
    """dL/dW as float64 (zeros when the weight took no part in the loss)."""
    grad = module.weight.grad
    return np.zeros(tuple(module.weight.shape)) if grad is None else _f64(grad)


def _with_hooks(handles: list, run: Callable[[], object]) -> object:
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


def _loss_backward(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Fresh gradients of the mean cross-entropy on (images, labels)."""
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(images), labels).backward()


# --------------------------------------------------------------------------- gradient proxies


def snip(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """sum over Conv2d/Linear weights of |w * dL/dw| (biases and BatchNorm excluded)."""
    _loss_backward(net, images, labels)
    score = sum(np.abs(_f64(m.weight) * _weight_grad(m)).sum() for _, m in _weight_layers(net))
    net.zero_grad(set_to_none=True)
    return float(score)


def grad_norm(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """sum over Conv2d/Linear layers of the Frobenius norm of dL/dW."""
    _loss_backward(net, images, labels)
    score = sum(np.linalg.norm(_weight_grad(m).ravel()) for _, m in _weight_layers(net))
    net.zero_grad(set_to_none=True)
    return float(score)


def jacob_cov_score(jacobian: np.ndarray) -> float:
    """-sum(log(v + k) + 1/(v + k)), v the eigenvalues of corrcoef of the rows; NaN if undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(np.asarray(jacobian, np.float64).reshape(len(jacobian), -1))
    if not np.isfinite(corr).all():
        return float("nan")
    v = np.linalg.eigvalsh(corr)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(-np.sum(np.log(v + JACOB_COV_K) + 1.0 / (v + JACOB_COV_K)))


def input_jacobian(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """d(sum of logits)/dx, one float64 row per sample (BatchNorm couples the samples)."""
    net.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    logits = net(x)
    logits.backward(torch.ones_like(logits))
    net.zero_grad(set_to_none=True)
    return _f64(x.grad).reshape(len(x), -1)


def jacob_cov(net: nn.Module, images: torch.Tensor) -> float:
    """The Jacobian covariance score of the input gradients of the summed logits."""
    return jacob_cov_score(input_jacobian(net, images))


def _without_batch_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` by nn.Identity, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            _without_batch_norm(child)


def synflow_terms(net: nn.Module, image_shape: Sequence[int]) -> tuple[dict[str, float], float]:
    """Per Conv2d/Linear weight sum |w * dR/dw| of the linearised float64 copy, and R.

    The copy has no BatchNorm, |parameters| (biases too), and sees one all-ones image of
    shape `image_shape` = (C, H, W); `net` itself is left untouched.
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    linear = copy.deepcopy(net)
    _without_batch_norm(linear)
    linear = linear.double()
    with torch.no_grad():
        for param in linear.parameters():
            param.abs_()
    linear.zero_grad(set_to_none=True)
    total = linear(torch.ones((1, *image_shape), dtype=torch.float64)).sum()
    total.backward()
    terms = {
        name: float(np.abs(_f64(m.weight) * _weight_grad(m)).sum())
        for name, m in _weight_layers(linear)
    }
    return terms, float(total.detach())


def synflow(net: nn.Module, image_shape: Sequence[int]) -> float:
    """SynFlow on a BatchNorm-free, |theta|, float64 copy with an all-ones input."""
    terms, _ = synflow_terms(net, image_shape)
    return float(np.sum(list(terms.values())))


# --------------------------------------------------------------------------- NASWOT


def naswot_kernel(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """K_H = sum over the reference's forward sites of c c^T + (1 - c)(1 - c)^T, float64.

    Sites: a forward hook on every module whose class name contains "ReLU" (`nn.ReLU` and
    `ReLUConvBN`), reading its input; the in-place final ReLU has overwritten its input
    with its output by then. Every hook fires, an all-zero input included.
    """
    n = len(images)
    kernel = np.zeros((n, n))

    def hook(module, inputs, output):
        nonlocal kernel
        codes = (inputs[0].detach() > 0).reshape(n, -1).to(torch.float64).cpu().numpy()
        kernel = kernel + codes @ codes.T + (1.0 - codes) @ (1.0 - codes).T

    handles = [m.register_forward_hook(hook) for m in net.modules() if "ReLU" in type(m).__name__]

    def run():
        with torch.no_grad():
            net(images)

    _with_hooks(handles, run)
    return kernel


def naswot(net: nn.Module, images: torch.Tensor) -> float:
    """log|det K_H| of the binary activation codes (the reference's `act_hamming`)."""
    return float(np.linalg.slogdet(naswot_kernel(net, images))[1])


# --------------------------------------------------------------------------- size


def params(net: nn.Module) -> int:
    """Number of parameters (BatchNorm scale and bias included)."""
    return int(sum(p.numel() for p in net.parameters()))


def flops(net: nn.Module, image_shape: Sequence[int]) -> int:
    """Conv2d and Linear multiply-accumulates of one (C, H, W) image, counted by forward hooks.

    Conv: output elements x in_channels/groups x kh x kw; Linear: in x out. BatchNorm, pools,
    activations and additions are not counted. Runs in eval mode (no statistics update).
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    count = 0

    def conv_hook(module, inputs, output):
        nonlocal count
        kh, kw = module.kernel_size
        count += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module, inputs, output):
        nonlocal count
        count += module.in_features * module.out_features

    handles = []
    for _, module in _weight_layers(net):
        hook = conv_hook if isinstance(module, nn.Conv2d) else linear_hook
        handles.append(module.register_forward_hook(hook))
    was_training = net.training
    dtype = next(net.parameters()).dtype

    def run():
        net.eval()
        with torch.no_grad():
            net(torch.zeros((1, *image_shape), dtype=dtype))

    try:
        _with_hooks(handles, run)
    finally:
        net.train(was_training)
    return int(count)


# --------------------------------------------------------------------------- ZiCo


def zico_score(gradients: Sequence[np.ndarray]) -> float:
    """sum over layers of log(sum over nonzero-std entries of mean|g| / std(g)).

    `gradients[l]` stacks layer l's flattened weight gradients, one row per batch (here 2).
    A layer whose sum is 0 (every std zero) adds nothing, as in the reference.
    """
    score = 0.0
    for grads in gradients:
        grads = np.asarray(grads, np.float64)
        std = grads.std(axis=0)
        mean_abs = np.abs(grads).mean(axis=0)
        nonzero = std != 0
        total = np.sum(mean_abs[nonzero] / std[nonzero])
        if total != 0:
            score += np.log(total)
    return float(score)


def zico(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """ZiCo with the first and the last N/2 samples as its two batches (BN per half)."""
    half = len(images) // 2
    if half < 1:
        raise ValueError("ZiCo needs at least two samples")
    parts = (slice(0, half), slice(len(images) - half, len(images)))
    per_half = []
    for part in parts:
        _loss_backward(net, images[part], labels[part])
        per_half.append([_weight_grad(m).ravel() for _, m in _weight_layers(net)])
    net.zero_grad(set_to_none=True)
    return zico_score([np.stack(layer) for layer in zip(*per_half, strict=True)])


# --------------------------------------------------------------------------- MeCo


def meco_map_score(feature_map: np.ndarray) -> float:
    """Minimum eigenvalue of corrcoef over the channels of one (C, H, W) map, NaN set to 0."""
    fea = np.asarray(feature_map, np.float64).reshape(len(feature_map), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(fea)
    corr[np.isnan(corr)] = 0.0
    return float(np.linalg.eigvalsh(corr)[0])


def meco_modules(net: TorchNetwork) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs MeCo reads. NB201: stem, non-none normal edges,
    conv_a/conv_b, every cell, the final BN-ReLU. MobileNetV2: every block ReLU (`RELU`;
    the SE's 1 x 1 maps would add 0)."""
    if isinstance(net, mbv2.MBV2TorchNetwork):
        return [(name, m) for name, m in net.named_modules() if isinstance(m, mbv2.RELU)]
    chosen = [("stem", net.stem)]
    for index, cell in enumerate(net.cells):
        if isinstance(cell, InferCell):
            chosen += [
                (f"cells.{index}.edges.{key}", op)
                for key, op in cell.edges.items()
                if not isinstance(op, Zero)
            ]
        elif isinstance(cell, ResNetBasicblock):
            chosen += [
                (f"cells.{index}.conv_a", cell.conv_a),
                (f"cells.{index}.conv_b", cell.conv_b),
            ]
        chosen.append((f"cells.{index}", cell))
    chosen.append(("lastact", net.lastact))
    return chosen


def meco_terms(net: TorchNetwork, images: torch.Tensor) -> dict[str, float]:
    """Each MeCo map's minimum eigenvalue (sample 0), by module name, in firing order."""
    terms: dict[str, float] = {}
    handles = []
    for name, module in meco_modules(net):

        def hook(module, inputs, output, name=name):
            terms[name] = meco_map_score(_f64(output[0]))

        handles.append(module.register_forward_hook(hook))

    def run():
        with torch.no_grad():
            net(images)

    _with_hooks(handles, run)
    return terms


def meco(net: TorchNetwork, images: torch.Tensor) -> float:
    """MeCo: sum over the feature maps of the minimum channel-correlation eigenvalue."""
    return float(np.sum(list(meco_terms(net, images).values())))


# --------------------------------------------------------------------------- Zen


def _last_feature_module(net: TorchNetwork) -> nn.Module:
    """The module whose output global pooling reads: NB201's final BN-ReLU, MobileNetV2's
    last block."""
    return net.module_list[-1] if isinstance(net, mbv2.MBV2TorchNetwork) else net.lastact


def pre_gap_features(net: TorchNetwork, images: torch.Tensor) -> torch.Tensor:
    """The features before global pooling, read by a hook during a whole forward pass."""
    features = []
    handle = _last_feature_module(net).register_forward_hook(
        lambda module, inputs, output: features.append(output)
    )
    _with_hooks([handle], lambda: net(images))
    return features[0]


def without_residual_links(net: mbv2.MBV2TorchNetwork) -> mbv2.MBV2TorchNetwork:
    """Zen-NAS's `no_reslink` network, in place: every sub-block becomes its body alone
    (same modules, no shortcut; the projection's conv and BatchNorm are dropped), still
    followed by its block's ReLU."""
    for block in net.module_list:
        for index, sub in enumerate(block.module_list):
            if isinstance(sub, mbv2.ResBlock | mbv2.ResBlockProj):
                block.module_list[index] = nn.Sequential(*sub.module_list)
    return net


def zen_network(arch: ArchLike | MBV2Arch, num_classes: int, params: dict) -> TorchNetwork:
    """The network Zen-score runs with `params`: NB201's as it is, MobileNetV2's without
    residual links (as Zen-NAS scores its MobileNetV2 space)."""
    net = build_network(arch, num_classes, params)
    return without_residual_links(net) if isinstance(net, mbv2.MBV2TorchNetwork) else net


def zen_terms(
    net: TorchNetwork, x: torch.Tensor, x_mixed: torch.Tensor
) -> tuple[float, list[float]]:
    """(delta, [sigma of each BatchNorm2d in module order]) of the Zen-score."""
    sigmas: dict[str, float] = {}
    handles = []
    for name, module in net.named_modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue

        def pre_hook(module, inputs, name=name):
            var = inputs[0].detach().to(torch.float64).var(dim=(0, 2, 3), unbiased=False)
            sigmas[name] = float(torch.sqrt(var.mean()))

        handles.append(module.register_forward_pre_hook(pre_hook))

    def run():
        with torch.no_grad():
            return _f64(pre_gap_features(net, x))

    features = _with_hooks(handles, run)
    with torch.no_grad():
        mixed = _f64(pre_gap_features(net, x_mixed))
    delta = float(np.abs(features - mixed).reshape(len(features), -1).sum(axis=1).mean())
    return delta, list(sigmas.values())


def zen(net: TorchNetwork, x: torch.Tensor, x_mixed: torch.Tensor) -> float:
    """Zen-score: log delta + sum over BatchNorms of log sigma (float64). A BatchNorm whose
    input is constant (sigma 0: a conv reading an all-zero node) is left out."""
    delta, sigmas = zen_terms(net, x, x_mixed)
    with np.errstate(divide="ignore"):
        return float(np.log(delta) + np.sum(np.log([s for s in sigmas if s > 0])))


# --------------------------------------------------------------------------- driver


def build_network(
    arch: ArchLike | MBV2Arch, num_classes: int, params: dict | None = None
) -> TorchNetwork:
    """The twin of an NB201 architecture or of a MobileNetV2-space one (an `MBV2Arch`)."""
    space = mbv2 if isinstance(arch, MBV2Arch) else nb201
    return space.build_network(arch, num_classes, params)


def _nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    images = np.array(images_nhwc, np.float32)  # a writable copy (JAX arrays are read-only)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def torch_proxy_scores(
    arch: ArchLike | MBV2Arch,
    flax_params: dict,
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    num_classes: int,
    zen_params: dict | None = None,
    zen_inputs: tuple[np.ndarray, np.ndarray] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """{name: score} of `arch` (NB201, or an `MBV2Arch`) with Flax `flax_params` on an NHWC
    batch (NumPy or JAX arrays).

    `zen` needs `zen_params` (a Flax tree of Gaussian weights) and `zen_inputs` = (x,
    x_mixed), NHWC, as `wrcor_jax.proxies.zen` (NB201) or `spaces.mbv2.measures`
    (MobileNetV2) makes them. `dtype` is the network's and the
    inputs' precision: float32 as the reference runs, float64 for the exact values that
    float32 results of both frameworks scatter around (the gradients of this deep BatchNorm
    network are ill-conditioned; synflow is float64 either way).
    """
    unknown = [name for name in names if name not in PROXY_NAMES]
    if unknown:
        raise ValueError(f"unknown proxy {unknown[0]!r}; known: {', '.join(PROXY_NAMES)}")
    net = build_network(arch, num_classes, flax_params).to(dtype)
    x = _nchw(images).to(dtype)
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    image_shape = tuple(x.shape[1:])
    compute = {
        "snip": lambda: snip(net, x, y),
        "grad_norm": lambda: grad_norm(net, x, y),
        "jacob_cov": lambda: jacob_cov(net, x),
        "synflow": lambda: synflow(net, image_shape),
        "naswot": lambda: naswot(net, x),
        "params": lambda: params(net),
        "flops": lambda: flops(net, image_shape),
        "zico": lambda: zico(net, x, y),
        "meco": lambda: meco(net, x),
    }
    out = {}
    for name in names:
        if name == "zen":
            if zen_params is None or zen_inputs is None:
                raise ValueError("zen needs zen_params and zen_inputs (see wrcor_jax.proxies.zen)")
            gaussian = zen_network(arch, num_classes, zen_params).to(dtype)
            mixed = (_nchw(inputs).to(dtype) for inputs in zen_inputs)
            out[name] = zen(gaussian, *mixed)
        else:
            out[name] = float(compute[name]())
    return out
