"""mergekit-omp-eval: leave-out validation, bits per byte, the ranked table and its JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import tiny
import torch
import torch.nn.functional as F
import transformers
from click.testing import CliRunner
from mergekit.options import MergeOptions

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.approximators import get_approximator
from mergekit_omp.cli.evaluate import main
from mergekit_omp.errors import TransplantError
from mergekit_omp.evaluate import bits_per_byte, compare_methods, parse_method_spec
from mergekit_omp.evaluate.leave_out import holdout_size, leave_out_tasks, score_method
from mergekit_omp.load import load_pair
from mergekit_omp.vocabulary import vocabulary_of

TEXT = "".join(tiny.CORPUS)


def linear_pair(root: Path, donor_tok, base_tok, donor_dim=12, base_dim=20, tied=False):
    """A pair with base row = donor row @ A for every token both have (LM head: 2x that)."""
    generator = torch.Generator().manual_seed(0)
    donor_embed = torch.randn(len(donor_tok), donor_dim, generator=generator)
    mapping = torch.randn(donor_dim, base_dim, generator=generator) / donor_dim**0.5
    donor_id_of = {form: i for i, form in vocabulary_of(donor_tok).forms.items()}
    base_embed = torch.randn(len(base_tok), base_dim, generator=generator)
    for base_id, form in vocabulary_of(base_tok).forms.items():
        if form in donor_id_of:
            base_embed[base_id] = donor_embed[donor_id_of[form]] @ mapping
    base = tiny.tiny_llama(
        base_tok,
        root / "base",
        hidden_size=base_dim,
        tied=tied,
        embed=base_embed,
        lm_head=base_embed * 2,
    )
    donor = tiny.tiny_llama(
        donor_tok,
        root / "donor",
        hidden_size=donor_dim,
        embed=donor_embed,
        lm_head=donor_embed * 2,
    )
    return base, donor


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """An untied sentencepiece-style base that is a linear map of a byte-level donor."""
    root = tmp_path_factory.mktemp("linear")
    return linear_pair(root, tiny.byte_level_tokenizer(400), tiny.metaspace_tokenizer(300))


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tied byte-level base and a byte-level donor with a larger vocabulary."""
    root = tmp_path_factory.mktemp("tied")
    return linear_pair(
        root, tiny.byte_level_tokenizer(400), tiny.byte_level_tokenizer(300), tied=True
    )


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def specs(*names: str):
    return [parse_method_spec(name) for name in names]


def figures(report) -> dict:
    """Every figure of a report except timings."""
    data = report.model_dump(mode="json")
    for method in data["methods"]:
        method.pop("seconds")
        method.pop("transplant_seconds")
        for score in method["leave_out"].values():
            score.pop("seconds")
    return data


# ---------------------------------------------------------------- leave-out


def test_holdout_size():
    assert holdout_size(100, None) == 5  # 5%
    assert holdout_size(100_000, None) == 1000  # capped at 1,000
    assert holdout_size(101, None) == 6  # rounded up
    assert holdout_size(100, 0.2) == 20
    assert holdout_size(100, 30) == 30
    assert holdout_size(3, 10) == 2  # one anchor is always kept
    with pytest.raises(TransplantError, match="at most 2"):
        holdout_size(3, 10, exact=True)
    with pytest.raises(TransplantError, match="fraction"):
        holdout_size(100, 1.5)
    with pytest.raises(TransplantError, match="at least 2"):
        holdout_size(1, None)


def test_ranking_on_a_space_with_a_known_answer(pair):
    """base = donor @ A: OMP's coefficients carry over exactly; zero scores 0 and 1."""
    base, donor = pair
    report = compare_methods(
        str(base), str(donor), specs("zero", "mean", "omp"), holdout=0.2, progress=False
    )
    assert [m.label for m in report.methods][0] == "omp"
    by_label = {m.label: m for m in report.methods}
    assert set(by_label["omp"].leave_out) == {"embed", "lm_head"}
    for matrix in ("embed", "lm_head"):
        omp = by_label["omp"].leave_out[matrix]
        assert omp.mean_cosine > 0.99999
        assert omp.relative_l2 < 1e-3
        assert by_label["zero"].leave_out[matrix].mean_cosine == 0.0
        assert by_label["zero"].leave_out[matrix].relative_l2 == pytest.approx(1.0, abs=1e-12)
        assert by_label["mean"].leave_out[matrix].mean_cosine < 0.5
    total = report.anchors["embed"] + report.held_out["embed"]
    assert report.held_out == {"embed": math.ceil(0.2 * total), "lm_head": math.ceil(0.2 * total)}
    assert [m.rank for m in report.methods] == [1, 2, 3]


