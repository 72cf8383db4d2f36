"""Conformance matrix: a transplant into tiny random models of many architectures.

Each base is built by transformers from its own config class (hidden size 32, one or two
layers) with the tiny sentencepiece-style tokenizer; the donor is a tiny byte-level Llama.
For every architecture the transplant runs, the output loads with the model's own class
and generates, follows the donor's vocabulary (size, and matched rows equal to the base's
rows of the same bytes), and every tensor that is not vocabulary-indexed is bit-identical to
the base's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch
import transformers
from safetensors import safe_open

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.match import MatchKind

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=64,
)
MOE = dict(num_experts_per_tok=1, moe_intermediate_size=32)
DROP = object()
"""An override that removes a key of ``SMALL`` (a config without that setting)."""
GPT2_LIKE = dict(n_embd=32, n_layer=1, n_head=2, n_positions=64)

TEXT_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {"num_local_experts": 2, **MOE}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 2, "decoder_sparse_step": 1, **MOE}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {"sliding_window": 16}),
    "phi3": ("phi3", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "phi": ("phi", {"num_key_value_heads": 2}),
    "gpt2": ("gpt2", GPT2_LIKE),
    "gpt_bigcode": ("gpt_bigcode", GPT2_LIKE),
    "starcoder2": ("starcoder2", {}),
    "olmo2": ("olmo2", {}),
    "stablelm": ("stablelm", {"num_key_value_heads": 2}),
    "granite": ("granite", {}),
    "glm4": ("glm4", {"pad_token_id": 0}),
    "gpt_neox": ("gpt_neox", {}),
    "falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 1, "head_dim": DROP}),
    "cohere": ("cohere", {"use_qk_norm": True}),
    "cohere2": ("cohere2", {}),
    "exaone4": ("exaone4", {}),
    "lfm2": ("lfm2", {"layer_types": ["full_attention"], "full_attn_idxs": [0]}),
    "mamba": ("mamba", {"state_size": 4, "expand": 2, "conv_kernel": 2}),
}


def tiny_base(model_type: str, overrides: dict, tokenizer, directory: Path) -> Path:
    settings = {k: v for k, v in {**SMALL, **overrides}.items() if v is not DROP}
    config = transformers.AutoConfig.for_model(
        model_type,
        **settings,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return tiny.save(model, tokenizer, directory)


@pytest.fixture(scope="module")
def tiny_donor(tmp_path_factory, small_byte_level_tok) -> Path:
    root = tmp_path_factory.mktemp("donor")
    return tiny.tiny_llama(small_byte_level_tok, root / "donor", hidden_size=16, seed=1)


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            tensors.update((name, handle.get_tensor(name)) for name in handle.keys())
    return tensors


def assert_conforms(base: Path, out: Path, result, model_class: type) -> None:
    base_tensors, out_tensors = stored_tensors(base), stored_tensors(out)
    vocabulary_names = {m.tensor_name for m in result.matrices.values()}
    assert set(out_tensors) == set(base_tensors)
    for name, tensor in base_tensors.items():
        if name in vocabulary_names:
            continue
        if tensor.shape[:1] == (result.report.vocab_size,) or name.endswith("lm_head.bias"):
            continue  # a per-token extra, remapped
        assert out_tensors[name].dtype == tensor.dtype, name
        assert torch.equal(out_tensors[name].view(-1), tensor.view(-1)), name
    embed = result.matrices["embed"]
    assert out_tensors[embed.tensor_name].shape[0] == result.report.vocab_size
    exact = [(d, b) for d, (b, kind) in embed.match.matched.items() if kind == MatchKind.EXACT]
    assert len(exact) > 50
    donor_ids, base_ids = zip(*exact, strict=True)
    assert torch.equal(
        out_tensors[embed.tensor_name][list(donor_ids)],
        base_tensors[embed.tensor_name][list(base_ids)],
    )
    model = model_class.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == result.report.vocab_size
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", sorted(TEXT_ARCHITECTURES))
def test_text_architecture(name, tiny_donor, metaspace_tok, tmp_path):
    model_type, overrides = TEXT_ARCHITECTURES[name]
    base = tiny_base(model_type, overrides, metaspace_tok, tmp_path / "base")
    result = transplant(
        TransplantOptions(base_model=str(base), donor=str(tiny_donor)),
        tmp_path / "out",
        progress=False,
    )
    model_class = getattr(
        transformers, transformers.AutoConfig.from_pretrained(base).architectures[0]
    )
    assert_conforms(base, tmp_path / "out", result, model_class)
