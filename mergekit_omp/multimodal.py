"""A multimodal base's own special tokens (image, video and audio placeholders, begin and end
of image, ...) kept usable after the transplant.

The language model's embedding and LM head are transplanted like any other; the vision and
audio towers and projectors are carried unchanged by the write stage. What would break is
the glue: the model's config names its placeholder tokens by id (``image_token_index``,
``boi_token_index``, ``video_token_id``, ...), and its processor inserts them by content.
So each such token is added to the output tokenizer as a special token (unless the donor
already has one of that content), paired with its base row, and every config field that
held its base id is rewritten to its new id. The processor and preprocessor files are
carried over, and the tokenizer keeps the base's named attributes (``image_token``, ...) the
processors read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.load import LoadedModel
from mergekit_omp.vocabulary import vocabulary_of

ID_FIELD = re.compile(r"^(?P<role>\w+?)_token_(?:index|id)$")
TEXT_ROLES = {
    "bos",
    "eos",
    "pad",
    "unk",
    "sep",
    "cls",
    "mask",
    "decoder_start",
    "forced_bos",
    "forced_eos",
}
"""Token-id fields of the language model itself: these follow the donor (write stage)."""
PROCESSOR_FILES = [
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "additional_chat_templates",
]
ConfigPath = tuple[str, ...]


@dataclass(frozen=True)
class MultimodalTokens:
    """The base's multimodal special tokens and where the output puts them."""

    base_ids: dict[str, int]
    """Token content -> its id in the base."""
    new_ids: dict[str, int]
    """Token content -> its id in the output tokenizer."""
    attributes: dict[str, str]
    """Named tokenizer attributes the processors read (``image_token``) -> content."""
    config_fields: dict[ConfigPath, str]
    """Config field (path through sub-configs) -> the content of the token it names."""

    @property
    def forced_pairs(self) -> dict[int, int]:
        """Output id -> base id: each token keeps its base row."""
        return {self.new_ids[c]: self.base_ids[c] for c in self.base_ids}

    def config_values(self) -> dict[ConfigPath, int]:
        return {path: self.new_ids[content] for path, content in self.config_fields.items()}


def _sub_configs(config: PretrainedConfig, path: ConfigPath = ()):
    yield path, config
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            yield from _sub_configs(value, path + (key,))


def config_token_fields(config: PretrainedConfig) -> dict[ConfigPath, int]:
    """Every ``*_token_index``/``*_token_id`` field of ``config`` and its sub-configs that
    names a token other than the language model's own (bos, eos, pad, ...)."""
    fields: dict[ConfigPath, int] = {}
    for path, sub_config in _sub_configs(config):
        for key, value in vars(sub_config).items():
            match = ID_FIELD.match(key)
            if match and match["role"] not in TEXT_ROLES and isinstance(value, int):
                if not isinstance(value, bool):
                    fields[path + (key,)] = value
    return fields


def _named_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Model-specific named special tokens (``image_token``: ``<image>``) of a tokenizer."""
    standard = set(type(tokenizer).SPECIAL_TOKENS_ATTRIBUTES)
    named = {}
    for name in tokenizer.SPECIAL_TOKENS_ATTRIBUTES:
        value = getattr(tokenizer, name, None) if name not in standard else None
        if isinstance(value, str) and name != "extra_special_tokens":
            named[name] = value
    return named


def _processor_tokens(directory: Path) -> dict[str, str]:
    """``*_token`` strings of the base's processor config (Pixtral's ``[IMG_BREAK]``)."""
    path = directory / "processor_config.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in settings.items() if k.endswith("_token") and isinstance(v, str)}


def find_multimodal_tokens(base: LoadedModel) -> dict[str, int] | None:
    """The base's multimodal special tokens (content -> base id), None if it has none.

    A base is multimodal when its config names such a token; a text-only model's tokenizer
    may still carry image tokens (Gemma-3-270M's does), which are then left out."""
    fields = config_token_fields(base.config)
    if not fields:
        return None
    tokenizer = base.tokenizer
    vocab = tokenizer.get_vocab()
    contents: dict[str, int] = {}
    for base_id in fields.values():
        content = tokenizer.convert_ids_to_tokens(base_id) if base_id < len(tokenizer) else None
        if isinstance(content, str):
            contents.setdefault(content, base_id)
    named = {**_processor_tokens(base.checkpoint.directory), **_named_tokens(tokenizer)}
    for content in named.values():
        if content in vocab:
            contents.setdefault(content, vocab[content])
    return contents or None


def plan_multimodal_tokens(
    base: LoadedModel, donor: LoadedModel
) -> tuple[LoadedModel, MultimodalTokens | None]:
    """The donor with the base's multimodal tokens added to its tokenizer (and vocabulary),
    and where they went; the donor unchanged and None for a base without any."""
    base_ids = find_multimodal_tokens(base)
    if base_ids is None:
        return donor, None
    tokenizer = copy.deepcopy(donor.tokenizer)
    donor_vocab = tokenizer.get_vocab()
    missing = [content for content in base_ids if content not in donor_vocab]
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(c, special=True, normalized=False) for c in missing]},
        replace_extra_special_tokens=False,
    )
    attributes = {
        name: content
        for name, content in _named_tokens(base.tokenizer).items()
        if content in base_ids
    }
    if attributes:
        named: dict[str, str | AddedToken] = dict(attributes)
        tokenizer._set_model_specific_special_tokens(named)
    new_vocab = tokenizer.get_vocab()
    by_id = {base_id: content for content, base_id in base_ids.items()}
    fields = {
        path: by_id[base_id]
        for path, base_id in config_token_fields(base.config).items()
        if base_id in by_id
    }
    tokens = MultimodalTokens(
        base_ids=base_ids,
        new_ids={content: new_vocab[content] for content in base_ids},
        attributes=attributes,
        config_fields=fields,
    )
    donor = dataclasses.replace(donor, tokenizer=tokenizer, vocabulary=vocabulary_of(tokenizer))
    return donor, tokens


def rewrite_config_ids(config: PretrainedConfig, values: dict[ConfigPath, int]) -> None:
    """Set each config field (a path through sub-configs) to its new token id."""
    for path, value in values.items():
        target = config
        for key in path[:-1]:
            target = getattr(target, key)
        setattr(target, path[-1], value)
