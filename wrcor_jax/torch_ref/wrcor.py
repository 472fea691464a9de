"""WRCor and its variants computed with PyTorch hooks, the way the reference code does.

Site sets (SPEC 3a):

- "reference": a forward hook and an old-style `register_backward_hook` on every module whose
  class name contains "ReLU" (`nn.ReLU` and `ReLUConvBN`). Per conv op that gives four terms:
  the op input twice (the ReLU's and the ReLUConvBN's forward hooks), the gradient at the
  ReLU's input (ReLU backward hook) and the gradient at the BatchNorm's input (the old-style
  hook on ReLUConvBN reports the gradient of the module's last autograd node, the BatchNorm).
  The final ReLU runs in place, so its forward hook sees its output; its backward hook gives
  the gradient at its input.
- "clean": each `nn.ReLU` once, through explicit tensor hooks: its input (the final ReLU's
  too, taken before it is overwritten) and the gradient at its input along its own path.
- "allrelu": "clean" over every ReLU module, the MobileNetV2 twin's block `RELU`s included
  (in NB201, where every ReLU is an `nn.ReLU`, it equals "clean").

The same hooks run on the MobileNetV2 twin (`torch_ref.mbv2`, SPEC 3b): there only the SE's
`nn.ReLU` has "ReLU" in its class name, so "reference" gives its input and the gradient at
its input, one term each per sub-block. The block of a module comes from the twin's own
`block_of`.

Term kinds: "relu_in", "relu_out" (forward) and "grad_relu_in", "grad_bn_in" (backward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wrcor_jax.spaces.mbv2.arch import MBV2Arch
from wrcor_jax.torch_ref import mbv2
from wrcor_jax.torch_ref.nb201 import ArchLike, NB201TorchNetwork, block_of, build_network

SITE_SETS = ("reference", "clean", "allrelu")
TorchNetwork = NB201TorchNetwork | mbv2.MBV2TorchNetwork
Emit = Callable[[int, str, torch.Tensor], None]

# The old-style hook's grad_input[0], by hooked class: the gradient at the input of the
# module's last autograd node (ReluBackward0 for nn.ReLU, NativeBatchNormBackward0 for
# ReLUConvBN, whose grad_input is (d input, d weight, d bias) of the BatchNorm).
_BACKWARD_KIND = {"ReLU": "grad_relu_in", "ReLUConvBN": "grad_bn_in"}


@dataclass(frozen=True)
class WRCorResult:
    """A log-determinant score with the number of terms that entered K and were attempted."""

    score: float
    contributed: int
    attempted: int


def _is_forward(kind: str) -> bool:
    return not kind.startswith("grad_")


def _response(tensor: torch.Tensor) -> np.ndarray:
    """A response as the reference correlates it: one float64 row per sample."""
    return tensor.detach().reshape(tensor.shape[0], -1).to(torch.float64).cpu().numpy()


def _block_of(net: nn.Module) -> Callable[[str], int | None]:
    """The module-name -> block mapping of `net`'s space."""
    return mbv2.block_of if isinstance(net, mbv2.MBV2TorchNetwork) else block_of


def _reference_hooks(net: nn.Module, emit: Emit) -> list:
    """Module hooks on every module whose class name contains "ReLU"."""
    handles, block_of_module = [], _block_of(net)
    for name, module in net.named_modules():
        cls = type(module).__name__
        if "ReLU" not in cls:
            continue
        block = block_of_module(name)
        # An in-place ReLU has overwritten its input by the time the forward hook runs.
        forward_kind = "relu_out" if getattr(module, "inplace", False) else "relu_in"
        backward_kind = _BACKWARD_KIND[cls]

        def forward_hook(module, inputs, output, block=block, kind=forward_kind):
            emit(block, kind, inputs[0])

        def backward_hook(module, grad_input, grad_output, block=block, kind=backward_kind):
            emit(block, kind, grad_input[0])

        handles.append(module.register_forward_hook(forward_hook))
        handles.append(module.register_backward_hook(backward_hook))
    return handles


def _clean_hooks(net: nn.Module, emit: Emit, every_relu: bool = False) -> list:
    """Each nn.ReLU's input and the gradient at it, via a private copy of that input
    (`every_relu`: the MobileNetV2 twin's `RELU` modules too).

    The copy makes the tensor hook see only this ReLU's path, not the sum over every op
    that reads the same node, and keeps an in-place ReLU from overwriting what was emitted.
    """
    handles, block_of_module = [], _block_of(net)
    for name, module in net.named_modules():
        if not (isinstance(module, nn.ReLU) or (every_relu and isinstance(module, mbv2.RELU))):
            continue
        block = block_of_module(name)

        def pre_hook(module, inputs, block=block):
            emit(block, "relu_in", inputs[0])
            local = inputs[0].clone()
            local.register_hook(lambda grad: emit(block, "grad_relu_in", grad))
            return (local,)

        handles.append(module.register_forward_pre_hook(pre_hook))
    return handles


def _run(
    net: TorchNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    site_set: str,
    emit: Emit,
) -> None:
    """One forward and one backward pass of the mean cross-entropy, emitting every site."""
    if site_set not in SITE_SETS:
        raise ValueError(f"unknown site set {site_set!r}; known: {', '.join(SITE_SETS)}")
    if site_set == "reference":
        handles = _reference_hooks(net, emit)
    else:
        handles = _clean_hooks(net, emit, every_relu=site_set == "allrelu")
    try:
        with warnings.catch_warnings():
            # Deliberate: the reference's old-style hooks on multi-node modules.
            warnings.filterwarnings("ignore", message="Using a non-full backward hook")
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        net.zero_grad(set_to_none=True)


