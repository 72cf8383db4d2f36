"""Conformance matrix: a transplant into tiny random models of many architectures.

Each base is built by transformers from its own config class (hidden size 32, one or two
layers) with the tiny sentencepiece-style tokenizer; the donor is a tiny byte-level Llama.
For every architecture the transplant runs, the output loads with the model's own class
and generates, follows the donor's vocabulary (size, and matched rows equal to the base's
rows of the same bytes), and every tensor that is not vocabulary-indexed is bit-identical to
the base's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tiny
import torch
import transformers
from safetensors import safe_open
from tokenizers import AddedToken

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


def options(base: Path, donor: Path) -> TransplantOptions:
    """k = 8: the approximation is not what this matrix tests, and OMP's k sets its cost."""
    return TransplantOptions(
        base_model=str(base), donor=str(donor), method="omp", parameters={"k": 8}
    )


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
        if out_tensors[name].shape != tensor.shape:  # a per-token extra: an LM-head bias
            assert name.endswith("bias") and out_tensors[name].shape == (result.report.vocab_size,)
            continue
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
        options(base, tiny_donor),
        tmp_path / "out",
        progress=False,
    )
    model_class = getattr(
        transformers, transformers.AutoConfig.from_pretrained(base).architectures[0]
    )
    assert_conforms(base, tmp_path / "out", result, model_class)


def _text(model_type: str, tokenizer, **overrides) -> dict:
    settings = {k: v for k, v in {**SMALL, **overrides}.items() if v is not DROP}
    return dict(model_type=model_type, vocab_size=len(tokenizer), **settings)


def _vision(model_type: str, **overrides) -> dict:
    return dict(
        model_type=model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        **{"image_size": 28, "patch_size": 14, **overrides},
    )


def _with_tokens(tokenizer, named: dict[str, str]):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in named.values()],
        special_tokens=True,
    )
    tokenizer._set_model_specific_special_tokens(named)
    return tokenizer


def llava(tokenizer):
    tokenizer = _with_tokens(tokenizer, {"image_token": "<image>"})
    config = transformers.LlavaConfig(
        text_config=_text("llama", tokenizer),
        vision_config=_vision("clip_vision_model", projection_dim=32),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    return config, tokenizer, ["<image>"] * 4, {}


def gemma3(tokenizer):
    names = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = _with_tokens(tokenizer, names)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}
    config = transformers.Gemma3Config(
        text_config=_text("gemma3_text", tokenizer, sliding_window=16),
        vision_config=_vision("siglip_vision_model"),
        mm_tokens_per_image=1,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    return config, tokenizer, list(names.values()), {"token_type_ids": True}


def mistral3(tokenizer):
    tokens = {
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in tokens.values()],
        special_tokens=True,
    )
    config = transformers.Mistral3Config(
        text_config=_text("mistral", tokenizer),
        vision_config=_vision("pixtral", head_dim=16, image_size=56),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    processor_settings = {**tokens, "patch_size": 14, "spatial_merge_size": 2}
    layout = ["[IMG]", "[IMG]", "[IMG_BREAK]", "[IMG]", "[IMG]", "[IMG_END]"]
    return config, tokenizer, layout, {"processor_config": processor_settings, "image_size": 56}


QWEN_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def _qwen_vl(tokenizer, config_class, text_type: str, vision: dict, patch: int):
    tokenizer = _with_tokens(tokenizer, QWEN_VL_TOKENS)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in QWEN_VL_TOKENS.items()}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = config_class(
        text_config=_text(text_type, tokenizer, head_dim=DROP, rope_parameters=rope),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, **vision
        ),
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
    )
    layout = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    return config, tokenizer, layout, {"image_grid_thw": [[1, 2, 2]], "patch": patch}


def qwen2_5_vl(tokenizer):
    vision = dict(fullatt_block_indexes=[0], window_size=28)
    return _qwen_vl(tokenizer, transformers.Qwen2_5_VLConfig, "qwen2_5_vl_text", vision, 14)


def qwen3_vl(tokenizer):
    vision = dict(num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=14)
    config, tokenizer, layout, extra = _qwen_vl(
        tokenizer, transformers.Qwen3VLConfig, "qwen3_vl_text", vision, 14
    )
    return config, tokenizer, layout, {**extra, "mm_token_type_ids": True}


