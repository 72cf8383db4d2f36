"""What the report's typed records share: frozen pydantic models that serialise to plain JSON.

``JsonFloat`` is a float written as ``null`` where it is not finite (a failed ``auto``
candidate's score, an unmeasured row), as the report always wrote them; ``omitted()`` is a
field left out of the JSON while it is ``None`` (a key the report has only sometimes, such as
an audit's ``salience`` or a future top-level section).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


JsonFloat = Annotated[float, PlainSerializer(_finite_or_none, when_used="json")]
"""A float, ``null`` in JSON where it is infinite or NaN."""


def _is_none(value: Any) -> bool:
    return value is None


def omitted(default: Any = None) -> Any:
    """A field whose key is left out of the JSON while its value is ``None``."""
    return Field(default=default, exclude_if=_is_none)


class Record(BaseModel):
    """A frozen record of the report; its fields are its JSON keys, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")
