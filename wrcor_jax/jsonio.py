"""JSON that strict parsers accept, written so that a crash never leaves half a file.

Python's `json` writes a NaN statistic (an undefined correlation, a bootstrap over a constant
sample) as a bare `NaN`, which `jq`, browsers and most other languages refuse. Here every
non-finite float becomes `null`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of `value` (non-finite floats as null)."""
    return json.dumps(finite_or_null(value), indent=indent, allow_nan=False)


def write_json(path: str | Path, value: Any, indent: int = 1) -> None:
    """Write `value` to `path` through a temporary file, so readers see the old or the new."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(value, indent) + "\n")
    tmp.replace(path)
