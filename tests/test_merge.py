"""mergekit-omp-merge: mergekit's run_merge with OMP rows for the tokens a model lacks.

The pair is built so the right answer is known: every token string s has a row E[s]; model
A's rows are E[s] and model B's are E[s] @ W for an invertible W. With k = hidden size, OMP
rebuilds any row from the shared tokens exactly, so B's row of a token only A has is
E[s] @ W, and A's row of a token only B has is E[s]: the merged matrix is then exactly what
it would be had both models known every token. mergekit's own rule copies the other model's
raw row instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mergekit.plan
import pytest
import tiny
import torch
import transformers
import yaml
from click.testing import CliRunner
from mergekit.options import MergeOptions
from mergekit.tokenizer import PermutedVocabulary
from safetensors.torch import load_file

from mergekit_omp.approximators import parse_method_spec
from mergekit_omp.approximators.base import ApproximationProblem
from mergekit_omp.approximators.fvt import fvt
from mergekit_omp.cli import merge as merge_cli
from mergekit_omp.cli.merge import summary
from mergekit_omp.errors import TransplantError
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.merge import OmpMergeSettings, parse_merge_config, run_omp_merge
from mergekit_omp.merge.omp_vocabulary_task import omp_rows
from mergekit_omp.options import TransplantOptions
from mergekit_omp.select.auto import CANDIDATES, LEAVE_OUT_VALIDATION, TEXT_VALIDATION
from mergekit_omp.transplant import transplant
from mergekit_omp.vocabulary import vocabulary_of

HIDDEN = 16
WEIGHT_A, WEIGHT_B = 0.3, 0.7


class Pair:
    def __init__(self, root: Path):
        corpus = tiny.CORPUS
        self.tok_a = tiny.byte_level_tokenizer(330, texts=corpus[:6] * 20)
        self.tok_b = tiny.byte_level_tokenizer(330, texts=corpus[3:] * 20)
        generator = torch.Generator().manual_seed(0)
        strings = sorted(set(self.tok_a.get_vocab()) | set(self.tok_b.get_vocab()))
        self.rows = {s: torch.randn(HIDDEN, generator=generator) for s in strings}
        q, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=generator))
        self.mapping = q @ torch.diag(torch.linspace(0.5, 2.0, HIDDEN))
        embed_a = self.matrix(self.tok_a)
        embed_b = self.matrix(self.tok_b) @ self.mapping
        self.a = tiny.tiny_llama(
            self.tok_a, root / "a", hidden_size=HIDDEN, embed=embed_a, lm_head=2 * embed_a
        )
        self.b = tiny.tiny_llama(
            self.tok_b, root / "b", hidden_size=HIDDEN, embed=embed_b, lm_head=2 * embed_b
        )
        self.only_a = sorted(set(self.tok_a.get_vocab()) - set(self.tok_b.get_vocab()))
        self.only_b = sorted(set(self.tok_b.get_vocab()) - set(self.tok_a.get_vocab()))

    def matrix(self, tokenizer) -> torch.Tensor:
        by_id = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        return torch.stack([self.rows[s] for s, _ in by_id])

    def config(self, **extra) -> dict:
        return {
            "merge_method": "linear",
            "base_model": str(self.a),
            "models": [
                {"model": str(self.a), "parameters": {"weight": WEIGHT_A}},
                {"model": str(self.b), "parameters": {"weight": WEIGHT_B}},
            ],
            "dtype": "float32",
            "tokenizer": {"source": "union"},
            **extra,
        }


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    return Pair(tmp_path_factory.mktemp("merge-pair"))


def merge(config: dict, out: Path, **options):
    parsed = parse_merge_config(yaml.safe_dump(config), "merge.yml", out.parent)
    return run_omp_merge(parsed, out, MergeOptions(quiet=True, **options))


def merged_rows(out: Path) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    tensors = {}
    for shard in out.glob("*.safetensors"):
        tensors.update(load_file(shard))
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    return vocab, tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]


def expected_if_both_knew(pair: Pair, strings: list[str]) -> torch.Tensor:
    e = torch.stack([pair.rows[s] for s in strings])
    return WEIGHT_A * e + WEIGHT_B * e @ pair.mapping


@pytest.fixture(scope="module")
def omp_merge(pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "union-omp"
    fills = merge(pair.config(omp={"missing_tokens": "omp", "method": "omp", "k": HIDDEN}), out)
    assert {(f.tensor, Path(f.model).name, f.tokens) for f in fills} == {
        ("model.embed_tokens.weight", "a", len(pair.only_b)),
        ("model.embed_tokens.weight", "b", len(pair.only_a)),
        ("lm_head.weight", "a", len(pair.only_b)),
        ("lm_head.weight", "b", len(pair.only_a)),
    }
    return out


def test_missing_rows_are_each_models_own_omp_approximation(pair, omp_merge):
    assert len(pair.only_a) > 5 and len(pair.only_b) > 5
    vocab, embed, lm_head = merged_rows(omp_merge)
    strings = sorted(vocab, key=vocab.get)
    assert len(strings) == embed.shape[0]
    expected = expected_if_both_knew(pair, strings)
    assert torch.allclose(embed, expected, atol=1e-4)
    assert torch.allclose(lm_head, 2 * expected, atol=2e-4)


def test_mergekit_alone_copies_the_other_models_raw_row(pair, omp_merge, tmp_path):
    merge(pair.config(), tmp_path / "plain")
    vocab, plain, _ = merged_rows(tmp_path / "plain")
    _, with_omp, _ = merged_rows(omp_merge)
    only_a = [vocab[s] for s in pair.only_a]
    only_b = [vocab[s] for s in pair.only_b]
    raw_a = torch.stack([pair.rows[s] for s in pair.only_a])
    raw_b = torch.stack([pair.rows[s] for s in pair.only_b]) @ pair.mapping
    assert torch.allclose(plain[only_a], raw_a, atol=1e-5)
    assert torch.allclose(plain[only_b], raw_b, atol=1e-5)
    assert (with_omp[only_a] - plain[only_a]).norm(dim=1).min() > 0.1
    shared = [i for s, i in vocab.items() if s not in pair.only_a and s not in pair.only_b]
    assert torch.equal(plain[shared], with_omp[shared])


def test_rows_equal_batch_omp_over_the_shared_tokens(pair, tmp_path):
    """With k < hidden the row is inexact; it must be exactly OMP's over the shared tokens."""
    k = 4
    merge(pair.config(omp={"missing_tokens": "omp", "method": "omp", "k": k}), tmp_path / "k4")
    vocab, embed, _ = merged_rows(tmp_path / "k4")
    vocab_a, vocab_b = pair.tok_a.get_vocab(), pair.tok_b.get_vocab()
    shared = [s for s in sorted(vocab, key=vocab.get) if s in vocab_a and s in vocab_b]
    rows_a = torch.stack([pair.rows[s] for s in shared])
    targets = torch.stack([pair.rows[s] for s in pair.only_a])
    indices, coeffs = batch_omp(targets, rows_a, k)
    omp_rows_b = torch.bmm(coeffs.unsqueeze(1), (rows_a @ pair.mapping)[indices]).squeeze(1)
    expected = WEIGHT_A * targets + WEIGHT_B * omp_rows_b
    assert torch.allclose(embed[[vocab[s] for s in pair.only_a]], expected, atol=1e-5)


