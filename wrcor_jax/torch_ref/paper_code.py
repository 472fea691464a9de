"""The paper's own code (a checkout of kunjing96/ZSNAS-WRCor, given by path) run unmodified on
NAS-Bench-201 and MobileNetV2-space networks, to set its scores and its speed beside this
package's.

Nothing of it is copied here: `paper_network` builds its `NASBench201Network` with
`foresight.models.get_nasbench201_model` (from the config NAS-Bench-201's API hands its
`nasbench201_pred.py`) or its `PlainNet` with `get_MobileNetV2_model`, and `paper_scores`
calls `foresight.pruners.predictive.find_measures` on it, with the batch given as a one-batch
loader ('random' dataload of one batch, CPU), as its scripts do for each architecture.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from wrcor_jax.spaces.mbv2.arch import MBV2Arch
from wrcor_jax.spaces.nb201 import CELL_PLAN, EDGES, STEM_CHANNELS, edge_name
from wrcor_jax.torch_ref import mbv2, nb201

PAPER_MEASURES = {
    "wrcor": "act_grad_cor_weighted",
    "act_cor": "act_cor",
    "act_grad_cor": "act_grad_cor",
    "synflow": "synflow",
    "snip": "snip",
    "grad_norm": "grad_norm",
    "jacob_cov": "jacob_cor",
    "naswot": "act_hamming",
}
"""Our proxy names -> the paper's code's measure names (WRCor is its act_grad_cor_weighted):
the proxies both have."""

# Our twin's edge modules -> the paper's: its NormalCell numbers its layers in the order of
# the arch string, which is our edge order.
_EDGE_KEYS = {f".edges.{edge_name(e)}.": f".layers.{e}." for e in range(len(EDGES))}
_EDGE_PATTERN = re.compile("|".join(map(re.escape, _EDGE_KEYS)))


def import_paper_code(root: str | Path) -> SimpleNamespace:
    """The entry points of the checkout at `root`: `get_nasbench201_model`,
    `get_MobileNetV2_model` and `find_measures`. Fails with a one-line error when `root`
    holds no `foresight` package."""
    root = Path(root).resolve()
    if not (root / "foresight" / "pruners" / "predictive.py").exists():
        raise FileNotFoundError(
            f"{root} is not a checkout of kunjing96/ZSNAS-WRCor (no foresight/)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from foresight.models import get_MobileNetV2_model, get_nasbench201_model
    from foresight.pruners.predictive import find_measures

    return SimpleNamespace(
        get_nasbench201_model=get_nasbench201_model,
        get_MobileNetV2_model=get_MobileNetV2_model,
        find_measures=find_measures,
    )


def paper_network(
    code: SimpleNamespace, arch: MBV2Arch | str, num_classes: int, params: dict | None = None
) -> nn.Module:
    """The paper's network of `arch` (an `MBV2Arch`, or an NB201 arch string); with `params`
    (a Flax tree) loaded through our twin, whose state_dict is the paper's up to the NB201
    cells' edge names, else with the weights torch's RNG gives it."""
    if isinstance(arch, MBV2Arch):
        net = code.get_MobileNetV2_model(
            arch.block_string, num_classes=num_classes, input_resolution=arch.resolution
        )
        twin = mbv2.build_network
    else:
        cells = sum(not reduction for *_, reduction in CELL_PLAN) // 3
        config = {"name": "infer.tiny", "C": STEM_CHANNELS, "N": cells, "arch_str": arch}
        net = code.get_nasbench201_model({**config, "num_classes": num_classes})
        twin = nb201.build_network
    if params is not None:
        state = twin(arch, num_classes, params).state_dict()
        net.load_state_dict(
            {_EDGE_PATTERN.sub(lambda m: _EDGE_KEYS[m.group()], k): v for k, v in state.items()}
        )
    return net


def paper_scores(
    code: SimpleNamespace,
    net: nn.Module,
    images_nhwc: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    proxies: tuple[str, ...] | list[str],
    device: str = "cpu",
) -> dict[str, float]:
    """{proxy: score} from the paper's `find_measures` on `net` and one NHWC batch, on torch
    `device` (its code moves the network and the batch there itself).

    Its NumPy warnings (corrcoef of constant rows, which it skips) and torch's about its
    old-style module backward hooks (what its WRCor reads, SPEC 3a) are silenced."""
    unknown = [name for name in proxies if name not in PAPER_MEASURES]
    if unknown:
        raise ValueError(f"the paper's code is run here for {', '.join(PAPER_MEASURES)} only")
    images = torch.from_numpy(np.array(images_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    names = [PAPER_MEASURES[name] for name in proxies]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", FutureWarning)
        values, _ = code.find_measures(
            net, [(images, targets)], ("random", 1, num_classes), device, measure_names=names
        )
    return {name: float(values[PAPER_MEASURES[name]]) for name in proxies}
