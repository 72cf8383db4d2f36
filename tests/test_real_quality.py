"""Real pair, Gemma-3-270M given SmolLM2's tokenizer: the hybrid's bits per byte beat OMP's
(k = 64) and FVT's on Python source, and the default (``auto``) chooses the hybrid by running
the model (issue 13; docs/results.md has the full tables).

Marked ``real``: skipped unless pytest runs with ``--real`` and the assets of
``examples/real/prepare.py`` are there. About a minute on 2 cores.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from mergekit_omp.select.auto import TEXT_VALIDATION

pytestmark = pytest.mark.real

CACHE = Path(os.environ.get("MERGEKIT_OMP_CACHE", "~/.cache/mergekit-omp/real")).expanduser()
GEMMA, SMOLLM = CACHE / "gemma-3-270m", CACHE / "smollm2-135m"


@pytest.fixture(scope="module")
def scored() -> dict[str, float]:
    """bpb of several methods' transplants on 8 KB of ``graphlib.py`` (not a design text)."""
    for path in (GEMMA / "config.json", SMOLLM / "config.json"):
        if not path.exists():
            pytest.skip(f"real assets missing ({path}): run examples/real/prepare.py")
    from mergekit.options import MergeOptions

    from mergekit_omp import TransplantOptions
    from mergekit_omp.evaluate.bpb import bits_per_byte
    from mergekit_omp.evaluate.compare import transplanted_matrices
    from mergekit_omp.evaluate.transplanted import InMemoryTransplant
    from mergekit_omp.load import load_pair

    text = (Path(sysconfig.get_paths()["stdlib"]) / "graphlib.py").read_text()[:8000]
    base, donor = load_pair(str(GEMMA), str(SMOLLM), MergeOptions())
    in_memory = InMemoryTransplant(base)
    scores: dict[str, Any] = {}
    for method in ("omp", "fvt", "hybrid", None):
        # The model on its own, BOS inserted as Gemma was trained (as benchmarks/quality.py).
        options = TransplantOptions(base_model=str(GEMMA), donor=str(SMOLLM), bos="match_base")
        if method is not None:
            options = options.model_copy(update={"method": method})
        plan, matrices = transplanted_matrices(options, base, donor)
        model = in_memory.apply(matrices)
        scores[method or "default"] = bits_per_byte(model, plan.tokenizer, text).bpb
        if method is None:
            scores["choice"] = matrices["embed"].approximation.choice
    return scores


def test_hybrid_beats_omp_and_fvt_on_code(scored):
    assert scored["hybrid"] < scored["fvt"] < scored["omp"]
    assert scored["omp"] - scored["hybrid"] > 0.05


def test_the_default_chooses_the_hybrid_by_bits_per_byte_on_the_validation_text(scored):
    choice = scored["choice"]
    assert choice.chosen == "hybrid"
    assert choice.validation == TEXT_VALIDATION
    assert choice.scores["hybrid"] == min(choice.scores.values())
    assert scored["default"] == scored["hybrid"]
