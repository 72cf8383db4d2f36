"""Where a model named in a recipe or a merge configuration lives."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_omp.load import HUB_ID_RE


def resolve_model_path(path: str, base_dir: Path) -> str:
    """Where a model named in a recipe or config lives.

    A relative path is looked up beside the file first, then in the current directory; one
    found in neither that looks like ``owner/name`` (and does not start with ``.``) is a hub
    model id.
    """
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    beside = base_dir / expanded
    if beside.exists():
        return str(beside)
    if os.path.exists(expanded):
        return expanded
    if HUB_ID_RE.match(path) and not path.startswith("."):
        return path
    return str(beside)
