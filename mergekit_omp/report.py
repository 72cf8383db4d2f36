"""Report stage: what a transplant matched, approximated and how long each stage took."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mergekit_omp.diagnostics.summary import summary_lines


class MatrixReport(BaseModel):
    matrix: str
    tensor: str
    method: str
    parameters: dict[str, Any]
    byte_match: bool
    prefix_match: bool
    counts: dict[str, int]
    anchors: int
    rows: int
    choice: dict[str, Any] | None = None
    """``-a auto``: the candidates, their validation scores and the one chosen."""


class TransplantReport(BaseModel):
    base_model: str
    donor: str
    options: dict[str, Any]
    vocab_size: int = 0
    tied_embeddings: bool = False
    matrices: list[MatrixReport] = Field(default_factory=list)
    seconds: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    diagnostics: dict[str, Any] = Field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(
                self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3
            )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    def summary(self) -> str:
        lines = [f"Transplanted {self.donor} tokenizer into {self.base_model}"]
        for m in self.matrices:
            counts = ", ".join(f"{k} {v}" for k, v in m.counts.items() if v)
            lines.append(f"  {m.matrix} ({m.tensor}): {counts}; {m.anchors} anchors; {m.method}")
            if m.choice:
                lines.append(
                    f"    auto chose {m.choice['chosen']} by {m.choice['validation']}: "
                    + ", ".join(f"{c} {s:.4f}" for c, s in m.choice["scores"].items())
                )
        lines.append(f"  vocabulary size {self.vocab_size}; tied: {self.tied_embeddings}")
        lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        lines.extend(summary_lines(self.diagnostics))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)
