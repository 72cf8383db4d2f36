"""A base trained with a BOS token first must get one from the transplanted tokenizer."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
import transformers
from tiny import load_tensors

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.bos import adds_bos
from mergekit_omp.diagnostics.records import BosRecord


@pytest.fixture(scope="module")
def bos_pair(tmp_path_factory, metaspace_tok, byte_level_tok):
    """A Gemma-like base whose tokenizer adds <s>, and a SmolLM2-like donor that adds nothing."""
    root = tmp_path_factory.mktemp("bos")
    base_tok = copy.deepcopy(metaspace_tok)
    base_tok.add_bos_token = True
    assert adds_bos(base_tok) and not adds_bos(byte_level_tok)
    base = tiny.tiny_llama(base_tok, root / "base", hidden_size=16, seed=11)
    donor = tiny.tiny_llama(byte_level_tok, root / "donor", hidden_size=16, seed=12)
    return base, donor


def test_output_tokenizer_inserts_bos_with_the_base_bos_row(bos_pair, tmp_path):
    base, donor = bos_pair
    out = tmp_path / "out"
    result = transplant(
        TransplantOptions(base_model=str(base), donor=str(donor), bos="match_base"),
        out,
        progress=False,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    donor_tokenizer = transformers.AutoTokenizer.from_pretrained(donor)
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert ids[0] == donor_tokenizer.bos_token_id
    assert ids[1:] == donor_tokenizer("The quick brown fox")["input_ids"]
    base_bos = transformers.AutoTokenizer.from_pretrained(base).bos_token_id
    base_embed = load_tensors(base)["model.embed_tokens.weight"]
    new_embed = load_tensors(out)["model.embed_tokens.weight"]
    assert torch.equal(new_embed[donor_tokenizer.bos_token_id], base_embed[base_bos])
    assert result.report.diagnostics.bos == BosRecord(
        base_adds_bos=True, donor_adds_bos=False, output_adds_bos=True
    )
    assert not [w for w in result.report.warnings if "BOS" in w]


def test_keep_donor_leaves_the_tokenizer_and_warns(bos_pair, tmp_path):
    base, donor = bos_pair
    out = tmp_path / "out"
    result = transplant(
        TransplantOptions(base_model=str(base), donor=str(donor), bos="keep_donor"),
        out,
        progress=False,
    )
    assert not adds_bos(transformers.AutoTokenizer.from_pretrained(out))
    assert any("BOS" in w and "match_base" in w for w in result.report.warnings)


def test_reverse_direction_stops_inserting_bos(bos_pair, tmp_path):
    donor, base = bos_pair  # the BOS-adding tokenizer is now the donor's
    out = tmp_path / "out"
    options = TransplantOptions(base_model=str(base), donor=str(donor), bos="match_base")
    transplant(options, out, progress=False)
    assert not adds_bos(transformers.AutoTokenizer.from_pretrained(out))


def test_the_default_keeps_the_donors_tokenizer(bos_pair, tmp_path):
    """A draft beside the donor's own models is a main use, and llama.cpp refuses a draft
    whose BOS insertion differs from its target's: by default the output tokenizer is the
    donor's, and the warning gives the flag for the other choice."""
    base, donor = bos_pair
    out = tmp_path / "out"
    result = transplant(
        TransplantOptions(base_model=str(base), donor=str(donor)), out, progress=False
    )
    assert not adds_bos(transformers.AutoTokenizer.from_pretrained(out))
    assert result.report.diagnostics.bos.output_adds_bos is False
    assert any("--bos match_base inserts it" in w for w in result.report.warnings)