def test_per_token_omp_source_leaves_other_tokens_to_mergekit(pair, tmp_path):
    chosen, other = pair.only_a[0], pair.only_a[1]
    tokens = {chosen: {"source": {"kind": "omp", "k": HIDDEN}}}
    fills = merge(pair.config(tokenizer={"source": "union", "tokens": tokens}), tmp_path / "one")
    assert [(Path(f.model).name, f.tokens) for f in fills] == [("b", 1), ("b", 1)]
    vocab, embed, _ = merged_rows(tmp_path / "one")
    assert torch.allclose(embed[vocab[chosen]], expected_if_both_knew(pair, [chosen])[0], atol=1e-4)
    assert torch.allclose(embed[vocab[other]], pair.rows[other], atol=1e-5)


def test_merged_model_loads_and_generates_in_transformers(omp_merge):
    tokenizer = transformers.AutoTokenizer.from_pretrained(omp_merge)
    model = transformers.AutoModelForCausalLM.from_pretrained(omp_merge)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_merge_card_adds_the_omp_rows_to_mergekits_card(pair, omp_merge):
    card = (omp_merge / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert {"mergekit", "merge", "mergekit-omp"} <= set(metadata["tags"])
    assert metadata["library_name"] == "transformers"
    assert card.split("---\n")[2].startswith("# union-omp\n")
    assert (
        f"| `model.embed_tokens.weight` | {pair.b} | {len(pair.only_a)} | {pair.a} | 16 |" in card
    )
    assert "missing_tokens: omp" in (omp_merge / "mergekit_config.yml").read_text()


def test_planner_is_mergekits_again_after_a_merge_even_a_failed_one(pair, tmp_path):
    with pytest.raises(TransplantError, match="k=100000 is larger than the"):
        merge(
            pair.config(omp={"missing_tokens": "omp", "method": "omp", "k": 100000}),
            tmp_path / "bad",
        )
    assert mergekit.plan.PermutedVocabulary is PermutedVocabulary
    assert not (tmp_path / "bad").exists()


def test_relative_model_paths_are_read_beside_the_config(pair, tmp_path, monkeypatch):
    config = pair.config()
    config["base_model"] = "a"
    config["models"][0]["model"] = "a"
    monkeypatch.chdir(tmp_path)
    parsed = parse_merge_config(yaml.safe_dump(config), "merge.yml", pair.a.parent)
    assert str(parsed.merge.base_model) == str(pair.a)
    assert str(parsed.written.base_model) == "a"
    assert parsed.models["a"] == str(pair.a)


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"omp": {"missing_token": "omp"}}, "unknown key 'omp.missing_token' (did you mean"),
        ({"omp": {"missing_tokens": "always"}}, "omp.missing_tokens: Input should be 'omp' or"),
        ({"omp": {"k": 0}}, "omp.k: Input should be greater than 0"),
        ({"omp": {"method": "nosuch"}}, "omp.method: unknown approximation method 'nosuch'"),
        (
            {"omp": {"method": "omp", "parameters": {"kk": 1}}},
            "omp.parameters.kk: method 'omp' takes no such parameter (did you mean 'k'?)",
        ),
        (
            {"omp": {"method": "fvt", "parameters": {"subword_method": "median"}}},
            "omp.parameters.subword_method: Input should be 'mean', 'sum'",
        ),
        (
            {
                "tokenizer": {
                    "source": "union",
                    "tokens": {"x": {"source": {"kind": "omp", "k": "a"}}},
                }
            },
            "tokenizer.tokens.x.source.k: Input should be a valid integer",
        ),
        (
            {
                "tokenizer": {
                    "source": "union",
                    "tokens": {"x": {"source": {"kind": "omp", "kk": 1}}},
                }
            },
            "unknown key 'tokenizer.tokens.x.source.kk' (did you mean 'k'?)",
        ),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "omp"}, "force": True}}}},
            "tokenizer.tokens.x.force: does not apply to an omp source",
        ),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "omp", "model": "/elsewhere"}}}}},
            "tokenizer.tokens.x.source.model: /elsewhere is not a model of this merge",
        ),
        ({"tokenizer": None, "omp": {"missing_tokens": "omp"}}, "need a merged vocabulary"),
        ({"merge_method": None}, "missing key 'merge_method'"),
    ],
)
def test_bad_configs_get_one_line_naming_the_key(pair, tmp_path, extra, expected):
    config = {key: value for key, value in pair.config(**extra).items() if value is not None}
    with pytest.raises(TransplantError) as excinfo:
        parse_merge_config(yaml.safe_dump(config), "merge.yml", tmp_path)
    message = str(excinfo.value)
    assert message.startswith("merge.yml: ") and "\n" not in message
    assert expected in message


