"""Zero-shot proxies by name (SPEC 3 and 4); higher is better for every one.

A proxy reads one measurement of an architecture and turns it into a score. Proxies that
read the same measurement share it, so asking for several costs little more than for one:
- `site_sums` (the composed engine's correlation sums): the WRCor family;
- `loss_grads`: snip, grad_norm; `half_batch_grads`: zico; `synflow_grads`: synflow;
- `input_jacobian`: jacob_cov; `activations`: naswot, meco; `zen`: zen;
- `macs`: flops; none: params (counted from the used weights).
The score function gets the measurement and the architecture's used weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from wrcor_jax.proxies.activation import jacob_cov, meco, naswot
from wrcor_jax.proxies.gradient import grad_norm, snip, synflow, zico
from wrcor_jax.proxies.wrcor import act_cor, act_grad_cor, wrcor
from wrcor_jax.proxies.zen import zen
from wrcor_jax.responses import SiteSums


@dataclasses.dataclass(frozen=True)
class Proxy:
    """Which measurement a proxy reads (None: only the weights) and how it scores it."""

    measurement: str | None
    score: Callable[[Any, dict], float]


def _param_count(_: None, params: dict) -> float:
    """Trainable parameters (BN scale and bias included, as torch counts them)."""
    return float(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


RESPONSE_PROXIES: dict[str, Callable[[SiteSums], float]] = {
    "wrcor": lambda sums: wrcor(sums, "reference"),
    "wrcor_clean": lambda sums: wrcor(sums, "clean"),
    "act_cor": lambda sums: act_cor(sums, "reference"),
    "act_grad_cor": lambda sums: act_grad_cor(sums, "reference"),
    # Every ReLU once, its input and the gradient at its input. On NB201, whose sums hold no
    # block_* kinds, this site set weighs exactly as "clean": there it equals wrcor_clean.
    "wrcor_allrelu": lambda sums: wrcor(sums, "mbv2_allrelu"),
}
"""The WRCor family, scored from the composed engine's correlation sums alone."""

PROXIES: dict[str, Proxy] = {
    **{
        name: Proxy("site_sums", lambda sums, _, f=f: f(sums))
        for name, f in RESPONSE_PROXIES.items()
    },
    "synflow": Proxy("synflow_grads", synflow),
    "snip": Proxy("loss_grads", snip),
    "grad_norm": Proxy("loss_grads", grad_norm),
    "jacob_cov": Proxy("input_jacobian", jacob_cov),
    "naswot": Proxy("activations", naswot),
    "params": Proxy(None, _param_count),
    "flops": Proxy("macs", lambda macs, _: float(macs)),
    "zico": Proxy("half_batch_grads", zico),
    "meco": Proxy("activations", meco),
    "zen": Proxy("zen", zen),
}


def parse_proxies(text: str) -> list[str]:
    """'wrcor,act_cor' -> ['wrcor', 'act_cor'], rejecting unknown or repeated names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no proxy given; known proxies: " + ", ".join(PROXIES))
    for name in names:
        if name not in PROXIES:
            raise ValueError(f"unknown proxy {name!r}; known proxies: {', '.join(PROXIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"proxy listed twice in {text!r}")
    return names


__all__ = [
    "PROXIES",
    "RESPONSE_PROXIES",
    "Proxy",
    "act_cor",
    "act_grad_cor",
    "parse_proxies",
    "wrcor",
]
