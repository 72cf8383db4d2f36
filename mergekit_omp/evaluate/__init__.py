"""Choosing a method by evidence: leave-out validation and bits per byte.

``compare_methods`` (and the ``mergekit-omp-eval`` command over it) ranks approximation
methods for one base/donor pair without running the model; ``bits_per_byte`` measures a
model on a text with its own tokenizer, so models with different vocabularies compare.
"""

from mergekit_omp.approximators.spec import MethodSpec, parse_method_spec
from mergekit_omp.evaluate.bpb import BitsPerByte, bits_per_byte, read_text
from mergekit_omp.evaluate.compare import (
    EvaluationReport,
    MethodResult,
    compare_methods,
)
from mergekit_omp.evaluate.leave_out import leave_out_tasks, mean_cosine, relative_l2
from mergekit_omp.evaluate.transplanted import InMemoryTransplant

__all__ = [
    "BitsPerByte",
    "EvaluationReport",
    "InMemoryTransplant",
    "MethodResult",
    "MethodSpec",
    "bits_per_byte",
    "compare_methods",
    "leave_out_tasks",
    "mean_cosine",
    "parse_method_spec",
    "read_text",
    "relative_l2",
]
