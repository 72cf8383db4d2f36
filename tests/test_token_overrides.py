"""Recipes name rows for donor tokens with mergekit's ``tokens:`` syntax; a merge config that
is really a transplant is refused in one line."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny import load_tensors

from mergekit_omp.cli.merge import main as merge_main
from mergekit_omp.cli.recipe import main as recipe_main

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def recipe(tmp_path, mixed_pair, tokens) -> str:
    base, donor = mixed_pair
    path = tmp_path / "recipe.yml"
    data = {"base_model": str(base), "donor": str(donor), "method": "mean", "tokens": tokens}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_a_donor_token_takes_the_named_base_tokens_row(tmp_path, mixed_pair):
    base, donor = mixed_pair
    from transformers import AutoTokenizer

    donor_vocab = AutoTokenizer.from_pretrained(donor).get_vocab()
    base_vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    tokens = {
        "<|endoftext|>": {"source": {"kind": "model_token", "model": str(base), "token": "<s>"}},
        "cab": {"source": {"kind": "model_token", "model": str(base), "token_id": 425}},
        "é": {"source": str(base)},  # the base's token of the same string
    }
    result = run(recipe_main, recipe(tmp_path, mixed_pair, tokens), tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours, theirs = load_tensors(tmp_path / "out"), load_tensors(base)
    expected = {"<|endoftext|>": base_vocab["<s>"], "cab": 425, "é": base_vocab["é"]}
    for token, base_id in expected.items():
        for name in (EMBED, LM_HEAD):
            assert torch.equal(ours[name][donor_vocab[token]], theirs[name][base_id]), token
    written = yaml.safe_load((tmp_path / "out" / "mergekit_omp_recipe.yml").read_text())
    assert written["tokens"]["cab"]["source"]["token_id"] == 425


@pytest.mark.parametrize(
    "tokens,message",
    [
        ({"nope": {"source": "BASE"}}, "tokens: 'nope' is not a token of the donor"),
        (
            {"cab": {"source": {"kind": "model_token", "model": "BASE", "token": "zz"}}},
            "tokens.cab.source: 'zz' is not a token with a row in the base",
        ),
        ({"cab": {"source": "DONOR"}}, "is the donor; a transplant takes rows from the base"),
        ({"cab": {"source": {"kind": "zero"}}}, "cab: a transplant gives a donor token"),
    ],
    ids=["unknown-donor-token", "unknown-base-token", "donor-as-source", "zero"],
)
def test_bad_overrides_are_one_line(tmp_path, mixed_pair, tokens, message):
    base, donor = mixed_pair
    text = yaml.safe_dump(tokens).replace("BASE", str(base)).replace("DONOR", str(donor))
    path = recipe(tmp_path, mixed_pair, yaml.safe_load(text))
    result = run(recipe_main, path, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_passthrough_with_a_donor_tokenizer_is_refused_in_one_line(tmp_path, mixed_pair):
    base, donor = mixed_pair
    config = {
        "merge_method": "passthrough",
        "models": [{"model": str(base)}],
        "tokenizer": {"source": str(donor)},
        "omp": {"missing_tokens": "omp"},
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    result = run(merge_main, path, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert f"run `mergekit-omp {base} {donor} OUT`" in lines[0]
    assert not (tmp_path / "out").exists()


def test_merge_writes_its_report(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from make_tiny_pair import make_tiny_models

    make_tiny_models(tmp_path / "tiny")
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-merge.yml"
    shutil.copy(example, tmp_path)
    report = tmp_path / "merge.json"
    result = run(merge_main, tmp_path / "tiny-merge.yml", tmp_path / "out", "--report", report)
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    assert written["omp_rows"] and all(fill["tokens"] > 0 for fill in written["omp_rows"])
