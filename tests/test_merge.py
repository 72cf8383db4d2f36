"""mergekit-omp-merge: mergekit's run_merge with OMP rows for the tokens a model lacks.

The pair is built so the right answer is known: every token string s has a row E[s]; model
A's rows are E[s] and model B's are E[s] @ W for an invertible W. With k = hidden size, OMP
rebuilds any row from the shared tokens exactly, so B's row of a token only A has is
E[s] @ W, and A's row of a token only B has is E[s]: the merged matrix is then exactly what
it would be had both models known every token. mergekit's own rule copies the other model's
raw row instead.
"""

from __future__ import annotations

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

from mergekit_omp.cli import merge as merge_cli
from mergekit_omp.errors import TransplantError
from mergekit_omp.kernels.omp import batch_omp
from mergekit_omp.merge import parse_merge_config, run_omp_merge

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
    fills = merge(pair.config(omp={"missing_tokens": "omp", "k": HIDDEN}), out)
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
    merge(pair.config(omp={"missing_tokens": "omp", "k": k}), tmp_path / "k4")
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
        merge(pair.config(omp={"missing_tokens": "omp", "k": 100000}), tmp_path / "bad")
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
