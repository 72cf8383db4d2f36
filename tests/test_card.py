"""The README.md model card in every output directory."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny import load_tensors

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.card import RECIPE_FILE, model_card
from mergekit_omp.cli.recipe import main as recipe_main
from mergekit_omp.cli.transplant import main as cli_main
from mergekit_omp.recipe import recipe_yaml
from mergekit_omp.report import MatrixReport, TransplantReport


def run(command, args: list[str]) -> None:
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def front_matter_and_body(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    metadata, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(metadata), body


def yaml_block(body: str) -> dict:
    return yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])


@pytest.fixture(scope="module")
def transplanted(tmp_path_factory, mixed_pair):
    base, donor = mixed_pair
    out = tmp_path_factory.mktemp("card") / "tiny-omp"
    options = TransplantOptions(
        base_model=str(base),
        donor=str(donor),
        method="omp",
        parameters={"k": 8},
        lm_head={"method": "mean"},
        byte_match="yes",
    )
    result = transplant(options, out, progress=False)
    return options, result.report, out


def test_output_directory_has_a_card_with_hub_front_matter(transplanted):
    _, _, out = transplanted
    metadata, body = front_matter_and_body((out / "README.md").read_text())
    assert metadata["library_name"] == "transformers"
    assert {"mergekit", "mergekit-omp", "tokenizer-transplant"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local directory is not a hub model
    assert body.startswith("# tiny-omp\n")


def test_card_recipe_is_the_recipe_that_produced_the_model(transplanted):
    options, _, out = transplanted
    _, body = front_matter_and_body((out / "README.md").read_text())
    assert TransplantOptions.model_validate(yaml_block(body)) == options
    written = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert TransplantOptions.model_validate(written) == options
    assert f"mergekit-omp-yaml {RECIPE_FILE} NEW_OUT" in body


def test_rerunning_the_recipe_in_the_output_gives_the_same_weights(
    mixed_pair, tmp_path, monkeypatch
):
    base, donor = mixed_pair
    monkeypatch.chdir(base.parent)  # relative paths on the command line
    args = [base.name, donor.name, str(tmp_path / "first"), "-k", "8", "-bm", "yes"]
    args += ["-nvn", "0.01", "--random-seed", "3", "--guard", "clip", "--bos", "keep_donor"]
    run(cli_main, args)
    monkeypatch.chdir(tmp_path)  # somewhere else
    run(recipe_main, [str(tmp_path / "first" / RECIPE_FILE), str(tmp_path / "again")])
    first, again = load_tensors(tmp_path / "first"), load_tensors(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert (tmp_path / "again" / RECIPE_FILE).read_text() == (
        tmp_path / "first" / RECIPE_FILE
    ).read_text()


def test_card_escapes_what_comes_from_the_inputs():
    """Token strings in warnings and the output's name are text, never markup or links."""
    report = TransplantReport(
        base_model="/models/base",
        donor="/models/[d](javascript:alert(1))",
        options={},
        vocab_size=10,
        warnings=["worst '<script>alert(1)</script>' and '[x](javascript:alert(1))'"],
    )
    options = TransplantOptions(base_model=report.base_model, donor=report.donor)
    card = model_card(report, recipe_yaml(options), name="<img src=x onerror=alert(1)>")
    _, body = front_matter_and_body(card)
    prose = body.split("```yaml", 1)[0]
    for raw in ("<script>", "<img"):
        assert raw not in prose, raw
    assert not re.search(r"(?<!\\)\[(x|d)(?<!\\)\]", prose)  # no link text left unescaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in prose
    assert "\\[x\\](javascript:alert(1))" in prose
    assert prose.startswith("# &lt;img src=x onerror=alert(1)&gt;\n")


def test_card_lists_tokenizer_differences():
    report = TransplantReport(base_model="b", donor="d", options={}, vocab_size=10)
    options = TransplantOptions(base_model="b", donor="d")
    card = model_card(
        report, recipe_yaml(options), tokenizer_differences=["inserts BOS <s> (donor: none)"]
    )
    assert "The output tokenizer differs from the donor's:\n\n* inserts BOS &lt;s&gt;" in card


def test_card_states_the_match_statistics_of_the_report(transplanted):
    _, report, out = transplanted
    _, body = front_matter_and_body((out / "README.md").read_text())
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[3:-1]]
        for line in body.splitlines()
        if line.startswith("| embed ") or line.startswith("| lm_head ")
    }
    for matrix in report.matrices:
        counts = matrix.counts
        expected = [counts["exact"], counts["byte"], counts["special"], counts["prefix"]]
        expected += [counts["approximated"], counts["junk"], matrix.anchors]
        assert rows[matrix.matrix] == [str(n) for n in expected]
    assert counts["byte"] > 0 and counts["approximated"] > 0
    assert f"Vocabulary size: {report.vocab_size}; tied embeddings: no." in body


def test_card_names_each_method_with_its_paper(transplanted):
    _, _, out = transplanted
    body = (out / "README.md").read_text()
    assert "* embed: [Orthogonal Matching Pursuit](https://arxiv.org/abs/2506.06607) (k=8)" in body
    assert "* lm_head: Mean" in body
    assert "arXiv:2506.06607" in body


def test_hub_models_go_into_base_model_and_are_linked():
    report = TransplantReport(
        base_model="HuggingFaceTB/SmolLM2-135M",
        donor="/models/local-donor",
        options={},
        vocab_size=10,
        matrices=[
            MatrixReport(
                matrix="embed",
                tensor="model.embed_tokens.weight",
                method="omp",
                parameters={"k": 64},
                byte_match=False,
                prefix_match=False,
                counts={"exact": 6, "approximated": 4},
                anchors=6,
                rows=10,
            )
        ],
        warnings=["something to know"],
    )
    options = TransplantOptions(base_model=report.base_model, donor=report.donor)
    card = model_card(report, recipe_yaml(options), name="smol")
    metadata, body = front_matter_and_body(card)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "[HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)" in body
    assert "with the tokenizer of /models/local-donor (the tokenizer's source)" in body
    assert "| embed | `model.embed_tokens.weight` | 6 | 0 | 0 | 0 | 4 | 0 | 6 |" in body
    assert "> Warning: something to know" in body


def test_no_card_with_no_write_model_card(tmp_path, mixed_pair):
    from mergekit.options import MergeOptions

    base, donor = mixed_pair
    options = TransplantOptions(base_model=str(base), donor=str(donor), method="mean")
    transplant(options, tmp_path / "out", merge_options=MergeOptions(write_model_card=False))
    assert (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "README.md").exists()


CONTROLS = "\x1b[31mred\x07\u202eevil\u2028end\x9b"
CONTROL_CHARACTERS = set("\x1b\x07\u202e\u2028\x9b")


def test_control_characters_of_input_paths_never_reach_the_card(mixed_pair, tmp_path):
    base, donor = mixed_pair
    odd_base = tmp_path / f"base{CONTROLS}"
    odd_base.symlink_to(base)
    out = tmp_path / f"out{CONTROLS}"
    run(cli_main, [str(odd_base), str(donor), str(out), "-a", "mean", "--quiet"])
    card = (out / "README.md").read_text(encoding="utf-8")
    assert CONTROL_CHARACTERS.isdisjoint(card)
    assert "\\x1b" in card and "\\u202e" in card
    assert str(odd_base) in yaml.safe_load((out / RECIPE_FILE).read_text())["base_model"]


def test_without_controls_escapes_all_but_newline_and_tab():
    from mergekit_omp.card import without_controls

    assert without_controls("a\x1b[0mb\n\tc\u202ed") == "a\\x1b[0mb\n\tc\\u202ed"
