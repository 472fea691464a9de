"""Search spaces by name: `get_space("nb201")`. Adding a space is one line in `SPACES`.

Entries are `module:Class` paths, imported on first use, so naming a space costs nothing
until it is used (the MobileNetV2 space pulls in more than NB201 needs). `LANDMARKS` names,
the same way, where a space's published architectures are (a `{name: text form}` dict).
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

LANDMARKS: dict[str, str] = {
    "mbv2": "wrcor_jax.spaces.mbv2.arch:LANDMARKS",
}


def _load(path: str) -> Any:
    module, _, name_in_module = path.partition(":")
    return getattr(importlib.import_module(module), name_in_module)


def landmark_texts(name: str) -> dict[str, str]:
    """The named architectures of space `name` (text forms by name); empty when it has none."""
    return dict(_load(LANDMARKS[name])) if name in LANDMARKS else {}


def space_of(text: str, excluding: str | None = None) -> str | None:
    """The first registered space (other than `excluding`) whose default build parses `text`."""
    for name in SPACES:
        if name == excluding:
            continue
        try:
            get_space(name).parse(text)
        except (ValueError, TypeError):  # ArchError is a ValueError
            continue
        return name
    return None


def get_space(name: str, **options: Any) -> Space:
    """The space registered as `name`, built with its `options` (e.g. mbv2's flops_limit)."""
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {', '.join(SPACES)}")
    cls = _load(SPACES[name])
    unknown = set(options) - set(inspect.signature(cls).parameters)
    if unknown:
        raise ValueError(f"the {name} space takes no option {', '.join(sorted(unknown))}")
    return cls(**options)


__all__ = ["LANDMARKS", "SPACES", "ArchError", "Space", "get_space", "landmark_texts", "space_of"]
