"""The README.md model card in every output directory."""

from __future__ import annotations

import pytest
import yaml

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.card import model_card
from mergekit_omp.options import recipe_yaml
from mergekit_omp.report import MatrixReport, TransplantReport


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
    assert metadata["base_model"] == []  # local directories are not hub models
    assert body.startswith("# tiny-omp\n")


def test_card_recipe_is_the_recipe_that_produced_the_model(transplanted):
    options, _, out = transplanted
    _, body = front_matter_and_body((out / "README.md").read_text())
    assert TransplantOptions.model_validate(yaml_block(body)) == options


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
    assert metadata["base_model"] == ["HuggingFaceTB/SmolLM2-135M"]
    assert "[HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)" in body
    assert "`/models/local-donor`" in body
    assert "| embed | `model.embed_tokens.weight` | 6 | 0 | 0 | 0 | 4 | 0 | 6 |" in body
    assert "> Warning: something to know" in body


def test_no_card_with_no_write_model_card(tmp_path, mixed_pair):
    from mergekit.options import MergeOptions

    base, donor = mixed_pair
    options = TransplantOptions(base_model=str(base), donor=str(donor), method="mean")
    transplant(options, tmp_path / "out", merge_options=MergeOptions(write_model_card=False))
    assert (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "README.md").exists()
