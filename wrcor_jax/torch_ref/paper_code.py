"""The paper's own code (a checkout of kunjing96/ZSNAS-WRCor, given by path) run unmodified on
MobileNetV2-space networks, to set its scores and its speed beside this package's.

Nothing of it is copied here: `paper_network` builds its `PlainNet` with
`foresight.models.get_MobileNetV2_model` and `paper_scores` calls
`foresight.pruners.predictive.find_measures` on it, with the batch given as a one-batch
loader ('random' dataload of one batch, CPU), as its `search.py` does for each architecture.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from wrcor_jax.spaces.mbv2.arch import MBV2Arch
from wrcor_jax.torch_ref import mbv2

PAPER_MEASURES = {"wrcor": "act_grad_cor_weighted", "synflow": "synflow", "jacob_cov": "jacob_cor"}
"""Our proxy names -> the paper's code's measure names (WRCor is its act_grad_cor_weighted)."""


def import_paper_code(root: str | Path) -> SimpleNamespace:
    """The two entry points of the checkout at `root`: `get_MobileNetV2_model` and
    `find_measures`. Fails with a one-line error when `root` holds no `foresight` package."""
    root = Path(root).resolve()
    if not (root / "foresight" / "pruners" / "predictive.py").exists():
        raise FileNotFoundError(
            f"{root} is not a checkout of kunjing96/ZSNAS-WRCor (no foresight/)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from foresight.models import get_MobileNetV2_model
    from foresight.pruners.predictive import find_measures

    return SimpleNamespace(get_MobileNetV2_model=get_MobileNetV2_model, find_measures=find_measures)


def paper_network(
    code: SimpleNamespace, arch: MBV2Arch, num_classes: int, params: dict | None = None
) -> nn.Module:
    """The paper's network of `arch`; with `params` (a Flax tree) loaded through our twin,
    whose state_dict keys are the paper's, else with the weights torch's RNG gives it."""
    net = code.get_MobileNetV2_model(
        arch.block_string, num_classes=num_classes, input_resolution=arch.resolution
    )
    if params is not None:
        net.load_state_dict(mbv2.build_network(arch, num_classes, params).state_dict())
    return net


def paper_scores(
    code: SimpleNamespace,
    net: nn.Module,
    images_nhwc: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    proxies: tuple[str, ...] | list[str],
) -> dict[str, float]:
    """{proxy: score} from the paper's `find_measures` on `net` and one NHWC batch.

    Its NumPy warnings (corrcoef of constant rows, which it skips) are silenced."""
    unknown = [name for name in proxies if name not in PAPER_MEASURES]
    if unknown:
        raise ValueError(f"the paper's code is run here for {', '.join(PAPER_MEASURES)} only")
    images = torch.from_numpy(np.array(images_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    names = [PAPER_MEASURES[name] for name in proxies]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values, _ = code.find_measures(
            net, [(images, targets)], ("random", 1, num_classes), "cpu", measure_names=names
        )
    return {name: float(values[PAPER_MEASURES[name]]) for name in proxies}