def test_merge_command_refuses_a_non_empty_out_without_overwrite(pair, tmp_path):
    config_file = tmp_path / "merge.yml"
    config_file.write_text(yaml.safe_dump(pair.config()))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(merge_cli.main, [str(config_file), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "not empty (use --overwrite to replace it)" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# The approximation method of the rows a model lacks (`omp.method`).


def weights(config: dict, weight_a: float, weight_b: float) -> dict:
    """``config`` merged with these weights: (1, 0) gives model a's rows as the merged rows,
    exactly (1 * x + 0 * y), so the rows mergekit-omp made for one model can be read back."""
    config["models"][0]["parameters"]["weight"] = weight_a
    config["models"][1]["parameters"]["weight"] = weight_b
    return config


def embed_of(path: Path) -> torch.Tensor:
    return load_file(path / "model.safetensors")["model.embed_tokens.weight"]


def output_ids(out: Path, lacking_vocab: dict[str, int], source_vocab: dict[str, int]):
    """(output ids of the tokens only the source has, output ids both have), in id order."""
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    new = [vocab[s] for s in by_id if s in source_vocab and s not in lacking_vocab]
    shared = [vocab[s] for s in by_id if s in source_vocab and s in lacking_vocab]
    return vocab, new, shared


def transplant_problem(out: Path, lacking: Path, source: Path) -> ApproximationProblem:
    """The problem a transplant of ``lacking`` given the merged tokenizer has for the tokens
    only ``source`` has, built here from the written models (not by mergekit-omp's merge)."""
    output_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    lacking_tokenizer = transformers.AutoTokenizer.from_pretrained(lacking)
    lacking_vocab = lacking_tokenizer.get_vocab()
    source_vocab = transformers.AutoTokenizer.from_pretrained(source).get_vocab()
    vocab, new, shared = output_ids(out, lacking_vocab, source_vocab)
    string = {i: s for s, i in vocab.items()}
    lacking_rows, source_rows = embed_of(lacking), embed_of(source)
    return ApproximationProblem(
        targets=source_rows[[source_vocab[string[i]] for i in new]],
        donor_anchors=source_rows[[source_vocab[string[i]] for i in shared]],
        base_anchors=lacking_rows[[lacking_vocab[string[i]] for i in shared]],
        base_matrix=lacking_rows,
        target_ids=new,
        donor_anchor_ids=shared,
        base_anchor_ids=[lacking_vocab[string[i]] for i in shared],
        donor_vocab=vocabulary_of(output_tokenizer),
        base_vocab=vocabulary_of(lacking_tokenizer),
        donor_tokenizer=output_tokenizer,
        base_tokenizer=lacking_tokenizer,
    )


@pytest.fixture(scope="module")
def auto_merge(pair, tmp_path_factory) -> tuple[Path, list]:
    """The default method; weights (0, 1): the merged rows are model b's."""
    out = tmp_path_factory.mktemp("merged") / "union-auto"
    fills = merge(weights(pair.config(omp={"missing_tokens": "omp"}), 0.0, 1.0), out)
    return out, fills


def test_default_method_is_auto_and_it_chooses_by_bits_per_byte_with_the_merged_tokenizer(
    auto_merge,
):
    _, fills = auto_merge
    assert len(fills) == 4 and {f.method for f in fills} == {"auto"}
    for fill in fills:
        scores = fill.choice.scores
        assert list(scores) == list(CANDIDATES)
        assert fill.choice.chosen == min(scores, key=scores.get)
        assert fill.choice.validation == TEXT_VALIDATION  # the lacking model was run
        by_kind = fill.choice.scores_by_kind
        assert list(by_kind) == list(CANDIDATES)
        assert all(10 < bpb < 100 for b in by_kind.values() for bpb in b.values())  # random
        assert all(0 <= score < 100 for score in scores.values())  # bits per byte behind
        assert min(scores.values()) == scores[fill.choice.chosen]


def test_auto_rows_are_the_chosen_candidates_rows(pair, auto_merge):
    out, fills = auto_merge
    (fill,) = [
        f for f in fills if f.tensor == "model.embed_tokens.weight" and f.model == str(pair.b)
    ]
    problem = transplant_problem(out, pair.b, pair.a)
    assert fill.tokens == len(problem.target_ids) == len(pair.only_a)
    rows = {}
    for spec in fill.choice.scores:
        parsed = parse_method_spec(spec)
        rows[spec] = parsed.approximator(problem, **parsed.parameters).rows
    merged = embed_of(out)[problem.target_ids]
    assert torch.equal(merged, rows[fill.choice.chosen])
    assert any(not torch.allclose(merged, other, atol=1e-3) for other in rows.values())


def test_auto_choice_is_in_the_card_and_the_summary(pair, auto_merge):
    out, fills = auto_merge
    card = (out / "README.md").read_text()
    text = summary(fills)
    for fill in fills:
        chosen = fill.choice.chosen
        assert f"| {fill.anchors} | auto: `{chosen}` |" in card
        assert (
            f"* `{fill.tensor}` of {fill.model}: `auto` chose `{chosen}` from 5 candidates" in card
        )
        best = fill.choice.scores[chosen]
        assert f"(auto chose {chosen}, regret {best:.4f}, best of 5" in text
        for spec, score in fill.choice.scores.items():
            assert f"`{spec}` {score:.4f}" in card


def test_method_omp_gives_exactly_the_omp_rows(pair, tmp_path):
    """Model a's rows of the tokens only b has (weights 1, 0): omp_rows over the shared
    tokens, bit for bit."""
    out = tmp_path / "omp"
    config = weights(pair.config(omp={"missing_tokens": "omp", "method": "omp", "k": 4}), 1, 0)
    fills = merge(config, out)
    assert {(f.method, f.k, f.choice) for f in fills} == {("omp", 4, None)}
    vocab_a, vocab_b = pair.tok_a.get_vocab(), pair.tok_b.get_vocab()
    vocab, new, shared = output_ids(out, vocab_a, vocab_b)
    string = {i: s for s, i in vocab.items()}
    permutation_a = {i: vocab_a.get(s, -1) for i, s in string.items()}
    permutation_b = {i: vocab_b.get(s, -1) for i, s in string.items()}
    expected = omp_rows(
        embed_of(pair.b), embed_of(pair.a), permutation_b, permutation_a, new, shared, 4
    )
    assert len(new) == len(pair.only_b)
    assert torch.equal(embed_of(out)[new], expected)


def test_method_fvt_rows_are_fvt_on_the_transplant_problem(pair, tmp_path):
    """Model b's rows of the tokens only a has (weights 0, 1) are FVT's on the problem of a
    transplant of b given the merged tokenizer; those tokens are a's own vocabulary entries
    in it (the merged tokenizer is a's plus b's tokens), so they are also the rows a
    transplant of b given a's tokenizer makes. (b's tokens are added tokens of the merged
    tokenizer, which match their strings literally: there a transplant given b's tokenizer
    differs.)"""
    out = tmp_path / "fvt"
    fills = merge(weights(pair.config(omp={"missing_tokens": "omp", "method": "fvt"}), 0, 1), out)
    assert {(f.method, f.k) for f in fills} == {("fvt", None)}
    problem = transplant_problem(out, pair.b, pair.a)
    merged = embed_of(out)[problem.target_ids]
    assert torch.equal(merged, fvt(problem).rows)
    options = TransplantOptions(base_model=str(pair.b), donor=str(pair.a), method="fvt")
    result = transplant(options, progress=False)
    vocab_a = pair.tok_a.get_vocab()
    assert problem.target_ids == sorted(vocab_a[s] for s in pair.only_a)  # a's ids
    assert torch.equal(merged, result.matrices["embed"].matrix[problem.target_ids])
    assert (merged - embed_of(pair.a)[problem.target_ids]).norm(dim=1).min() > 0.1


def test_k_goes_to_the_method_where_it_takes_k():
    def chosen(**settings):
        return OmpMergeSettings(**settings).method_and_parameters()

    assert chosen() == ("auto", chosen(method="auto", k=8)[1])
    assert "k" not in chosen(k=8)[1]
    assert chosen(method="hybrid", k=8)[1]["k"] == 8
    assert chosen(method="omp_ridge", k=8, parameters={"k": 4})[1]["k"] == 4
    assert chosen(method="omp")[1]["k"] == 64
    assert OmpMergeSettings(k=8).omp_k == 8 and OmpMergeSettings().omp_k == 64


def test_a_bad_method_is_one_line_before_any_model_is_read(pair, tmp_path, monkeypatch):
    config_file = tmp_path / "merge.yml"
    config_file.write_text(yaml.safe_dump(pair.config(omp={"method": "omq"})))

    def no_reading(*args, **kwargs):
        raise AssertionError("a model was read")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_reading)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_reading)
    result = CliRunner().invoke(merge_cli.main, [str(config_file), str(tmp_path / "out")])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith("Error: ") and "omp.method: unknown approximation method 'omq'" in line
    assert not (tmp_path / "out").exists()


