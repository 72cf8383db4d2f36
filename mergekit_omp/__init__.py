"""mergekit-omp: training-free tokenizer transplantation via Orthogonal Matching Pursuit."""

from mergekit_omp.errors import TransplantError
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
