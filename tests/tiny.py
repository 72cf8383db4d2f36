"""The tiny tokenizer and model builders of ``examples/tiny_models.py``, for the tests.

They live with the examples so that the examples run without the test suite.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from tiny_models import (  # noqa: E402
    BYTE_LEVEL_SPECIALS,
    CORPUS,
    METASPACE_SPECIALS,
    byte_level_tokenizer,
    corpus,
    metaspace_tokenizer,
    save,
    tiny_llama,
    tiny_llama_model,
)

__all__ = [
    "BYTE_LEVEL_SPECIALS",
    "CORPUS",
    "METASPACE_SPECIALS",
    "byte_level_tokenizer",
    "corpus",
    "metaspace_tokenizer",
    "save",
    "tiny_llama",
    "tiny_llama_model",
]
