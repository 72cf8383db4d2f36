"""Find approximators through the ``mergekit_omp.approximators`` entry-point group."""

from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from mergekit_omp.approximators.base import Approximator
from mergekit_omp.errors import TransplantError

ENTRY_POINT_GROUP = "mergekit_omp.approximators"
LOG = logging.getLogger(__name__)


def _builtins_first(entry_point: EntryPoint) -> tuple[bool, str, str]:
    """Built-ins first (a plugin cannot take their names), then by name."""
    return (not entry_point.value.startswith("mergekit_omp."), entry_point.name, entry_point.value)


@lru_cache(maxsize=1)
def _registry() -> dict[str, Approximator]:
    registry: dict[str, Approximator] = {}
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=_builtins_first):
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
            register(registry, name, loaded, entry_point.value)
    return registry


def register(
    registry: dict[str, Approximator], name: str, method: Approximator, source: str
) -> None:
    """Add ``method`` under ``name``; a name claimed by another method keeps its first
    claimant (built-ins, then entry points in name order) and the clash is logged as a
    warning naming both: one broken plugin must not break the tool."""
    claimant = registry.get(name)
    if claimant is None:
        registry[name] = method
    elif claimant is not method:
        LOG.warning(
            "Approximator name '%s' is claimed twice: kept %s (%s), ignored %s (%s)",
            name,
            claimant.name,
            claimant.function.__module__,
            method.name,
            source,
        )


def approximator_names() -> list[str]:
    return sorted(_registry())


def get_approximator(name: str) -> Approximator:
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        known = ", ".join(sorted(registry)) or "none installed"
        raise TransplantError(f"unknown approximation method '{name}' ({hint}known: {known})")
    return registry[name]
