"""Zero-shot proxies by name. Each maps an architecture's reduced responses to a score
(higher is better)."""

from collections.abc import Callable

from wrcor_jax.proxies.wrcor import act_cor, act_grad_cor, wrcor
from wrcor_jax.responses import SiteSums

PROXIES: dict[str, Callable[[SiteSums], float]] = {
    "wrcor": lambda sums: wrcor(sums, "reference"),
    "wrcor_clean": lambda sums: wrcor(sums, "clean"),
    "act_cor": lambda sums: act_cor(sums, "reference"),
    "act_grad_cor": lambda sums: act_grad_cor(sums, "reference"),
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


__all__ = ["PROXIES", "act_cor", "act_grad_cor", "parse_proxies", "wrcor"]
