"""Write stage: the output model's files, written into the staging directory that
``publish.staged_output`` renames into place once complete.

Weights go through mergekit's ``TensorWriter``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
import tqdm
from mergekit.common import set_config_value
from mergekit.io.tasks import LoaderCache
from mergekit.io.tensor_writer import TensorWriter
from mergekit.options import MergeOptions
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.assemble import remap_vocabulary_rows
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def write_weights(
    directory: Path,
    base: LoadedModel,
    replacements: dict[str, torch.Tensor],
    aux_match: VocabularyMatch,
    out_rows: int,
    merge_options: MergeOptions,
) -> None:
    """Stream every base tensor to ``directory``, swapping in the new vocabulary matrices.

    ``replacements`` maps tensor names to vocabulary-first matrices.
    """
    writer = TensorWriter(
        str(directory),
        max_shard_size=merge_options.out_shard_size,
        safe_serialization=merge_options.safe_serialization,
        use_async=merge_options.async_write,
        max_write_threads=merge_options.write_threads,
    )
    loader = LoaderCache().get(base.reference)
    weights = list(base.arch.all_weights())
    for info in tqdm.tqdm(weights, desc="Writing weights", disable=merge_options.quiet):
        if info.name in replacements:
            tensor = replacements[info.name].movedim(0, info.vocabulary_axis or 0)
        elif base.lm_head_info is not None and info.name == base.lm_head_info.name and base.tied:
            continue
        else:
            try:
                tensor = loader.get_tensor(info.name, aliases=info.aliases, raise_on_missing=False)
            except Exception as exc:
                raise TransplantError(f"cannot read {info.name} from {base.path}: {exc}") from exc
            if tensor is None:
                if info.optional:
                    continue
                raise TransplantError(f"{base.path} is missing tensor {info.name}")
            if info.vocabulary_axis is not None:
                tensor = remap_vocabulary_rows(
                    tensor.movedim(info.vocabulary_axis, 0), aux_match, out_rows
                ).movedim(0, info.vocabulary_axis)
        writer.save_tensor(info.name, tensor, clone=merge_options.clone_tensors)
    writer.finalize()


def donor_token_ids(donor: LoadedModel) -> dict[str, object]:
    """bos/eos/pad/unk ids as the donor states them: its config, else its tokenizer."""
    ids: dict[str, object] = {}
    for key in TOKEN_ID_KEYS:
        value = getattr(donor.config, key, None)
        if value is None:
            value = getattr(donor.tokenizer, key, None)
        ids[key] = value
    return ids


def output_config(
    base: LoadedModel, vocab_size: int, token_ids: dict[str, object]
) -> PretrainedConfig:
    config = copy.deepcopy(base.config)
    set_config_value(config, base.arch.info.vocab_size_config_key or "vocab_size", vocab_size)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in token_ids.items():
        for target in {id(config): config, id(text_config): text_config}.values():
            if hasattr(target, key) or value is not None:
                setattr(target, key, value)
    return config


def write_config_and_tokenizer(
    directory: Path,
    base: LoadedModel,
    donor: LoadedModel,
    vocab_size: int,
    token_ids: dict[str, object],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Save the config and generation config with the donor's ids, and the output tokenizer."""
    output_config(base, vocab_size, token_ids).save_pretrained(directory)
    with contextlib.suppress(OSError):
        generation = GenerationConfig.from_pretrained(base.path)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(generation, key, token_ids.get(key))
        generation.save_pretrained(directory)
    (tokenizer or donor.tokenizer).save_pretrained(directory)
    drop_loading_keys(directory / "tokenizer_config.json")


LOADING_KEYS = ("is_local", "local_files_only")
"""How transformers 5 loaded the donor's tokenizer, which ``save_pretrained`` writes back."""


def drop_loading_keys(path: Path) -> None:
    """Leave the saved tokenizer_config.json with the donor's keys, not the loader's."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    kept = {key: value for key, value in config.items() if key not in LOADING_KEYS}
    if kept != config:
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