def torch_site_terms(
    net: TorchNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    site_set: str = "reference",
) -> list[tuple[int, str, np.ndarray]]:
    """Every hook call as (block, kind, float64 N x D response), in firing order.

    For parity checks against other engines; a batch of 64 holds ~1.4 GB of responses for
    a conv-heavy architecture, so score with `wrcor`, which keeps only the N x N sums.
    """
    terms = []
    _run(net, images, labels, site_set, lambda b, k, t: terms.append((b, k, _response(t))))
    return terms


def correlation(response: np.ndarray) -> np.ndarray | None:
    """corrcoef of the rows, or None when any entry is NaN (a zero-variance row)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(response)
    return None if np.isnan(corr).any() else corr


@dataclass
class _Kernel:
    """A running K = sum of w |C| over the terms one score takes."""

    depth_weighted: bool
    forward_only: bool
    k: np.ndarray | None = None
    contributed: int = 0
    attempted: int = 0

    def add(self, block: int, kind: str, corr: np.ndarray | None) -> None:
        if self.forward_only and not _is_forward(kind):
            return
        self.attempted += 1
        if corr is None:
            return
        term = np.abs(corr) * (2.0**block if self.depth_weighted else 1.0)
        self.k = term if self.k is None else self.k + term
        self.contributed += 1

    def result(self) -> WRCorResult:
        score = -np.inf if self.k is None else float(np.linalg.slogdet(self.k)[1])
        return WRCorResult(score, self.contributed, self.attempted)


def _scores(
    net: TorchNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    site_set: str,
    kernels: dict[str, _Kernel],
) -> dict[str, WRCorResult]:
    """Several scores from one pass: each term's correlation is computed once."""

    def emit(block: int, kind: str, tensor: torch.Tensor) -> None:
        corr = correlation(_response(tensor))
        for kernel in kernels.values():
            kernel.add(block, kind, corr)

    _run(net, images, labels, site_set, emit)
    return {name: kernel.result() for name, kernel in kernels.items()}


def wrcor(
    net: TorchNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    site_set: str = "reference",
) -> WRCorResult:
    """WRCor: log|det sum 2^block |C(response)||, terms with NaN correlations skipped."""
    kernels = {"wrcor": _Kernel(depth_weighted=True, forward_only=False)}
    return _scores(net, images, labels, site_set, kernels)["wrcor"]


def act_cor(net: TorchNetwork, images: torch.Tensor, labels: torch.Tensor) -> WRCorResult:
    """The reference's forward-only variant: unweighted sum over the forward terms."""
    kernels = {"act_cor": _Kernel(depth_weighted=False, forward_only=True)}
    return _scores(net, images, labels, "reference", kernels)["act_cor"]


def act_grad_cor(net: TorchNetwork, images: torch.Tensor, labels: torch.Tensor) -> WRCorResult:
    """The reference's unweighted variant over forward and backward terms."""
    kernels = {"act_grad_cor": _Kernel(depth_weighted=False, forward_only=False)}
    return _scores(net, images, labels, "reference", kernels)["act_grad_cor"]


_KERNEL_KINDS = {  # score -> (depth weighted, forward only)
    "wrcor": (True, False),
    "act_cor": (False, True),
    "act_grad_cor": (False, False),
}


def _kernels(*names: str) -> dict[str, _Kernel]:
    """Fresh accumulators for the named reference scores."""
    return {name: _Kernel(*_KERNEL_KINDS[name]) for name in names}


def _torch_batch(
    images_nhwc: np.ndarray, labels: np.ndarray, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A NumPy NHWC batch as torch NCHW images in `dtype` and int64 targets."""
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32)))
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    return images.permute(0, 3, 1, 2).contiguous().to(dtype), targets


def torch_scores(
    arch: ArchLike,
    params: dict,
    images_nhwc: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
) -> dict:
    """All four scores of `arch` with Flax `params` on a NumPy NHWC batch.

    Returns wrcor, wrcor_clean, act_cor, act_grad_cor (floats), terms / terms_attempted
    (hook calls of the reference site set that entered K / were made) and terms_clean.
    """
    net = build_network(arch, num_classes, params)
    images, targets = _torch_batch(images_nhwc, labels)
    reference = _scores(net, images, targets, "reference", _kernels(*_KERNEL_KINDS))
    clean = wrcor(net, images, targets, site_set="clean")
    return {
        "wrcor": reference["wrcor"].score,
        "wrcor_clean": clean.score,
        "act_cor": reference["act_cor"].score,
        "act_grad_cor": reference["act_grad_cor"].score,
        "terms": reference["wrcor"].contributed,
        "terms_attempted": reference["wrcor"].attempted,
        "terms_clean": clean.contributed,
    }


def mbv2_torch_scores(
    arch: MBV2Arch | str,
    params: dict,
    images_nhwc: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """MobileNetV2 WRCor (SE ReLUs, SPEC 3b), its every-ReLU variant and act_cor of `arch`
    with Flax `params` on a NumPy NHWC batch, the twin computing in `dtype`.

    Returns wrcor, wrcor_allrelu, act_cor (floats) and terms / terms_allrelu (hook calls
    that entered K).
    """
    net = mbv2.build_network(arch, num_classes, params).to(dtype)
    images, targets = _torch_batch(images_nhwc, labels, dtype)
    reference = _scores(net, images, targets, "reference", _kernels("wrcor", "act_cor"))
    allrelu = wrcor(net, images, targets, site_set="allrelu")
    return {
        "wrcor": reference["wrcor"].score,
        "wrcor_allrelu": allrelu.score,
        "act_cor": reference["act_cor"].score,
        "terms": reference["wrcor"].contributed,
        "terms_allrelu": allrelu.contributed,
    }
