"""Search spaces by name: `get_space("nb201")`. Adding a space is one line in `SPACES`.

Entries are `module:Class` paths, imported on first use, so naming a space costs nothing
until it is used (the MobileNetV2 space pulls in more than NB201 needs).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from wrcor_jax.spaces.base import ArchError, Space

SPACES: dict[str, str] = {
    "nb201": "wrcor_jax.spaces.nb201_space:NB201Space",
    "mbv2": "wrcor_jax.spaces.mbv2.space:MBV2Space",
}


def get_space(name: str, **options: Any) -> Space:
    """The space registered as `name`, built with its `options` (e.g. mbv2's flops_limit)."""
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {', '.join(SPACES)}")
    module, _, name_in_module = SPACES[name].partition(":")
    cls = getattr(importlib.import_module(module), name_in_module)
    unknown = set(options) - set(inspect.signature(cls).parameters)
    if unknown:
        raise ValueError(f"the {name} space takes no option {', '.join(sorted(unknown))}")
    return cls(**options)


__all__ = ["SPACES", "ArchError", "Space", "get_space"]