MULTIMODAL_ARCHITECTURES = {
    "llava": llava,
    "gemma3": gemma3,
    "mistral3": mistral3,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
}


def multimodal_inputs(tokenizer, image_tokens: list[str], text_ids: list[int], extra: dict):
    image_ids = tokenizer.convert_tokens_to_ids(image_tokens)
    input_ids = torch.tensor([text_ids[:2] + image_ids + text_ids[2:]])
    size = extra.get("image_size", 28)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": input_ids,
        "pixel_values": torch.randn(1, 3, size, size, generator=generator),
    }
    if extra.get("token_type_ids"):
        image_positions = torch.isin(input_ids, torch.tensor(image_ids))
        inputs["token_type_ids"] = image_positions.long()
    if "processor_config" in extra:
        inputs["image_sizes"] = torch.tensor([[size, size]])
    if "image_grid_thw" in extra:  # Qwen: flattened 14 x 14 patches, two frames each
        grid = torch.tensor(extra["image_grid_thw"])
        patches = int(grid.prod())
        patch = extra["patch"]
        inputs["pixel_values"] = torch.randn(patches, 3 * 2 * patch * patch, generator=generator)
        inputs["image_grid_thw"] = grid
    if extra.get("mm_token_type_ids"):  # Qwen3-VL: 1 marks image placeholders
        placeholder = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs["mm_token_type_ids"] = (input_ids == placeholder).long()
    return inputs


@pytest.mark.parametrize("name", sorted(MULTIMODAL_ARCHITECTURES))
def test_multimodal_architecture(name, tiny_donor, metaspace_tok, tmp_path):
    config, base_tok, image_tokens, extra = MULTIMODAL_ARCHITECTURES[name](metaspace_tok)
    model_class = getattr(transformers, config.architectures[0]) if config.architectures else None
    model_class = (
        model_class or transformers.AutoModelForImageTextToText._model_mapping[type(config)]
    )
    torch.manual_seed(0)
    base_model = model_class(config).eval()
    base = tiny.save(base_model, base_tok, tmp_path / "base")
    if "processor_config" in extra:
        (base / "processor_config.json").write_text(json.dumps(extra["processor_config"]))
    result = transplant(
        options(base, tiny_donor),
        tmp_path / "out",
        progress=False,
    )
    out = tmp_path / "out"
    out_config = transformers.AutoConfig.from_pretrained(out)
    out_tok = transformers.AutoTokenizer.from_pretrained(out)
    # every base multimodal token is a special token of the output, with the config naming it
    for content in image_tokens:
        assert content in out_tok.all_special_tokens
    for key in (
        "image_token_index",
        "boi_token_index",
        "eoi_token_index",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
    ):
        if hasattr(config, key):
            content = base_tok.convert_ids_to_tokens(getattr(config, key))
            assert getattr(out_config, key) == out_tok.convert_tokens_to_ids(content)
    if "processor_config" in extra:
        assert json.loads((out / "processor_config.json").read_text()) == extra["processor_config"]
    # the vision tower, projector and layers carried byte for byte
    base_tensors, out_tensors = stored_tensors(base), stored_tensors(out)
    vocabulary_names = {m.tensor_name for m in result.matrices.values()}
    for tensor_name, tensor in base_tensors.items():
        if tensor_name not in vocabulary_names:
            assert torch.equal(out_tensors[tensor_name], tensor), tensor_name
    # same image and same text (tokens with exactly matched rows) -> same hidden states,
    # and logits of each donor token equal to the base's logits of its base token
    out_model = model_class.from_pretrained(out).eval()
    exact = sorted(
        (d, b)
        for d, (b, kind) in result.matrices["embed"].match.matched.items()
        if kind == MatchKind.EXACT
    )[40:46]
    donor_text, base_text = [d for d, _ in exact], [b for _, b in exact]
    out_inputs = multimodal_inputs(out_tok, image_tokens, donor_text, extra)
    base_inputs = multimodal_inputs(base_tok, image_tokens, base_text, extra)
    with torch.no_grad():
        out_logits = out_model(**out_inputs).logits
        base_logits = base_model(**base_inputs).logits
    assert out_logits.shape[-1] == result.report.vocab_size
    torch.testing.assert_close(out_logits[..., donor_text], base_logits[..., base_text])
