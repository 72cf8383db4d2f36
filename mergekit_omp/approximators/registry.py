"""Find approximators through the ``mergekit_omp.approximators`` entry-point group."""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points

from mergekit_omp.approximators.base import Approximator
from mergekit_omp.errors import TransplantError

ENTRY_POINT_GROUP = "mergekit_omp.approximators"
LOG = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _registry() -> dict[str, Approximator]:
    registry: dict[str, Approximator] = {}
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            loaded = entry_point.load()
        except Exception as exc:  # a broken plugin must not break the tool
            LOG.warning("Skipping approximator plugin %s: %s", entry_point.value, exc)
            continue
        if not isinstance(loaded, Approximator):
            LOG.warning(
                "Skipping %s: not made with @approximator (got %s)",
                entry_point.value,
                type(loaded).__name__,
            )
            continue
        for name in (entry_point.name, *loaded.aliases):
            registry.setdefault(name, loaded)
    return registry


def refresh_registry() -> None:
    """Forget discovered plugins (after installing one into the running interpreter)."""
    _registry.cache_clear()


def approximator_names() -> list[str]:
    return sorted(_registry())


def get_approximator(name: str) -> Approximator:
    registry = _registry()
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none installed"
        raise TransplantError(f"unknown approximation method '{name}' (known: {known})")
    return registry[name]
