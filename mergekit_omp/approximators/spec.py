"""Method specs: ``NAME`` or ``NAME:PARAM=VALUE,...``, as ``-a``, ``mergekit-omp-eval`` and
``auto``'s candidates write a method with its parameters (values read as YAML scalars)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from mergekit_omp.approximators.base import Approximator
from mergekit_omp.approximators.registry import get_approximator
from mergekit_omp.errors import TransplantError


@dataclass(frozen=True)
class MethodSpec:
    """A method as written (``label``), its approximator and its validated parameters."""

    label: str
    approximator: Approximator
    parameters: dict[str, Any] = field(default_factory=dict)


def split_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:PARAM=VALUE,...``: an installed method's name and the parameters
    as written (not yet validated)."""
    name, _, raw = spec.strip().partition(":")
    name = name.strip()
    get_approximator(name)  # an unknown name is one line naming the close and known ones
    parameters: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TransplantError(f"bad method '{spec}': expected NAME:PARAM=VALUE[,PARAM=VALUE]")
        parameters[key.strip()] = yaml.safe_load(value)
    return name, parameters


def parse_method_spec(spec: str) -> MethodSpec:
    """``omp`` or ``omp:k=32`` or ``wechsel:k=5,temperature=0.05``, parameters validated."""
    name, parameters = split_method_spec(spec)
    method = get_approximator(name)
    return MethodSpec(spec.strip(), method, method.validate_parameters(parameters))
