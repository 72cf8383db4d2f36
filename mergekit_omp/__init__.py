"""mergekit-omp: training-free tokenizer transplantation via Orthogonal Matching Pursuit."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from mergekit_omp.errors import TransplantError

if TYPE_CHECKING:
    from mergekit_omp.options import MatchScope, MatrixOverride, TransplantOptions
    from mergekit_omp.transplant import TransplantResult, transplant

__all__ = [
    "MatchScope",
    "MatrixOverride",
    "TransplantError",
    "TransplantOptions",
    "TransplantResult",
    "transplant",
]
__version__ = "0.1.0"

# Imported on first use: the console scripts import this package before torch, transformers
# and mergekit, and handle Ctrl-C during those imports (cli.process.one_shot_entry_point).
_LAZY = {
    "MatchScope": "mergekit_omp.options",
    "MatrixOverride": "mergekit_omp.options",
    "TransplantOptions": "mergekit_omp.options",
    "TransplantResult": "mergekit_omp.transplant",
    "transplant": "mergekit_omp.transplant",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergekit_omp' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule mergekit_omp.transplant binds the name `transplant` here;
        # the package's `transplant` stays the function, as an eager import would leave it.
        if name == "transplant" and isinstance(value, types.ModuleType):
            value = value.transplant
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
