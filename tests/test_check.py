"""``mergekit-omp-check OUT TARGET``: whether a transplant can draft for a target model."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
from click.testing import CliRunner

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.check import check_draft
from mergekit_omp.cli.check import main as check_main


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, metaspace_tok, byte_level_tok):
    """A base whose tokenizer adds BOS, a donor whose tokenizer does not, and transplants
    with the BOS insertion of the base (match_base) and of the donor (keep_donor)."""
    root = tmp_path_factory.mktemp("check")
    base_tok = copy.deepcopy(metaspace_tok)
    base_tok.add_bos_token = True
    base = tiny.tiny_llama(base_tok, root / "base", hidden_size=16, seed=21)
    donor = tiny.tiny_llama(byte_level_tok, root / "donor", hidden_size=16, seed=22)
    outs = {}
    for bos in ("match_base", "keep_donor"):
        outs[bos] = root / bos
        options = TransplantOptions(base_model=str(base), donor=str(donor), bos=bos)
        transplant(options, outs[bos], progress=False)
    return base, donor, outs


def test_a_transplant_keeping_the_donors_tokenizer_drafts_for_the_donor(drafts, tmp_path):
    _, donor, outs = drafts
    report = tmp_path / "check.json"
    result = CliRunner().invoke(
        check_main, [str(outs["keep_donor"]), str(donor), "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "llama.cpp speculative decoding: yes" in result.output
    written = json.loads(report.read_text())
    assert written["compatible"] == {"transformers": True, "vllm": True, "llama.cpp": True}
    assert all(check["ok"] for check in written["checks"])


def test_bos_insertion_that_differs_blocks_llama_cpp_only(drafts):
    _, donor, outs = drafts
    result = check_draft(str(outs["match_base"]), str(donor))
    assert result.compatible == {"transformers": True, "vllm": True, "llama.cpp": False}
    assert result.blocked_by("llama.cpp") == ["BOS/EOS insertion"]
    insertion = next(c for c in result.checks if c.name == "BOS/EOS insertion")
    assert "draft: adds BOS" in insertion.detail and "target: no BOS" in insertion.detail


def test_a_different_vocabulary_fails_everywhere(drafts):
    base, _, outs = drafts
    result = CliRunner().invoke(check_main, [str(outs["keep_donor"]), str(base)])
    assert result.exit_code == 1
    for runtime in ("transformers assisted generation", "vLLM", "llama.cpp"):
        line = next(line for line in result.output.splitlines() if line.startswith(runtime))
        assert ": no (" in line
    assert "DIFF vocabulary size" in result.output
    assert "DIFF token ids of sample texts" in result.output


def test_an_added_token_blocks_transformers_and_vllm(drafts, tmp_path):
    """Four added tokens: vocabulary sizes differ, within llama.cpp's 128-token slack."""
    _, donor, outs = drafts
    tokenizer = tiny.byte_level_tokenizer(400)
    tokenizer.add_tokens(["<think>", "</think>", "<a>", "<b>"], special_tokens=True)
    target = tiny.tiny_llama(tokenizer, tmp_path / "chat", hidden_size=16, seed=23)
    result = check_draft(str(outs["keep_donor"]), str(target))
    assert result.compatible == {"transformers": False, "vllm": False, "llama.cpp": True}
    strings = next(c for c in result.checks if c.name == "token strings")
    assert strings.detail.startswith("4 ids differ, first id 400: none (draft) vs '<think>'")


def test_missing_model_is_one_line(tmp_path):
    result = CliRunner().invoke(check_main, [str(tmp_path / "nope"), str(tmp_path / "nope2")])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1


def test_output_tokenizer_config_has_the_donors_keys_only(drafts):
    _, donor, outs = drafts
    written = json.loads((outs["keep_donor"] / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(written)
    original = json.loads((donor / "tokenizer_config.json").read_text())
    assert written == original
