"""What is learned from a run: DataTree conversion (ArviZ 1.x layout) and sample distances.

``import diagnostics`` stays light: the DataTree functions (which import ``arviz_base`` and
``xarray``) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diagnostics.metrics import gaussian_w2, max_sliced_wasserstein, sliced_wasserstein

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.convert import load_datatree, save_datatree, to_datatree

__all__ = [
    "to_datatree",
    "save_datatree",
    "load_datatree",
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "gaussian_w2",
]

_LAZY = {
    "to_datatree": "diagnostics.convert",
    "save_datatree": "diagnostics.convert",
    "load_datatree": "diagnostics.convert",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
