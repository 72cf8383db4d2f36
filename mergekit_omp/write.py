"""Write stage: the output model's files, written into the staging directory that
``publish.staged_output`` renames into place once complete.

With a safetensors base and mergekit's default output options, the shards that hold no
vocabulary tensor are copied as files by ``copying_untouched_shards`` while the vocabulary
matrices are computed, and ``write_weights`` rewrites only the others. Otherwise every tensor
goes through mergekit's ``TensorWriter``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import tqdm
from mergekit.common import set_config_value
from mergekit.io.tasks import LoaderCache
from mergekit.io.tensor_writer import TensorWriter
from mergekit.options import MergeOptions
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.assemble import remap_vocabulary_rows
from mergekit_omp.checkpoint import ShardCopy, copy_files, shards_holding, write_passthrough
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.match import VocabularyMatch
from mergekit_omp.multimodal import PROCESSOR_FILES, MultimodalTokens, rewrite_config_ids
from mergekit_omp.publish import signals_held

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def resharding_requested(merge_options: MergeOptions) -> bool:
    """The user asked for a shard size or a format of their own (``--out-shard-size``,
    ``--no-safe-serialization``): then tensors are re-sharded through ``TensorWriter``."""
    default_shard_size = MergeOptions.model_fields["out_shard_size"].default
    return (
        merge_options.out_shard_size != default_shard_size or not merge_options.safe_serialization
    )


def writes_passthrough(base: LoadedModel, merge_options: MergeOptions) -> bool:
    """Shards are carried as files (copied, or rewritten around the vocabulary tensors)."""
    return base.checkpoint.is_safetensors and not resharding_requested(merge_options)


def untouched_shards(base: LoadedModel) -> tuple[str, ...]:
    """The base's shard files that hold no vocabulary tensor."""
    vocabulary = shards_holding(base.checkpoint, base.located.names)
    return tuple(f for f in base.checkpoint.shard_files() if f not in vocabulary)


@contextlib.contextmanager
def copying_untouched_shards(
    directory: Path, base: LoadedModel, merge_options: MergeOptions
) -> Iterator[ShardCopy | None]:
    """Copy the base's shards without a vocabulary tensor into ``directory`` in the
    background while the block runs (``None`` where there are none, or tensors are
    re-sharded); ``write_weights`` waits for the copy.

    If the block fails or is interrupted, the copy is stopped and waited for (SIGINT and
    SIGTERM held meanwhile) before the error goes on, so no thread writes into ``directory``
    once it is being removed.
    """
    base = base.without_matrices()  # this frame lives as long as the block: no matrices
    shards = untouched_shards(base) if writes_passthrough(base, merge_options) else ()
    if not shards:
        yield None
        return
    copying = ShardCopy(base.checkpoint, directory, shards).start()
    try:
        yield copying
    except BaseException:
        with signals_held():
            copying.cancel()
        raise
    join_copy(copying, base)  # the write stage joined it already; never publish half of it


def join_copy(copying: ShardCopy, base: LoadedModel) -> None:
    try:
        copying.join()
    except OSError as exc:
        raise TransplantError(f"cannot copy the weights of {base.path}: {exc}") from exc


def output_vocabulary_tensors(
    base: LoadedModel,
    replacements: dict[str, torch.Tensor],
    aux_match: VocabularyMatch,
    out_rows: int,
) -> dict[str, torch.Tensor]:
    """Every vocabulary-indexed tensor of the output under its checkpoint name, laid out as
    stored (``replacements`` are vocabulary-first matrices)."""
    located = base.located
    tensors: dict[str, torch.Tensor] = {}
    embed, lm_head = located.embed, located.lm_head
    if embed.name in replacements:
        tensors[embed.name] = replacements[embed.name].movedim(0, embed.vocabulary_axis or 0)
    if lm_head is not None:
        matrix = replacements.get(lm_head.name)
        if matrix is None and located.tied:
            matrix = replacements[embed.name]  # a tied checkpoint storing a copy
        if matrix is not None:
            tensors[lm_head.name] = matrix.movedim(0, lm_head.vocabulary_axis or 0)
    loader = LoaderCache().get(base.reference)
    for info in located.extras:
        try:
            tensor = loader.get_tensor(info.name)
        except Exception as exc:
            raise TransplantError(f"cannot read {info.name} from {base.path}: {exc}") from exc
        axis = info.vocabulary_axis or 0
        tensors[info.name] = remap_vocabulary_rows(
            tensor.movedim(axis, 0), aux_match, out_rows
        ).movedim(0, axis)
    return tensors