def test_too_few_anchors_for_omp_is_reported_not_fatal(pair):
    base, donor = pair
    report = compare_methods(str(base), str(donor), specs("mean", "omp:k=100000"), progress=False)
    failed = {m.label: m for m in report.methods}["omp:k=100000"]
    assert "larger than the number of shared anchor tokens" in failed.error
    assert report.methods[-1] is failed


def test_same_seed_same_figures_and_another_seed_other_figures(pair):
    base, donor = pair
    methods = specs("wechsel", "focus", "clp:k=5", "fvt")
    first = compare_methods(str(base), str(donor), methods, seed=3, progress=False)
    again = compare_methods(str(base), str(donor), methods, seed=3, progress=False)
    other = compare_methods(str(base), str(donor), methods, seed=4, progress=False)
    assert figures(first) == figures(again)
    assert figures(first)["methods"] != figures(other)["methods"]


def test_held_out_tokens_are_hidden_from_every_method(pair):
    base_path, donor_path = pair
    base, donor = load_pair(str(base_path), str(donor_path), MergeOptions())
    (embed, _) = leave_out_tasks(base, donor, holdout=0.2, seed=0)
    problem = embed.problem
    held_base_ids = set(range(base.embed.shape[0])) - set(problem.base_vocab.forms)
    assert len(held_base_ids) == embed.held_out
    assert not held_base_ids & set(problem.base_anchor_ids)
    kept = sorted(set(range(base.embed.shape[0])) - held_base_ids)
    assert torch.allclose(problem.base_matrix.mean(dim=0), base.embed[kept].mean(dim=0), atol=1e-6)


def test_fvt_cannot_split_a_held_out_token_into_itself(pair):
    base_path, donor_path = pair
    base, donor = load_pair(str(base_path), str(donor_path), MergeOptions())
    (embed, _) = leave_out_tasks(base, donor, holdout=0.2, seed=0)
    fvt = get_approximator("fvt")
    hidden = score_method(embed, fvt, {"subword_method": "mean"})
    leaky_problem = dataclasses.replace(
        embed.problem, base_vocab=base.vocabulary, base_matrix=base.embed.float()
    )
    leaky = score_method(dataclasses.replace(embed, problem=leaky_problem), fvt, {})
    assert leaky.mean_cosine == pytest.approx(1.0)  # what hiding prevents
    assert hidden.mean_cosine < 0.5


# ---------------------------------------------------------------- bits per byte


def test_bits_per_byte_is_the_summed_nll_in_bits_per_utf8_byte(pair):
    base, _ = pair
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    text = TEXT[:200]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 100
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    result = bits_per_byte(model, tokenizer, text, bos="none")
    assert result.bpb == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert result.scored_tokens == len(ids) - 1
    with_bos = bits_per_byte(model, tokenizer, text, bos="<s>", window=10)
    assert with_bos.scored_tokens == len(ids)
    assert with_bos.bos_id == tokenizer.convert_tokens_to_ids("<s>")
    assert bits_per_byte(model, tokenizer, text, window=10_000).window == 127  # context - 1
    # The BOS row fed as an embedding scores exactly like the BOS token; another row does not.
    bos = tokenizer.convert_tokens_to_ids("<s>")
    row = model.get_input_embeddings().weight[bos : bos + 1].detach()
    as_row = bits_per_byte(model, tokenizer, text, window=10, bos_embedding=row)
    assert as_row.bpb == pytest.approx(with_bos.bpb, rel=1e-5)
    assert as_row.scored_tokens == len(ids) and as_row.bos_id is None
    other = bits_per_byte(model, tokenizer, text, window=10, bos_embedding=row + 1)
    assert other.bpb != pytest.approx(with_bos.bpb, rel=1e-3)