def test_omp_settings_that_change_nothing_are_warned(pair, tmp_path, caplog):
    def warnings_for(omp: dict) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_omp.merge.config"):
            parse_merge_config(yaml.safe_dump(pair.config(omp=omp)), "merge.yml", tmp_path)
        return caplog.text

    assert "omp.k: method 'auto' takes no k" in warnings_for({"missing_tokens": "omp", "k": 8})
    assert "omp.method: applies to `missing_tokens: omp` only" in warnings_for({"method": "fvt"})
    assert warnings_for({"missing_tokens": "omp", "method": "hybrid", "k": 8}) == ""


def test_auto_falls_back_to_leave_out_where_the_model_is_not_run(pair, tmp_path):
    omp = {"missing_tokens": "omp", "parameters": {"max_run_parameters": 0}}
    fills = merge(pair.config(omp=omp), tmp_path / "leave-out")
    assert len(fills) == 4
    for fill in fills:
        assert fill.choice.validation.startswith(LEAVE_OUT_VALIDATION)
        assert "the model could not be run" in fill.choice.validation
        scores = fill.choice.scores
        assert fill.choice.chosen == max(scores, key=scores.get)
        assert all(-1 <= score <= 1 for score in scores.values())


def test_a_failed_auto_candidate_is_null_in_the_strict_json_report(pair, tmp_path):
    omp = {
        "missing_tokens": "omp",
        "parameters": {"candidates": ["fvt", "omp:k=100000"], "max_run_parameters": 0},
    }
    config_file = tmp_path / "merge.yml"
    config_file.write_text(yaml.safe_dump(pair.config(omp=omp)))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        merge_cli.main, [str(config_file), str(tmp_path / "out"), "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "Infinity" not in text
    rows = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    for fill in rows["omp_rows"]:
        assert fill["choice"]["chosen"] == "fvt"
        assert fill["choice"]["scores"]["omp:k=100000"] is None