def write_weights(
    directory: Path,
    base: LoadedModel,
    replacements: dict[str, torch.Tensor],
    aux_match: VocabularyMatch,
    out_rows: int,
    merge_options: MergeOptions,
    copying: ShardCopy | None = None,
) -> None:
    """The base checkpoint in ``directory`` with its vocabulary tensors replaced.

    ``replacements`` maps tensor names to vocabulary-first matrices. Every other tensor is
    written exactly as stored (name, dtype, bytes): shards without a vocabulary tensor are
    copied as files (by ``copying``, from ``copying_untouched_shards``, where given: this
    waits for it), the others rewritten around the new tensors. A ``.bin`` base, or a
    user's own shard size or format, re-shards all tensors through mergekit's
    ``TensorWriter`` instead.
    """
    vocabulary = output_vocabulary_tensors(base, replacements, aux_match, out_rows)
    if writes_passthrough(base, merge_options):
        try:
            write_passthrough(base.checkpoint, directory, vocabulary, copying)
        except OSError as exc:
            raise TransplantError(f"cannot copy the weights of {base.path}: {exc}") from exc
        return
    if copying is not None:
        raise ValueError("shards were copied for an output that re-shards every tensor")
    writer = TensorWriter(
        str(directory),
        max_shard_size=merge_options.out_shard_size,
        safe_serialization=merge_options.safe_serialization,
        use_async=merge_options.async_write,
        max_write_threads=merge_options.write_threads,
    )
    loader = LoaderCache().get(base.reference)
    names = base.checkpoint.names
    for name in tqdm.tqdm(names, desc="Writing weights", disable=merge_options.quiet):
        tensor = vocabulary.get(name)
        if tensor is None:
            try:
                tensor = loader.get_tensor(name)
            except Exception as exc:
                raise TransplantError(f"cannot read {name} from {base.path}: {exc}") from exc
        writer.save_tensor(name, tensor, clone=merge_options.clone_tensors)
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
    base: LoadedModel,
    vocab_size: int,
    token_ids: dict[str, object],
    multimodal: MultimodalTokens | None = None,
) -> PretrainedConfig:
    config = copy.deepcopy(base.config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    key = base.located.vocab_size_key
    with contextlib.suppress(RuntimeError):
        set_config_value(config, key, vocab_size)
    for target in (config, text_config):
        if getattr(target, "vocab_size", None) is not None:
            target.vocab_size = vocab_size
    for key, value in token_ids.items():
        for target in {id(config): config, id(text_config): text_config}.values():
            if hasattr(target, key) or value is not None:
                setattr(target, key, value)
    if multimodal is not None:
        rewrite_config_ids(config, multimodal.config_values())
    return config


def write_config_and_tokenizer(
    directory: Path,
    base: LoadedModel,
    donor: LoadedModel,
    vocab_size: int,
    token_ids: dict[str, object],
    tokenizer: PreTrainedTokenizerBase | None = None,
    multimodal: MultimodalTokens | None = None,
) -> None:
    """Save the config and generation config with the donor's ids, and the output tokenizer.

    A multimodal base's config names its special tokens by their new ids, and its processor
    files (and the chat templates its processor applies) are carried over.
    """
    output_config(base, vocab_size, token_ids, multimodal).save_pretrained(directory)
    with contextlib.suppress(OSError):
        generation = GenerationConfig.from_pretrained(base.path)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(generation, key, token_ids.get(key))
        generation.save_pretrained(directory)
    (tokenizer or donor.tokenizer).save_pretrained(directory)
    drop_loading_keys(directory / "tokenizer_config.json")
    if multimodal is not None:
        copy_files(base.checkpoint.directory, directory, PROCESSOR_FILES)
    copy_files(base.checkpoint.directory, directory, custom_code_files(base))


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


def custom_code_files(base: LoadedModel) -> list[str]:
    """The base's own modelling code (``*.py``) when its config maps auto classes to it
    (``auto_map``): the output's config still does."""
    if not getattr(base.config, "auto_map", None):
        return []
    return sorted(path.name for path in base.checkpoint.directory.glob("*.py"))