@pytest.mark.parametrize("which", ["pair", "tied_pair"])
def test_in_memory_transplant_scores_as_the_written_model(request, which, text_file, tmp_path):
    base, donor = request.getfixturevalue(which)
    report = compare_methods(
        str(base),
        str(donor),
        specs("wechsel"),
        text_path=str(text_file),
        max_bytes=300,
        progress=False,
    )
    (wechsel,) = report.methods
    out = tmp_path / "out"
    transplant(
        TransplantOptions(base_model=str(base), donor=str(donor), method="wechsel"),
        out,
        progress=False,
    )
    written = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    expected = bits_per_byte(written, tokenizer, TEXT.encode()[:300].decode(errors="ignore"))
    assert wechsel.bpb.bpb == pytest.approx(expected.bpb, rel=1e-5)
    assert wechsel.bpb.tokens == expected.tokens
    assert report.base_bpb.bytes == 300
    assert report.base_bpb.tokens != wechsel.bpb.tokens  # each model with its own tokenizer


# ---------------------------------------------------------------- the command


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, fragment: str, status: int = 1) -> None:
    assert result.exit_code == status
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]


def test_command_prints_a_ranked_table_and_writes_every_figure(pair, text_file, tmp_path):
    base, donor = pair
    json_path = tmp_path / "eval.json"
    result = invoke(
        base,
        donor,
        "-a",
        "zero",
        "-a",
        "omp:k=12",
        "-a",
        "mean",
        "--holdout",
        "10%",
        "--text",
        text_file,
        "--max-bytes",
        "400",
        "--json",
        json_path,
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ranked by bits per byte" in lines[0]
    assert lines[1].split()[:4] == ["#", "method", "embed", "cos"]
    assert "lm_head relL2" in lines[1] and "seconds" in lines[1] and "bpb" in lines[1]
    assert [line.split()[1] for line in lines[2:5]] == [
        m["label"] for m in json.loads(json_path.read_text())["methods"]
    ]
    assert "(base model)" in lines[5]
    data = json.loads(json_path.read_text())
    assert data["held_out"]["embed"] == math.ceil(
        0.1 * (data["anchors"]["embed"] + data["held_out"]["embed"])
    )
    assert data["base_bpb"]["bytes"] == 400
    for method in data["methods"]:
        assert method["bpb"]["bpb"] > 0
        assert set(method["leave_out"]) == {"embed", "lm_head"}
        assert {"mean_cosine", "relative_l2", "seconds"} <= set(method["leave_out"]["embed"])
    assert [m["rank"] for m in data["methods"]] == [1, 2, 3]
    bpbs = [m["bpb"]["bpb"] for m in data["methods"]]
    assert bpbs == sorted(bpbs)


def test_command_without_text_ranks_by_leave_out_cosine(pair):
    base, donor = pair
    result = invoke(base, donor, "-a", "zero", "-a", "omp", "--quiet", "--random-seed", "1")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ranked by leave-out mean cosine" in lines[0] and "(seed 1)" in lines[0]
    assert lines[2].split()[:2] == ["1", "omp"]
    assert lines[3].split()[:4] == ["2", "zero", "0.0000", "1.0000"]


@pytest.mark.parametrize(
    "args,fragment,status",
    [
        (["-a", "nope"], "unknown approximation method 'nope'", 1),
        # a parameter value the method refuses: a usage error (#28 item 7)
        (["-a", "omp:k=many"], "bad parameters for method 'omp'", 2),
        (["-a", "omp:k"], "expected NAME:PARAM=VALUE", 1),
        (["--holdout", "lots"], "--holdout", 1),
        (["--text", "/nonexistent/text.txt"], "cannot read text file", 1),
    ],
)
def test_bad_input_gives_one_line(pair, args, fragment, status):
    base, donor = pair
    assert_one_line_error(invoke(base, donor, *args, "--quiet"), fragment, status)


def test_missing_model_gives_one_line(pair, tmp_path):
    _, donor = pair
    assert_one_line_error(invoke(tmp_path / "missing", donor, "--quiet"), "does not exist")
