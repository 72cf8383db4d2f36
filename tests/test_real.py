"""Tests on the real pair: Gemma-3-270M given SmolLM2-135M's tokenizer (issue 7).

Marked ``real``: skipped unless pytest runs with ``--real``. They need the assets of
``examples/real/prepare.py`` (``~/.cache/mergekit-omp/real`` or ``$MERGEKIT_OMP_CACHE``):

    python -m pytest --real -m real tests/test_real.py

The omp transplant is built once per session (a few minutes on 2 cores); set
``MERGEKIT_OMP_REAL_OUTPUT`` to an existing output of
``mergekit-omp GEMMA SMOLLM OUT -a omp -k 64`` (e.g. the one ``benchmarks/real_pair.py``
writes) to reuse it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit_omp.match import MatchKind, MatchPolicy, VocabularyMatch, match_vocabularies
from mergekit_omp.vocabulary import Vocabulary, vocabulary_of

pytestmark = pytest.mark.real

CACHE = Path(os.environ.get("MERGEKIT_OMP_CACHE", "~/.cache/mergekit-omp/real")).expanduser()
GEMMA, SMOLLM = CACHE / "gemma-3-270m", CACHE / "smollm2-135m"
EMBED = "model.embed_tokens.weight"
SMOLLM_NEWLINE = 198  # "Ċ", the byte-level newline
GEMMA_NEWLINE = 107  # "\n", an added (not special) token in Gemma's tokenizer
GEMMA_BOS, GEMMA_EOS = 2, 1
SMOLLM_IM_START, SMOLLM_IM_END = 1, 2


@pytest.fixture(scope="module")
def assets() -> None:
    for path in (GEMMA / "config.json", SMOLLM / "config.json"):
        if not path.exists():
            pytest.skip(f"real assets missing ({path}): run examples/real/prepare.py")


@pytest.fixture(scope="module")
def vocabularies(assets) -> tuple[Vocabulary, Vocabulary]:
    from transformers import AutoTokenizer

    gemma = vocabulary_of(AutoTokenizer.from_pretrained(GEMMA))
    smollm = vocabulary_of(AutoTokenizer.from_pretrained(SMOLLM))
    return gemma, smollm


def match_smollm_onto_gemma(vocabularies, byte_match: bool) -> VocabularyMatch:
    gemma, smollm = vocabularies
    policy = MatchPolicy(byte_match=byte_match)
    return match_vocabularies(smollm, gemma, policy, smollm.max_id + 1, gemma.max_id + 1)


@pytest.fixture(scope="module")
def omp_output(assets, tmp_path_factory) -> Path:
    given = os.environ.get("MERGEKIT_OMP_REAL_OUTPUT")
    if given:
        return Path(given)
    from mergekit_omp.options import TransplantOptions
    from mergekit_omp.transplant import transplant

    out = tmp_path_factory.mktemp("real") / "gemma-smollm-omp"
    options = TransplantOptions(
        base_model=str(GEMMA),
        donor=str(SMOLLM),
        method="omp",
        parameters={"k": 64},
        bos="match_base",
    )
    transplant(options, out, progress=False)
    return out


def embedding(model_dir: Path) -> torch.Tensor:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as tensors:
        return tensors.get_tensor(EMBED)


def test_match_counts(vocabularies):
    counts = match_smollm_onto_gemma(vocabularies, byte_match=False).counts()
    # 46,009 plain tokens and 9 newline/tab runs Gemma holds as added, non-special tokens.
    assert counts["exact"] == 46018
    assert counts["special"] == 3
    assert counts["approximated"] == 3131
    assert counts["exact"] + counts["special"] + counts["approximated"] == 49152


@pytest.mark.parametrize("byte_match", [False, True])
def test_anchors_stand_for_the_same_bytes(vocabularies, byte_match):
    gemma, smollm = vocabularies
    match = match_smollm_onto_gemma(vocabularies, byte_match)
    anchors = [(d, b) for d, (b, kind) in match.matched.items() if kind != MatchKind.SPECIAL]
    assert len(anchors) >= 46018
    assert all(smollm.forms[d].data == gemma.forms[b].data for d, b in anchors)
    # The exact match wins over Gemma's byte-fallback <0x0A> with or without byte matching.
    assert match.matched[SMOLLM_NEWLINE] == (GEMMA_NEWLINE, MatchKind.EXACT)


def test_newline_matches_gemma_newline(vocabularies):
    match = match_smollm_onto_gemma(vocabularies, byte_match=False)
    assert match.matched.get(SMOLLM_NEWLINE) == (GEMMA_NEWLINE, MatchKind.EXACT)


def test_donor_eos_gets_base_eos(vocabularies):
    match = match_smollm_onto_gemma(vocabularies, byte_match=False)
    assert match.matched[SMOLLM_IM_END] == (GEMMA_EOS, MatchKind.SPECIAL)


def test_output_tokenizer_adds_bos_with_gemma_bos_row(omp_output):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(omp_output)
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == SMOLLM_IM_START
    assert ids[1:] == tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    rows, base_rows = embedding(omp_output), embedding(GEMMA)
    assert rows.shape == (49152, 640)
    assert torch.equal(rows[SMOLLM_IM_START], base_rows[GEMMA_BOS])


def test_exact_matches_copy_base_rows(omp_output, vocabularies):
    match = match_smollm_onto_gemma(vocabularies, byte_match=False)
    donor_ids, base_ids = match.anchors()
    rows, base_rows = embedding(omp_output), embedding(GEMMA)
    assert torch.equal(rows[donor_ids], base_rows[base_ids])
    new = rows[match.new_tokens]
    assert torch.isfinite(new).all() and (new.norm(dim=1) > 0).all()


def test_greedy_continuation(omp_output):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(omp_output)
    model = AutoModelForCausalLM.from_pretrained(omp_output, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_ids = out[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    # 'Paris', or at least not degenerate: English words, not one token repeated.
    # (The base Gemma continues with " the capital of the country of France. It is the largest".)
    words = re.findall(r"[A-Za-z]+", text)
    if "Paris" in text:
        return
    assert len(set(new_ids.tolist())) >= 4, text
    assert len(set(words)) >= 3 and all(len(w) < 20 for w in words), text
