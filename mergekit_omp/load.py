"""Load stage: a model's config, architecture, tokenizer and vocabulary matrices.

Weights are read lazily through mergekit's ``LoaderCache``: only the input embeddings and
the LM head are materialised here; every other tensor is streamed at write time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
from mergekit.architecture import ConfiguredModelArchitecture, WeightInfo, arch_info_for_config
from mergekit.architecture.auto import infer_architecture_info
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from mergekit.vocabulary import vocabulary_views
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.errors import TransplantError
from mergekit_omp.vocabulary import Vocabulary, vocabulary_of

LOG = logging.getLogger(__name__)
HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    reference: ModelReference
    config: PretrainedConfig
    arch: ConfiguredModelArchitecture
    embed_info: WeightInfo
    lm_head_info: WeightInfo | None
    tokenizer: PreTrainedTokenizerBase
    vocabulary: Vocabulary
    embed: torch.Tensor | None
    lm_head: torch.Tensor | None

    @property
    def path(self) -> str:
        return self.reference.model.path

    @property
    def tied(self) -> bool:
        """The LM head is the input embedding matrix (no separate tensor)."""
        return ties_embeddings(self.config)

    def without_matrices(self) -> LoadedModel:
        """This model without its loaded vocabulary matrices (everything else is kept)."""
        return dataclasses.replace(self, embed=None, lm_head=None)


def model_reference(path: str) -> ModelReference:
    """A mergekit reference to a local model directory (or, if not local, a hub id)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise TransplantError(f"{path} is a file, not a model directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TransplantError(f"{path} is not a model directory (no config.json)")
    elif not HUB_ID_RE.match(path):
        raise TransplantError(f"model directory {path} does not exist")
    return ModelReference.model_validate(path)


def architecture_of(
    reference: ModelReference, options: MergeOptions
) -> tuple[PretrainedConfig, ConfiguredModelArchitecture]:
    try:
        config = reference.config(trust_remote_code=options.trust_remote_code)
    except Exception as exc:
        raise TransplantError(f"cannot read the config of {reference}: {exc}") from exc
    info = arch_info_for_config(config)
    if info is None:
        info = infer_architecture_info((reference,), reference, options)
    return config, ConfiguredModelArchitecture(info=info, config=config)


def vocabulary_weights(arch: ConfiguredModelArchitecture) -> tuple[WeightInfo, WeightInfo | None]:
    """The input embedding and LM head weights of a single-module architecture."""
    if len(arch.info.modules) != 1:
        raise TransplantError("models with several modules are not supported")
    module = arch.get_module(next(iter(arch.info.modules)))

    def vocab_matrix(weights: list[WeightInfo]) -> WeightInfo | None:
        found = [w for w in weights if w.vocabulary_axis is not None and w.name.endswith(".weight")]
        return found[0] if found else None

    embed = vocab_matrix(list(module.pre_weights()))
    if embed is None:
        raise TransplantError(f"{arch.info.name()} has no input embedding matrix")
    return embed, vocab_matrix(list(module.post_weights()))


def load_tokenizer(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TransplantError(f"cannot load the tokenizer of {path}: {exc}") from exc


def _read_matrix(
    reference: ModelReference,
    info: WeightInfo,
    device: str,
    aliases: tuple[str, ...],
) -> torch.Tensor | None:
    try:
        loader = LoaderCache().get(reference)
        tensor = loader.get_tensor(
            info.name, device=device, aliases=aliases, raise_on_missing=False
        )
    except TransplantError:
        raise
    except Exception as exc:
        raise TransplantError(f"cannot read weights of {reference}: {exc}") from exc
    if tensor is None:
        return None
    (view,) = vocabulary_views((tensor,), info.vocabulary_axis, info.name)
    if view.ndim != 2:
        raise TransplantError(f"{info.name} of {reference} is not a matrix")
    if not _is_finite(view):
        raise TransplantError(f"{info.name} of {reference} contains NaN or Inf values")
    return view


def _is_finite(matrix: torch.Tensor) -> bool:
    """No NaN or Inf. A sum is finite only then, so the elementwise check (1.8 s for the two
    real models' embeddings, against 0.05 s) runs only when it is not: a NaN or Inf, or an
    overflow of the sum."""
    if torch.isfinite(matrix.sum()):
        return True
    return bool(torch.isfinite(matrix).all())


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration.

    Reading a 262k-token tokenizer and its vocabulary allocates millions of containers, and
    the collector walks all the live ones again at every full collection: the load stage
    of Gemma-3 <- SmolLM2 takes 2.2 to 3.0 s with it paused, 4.6 to 5.9 s without.
    Nothing made here is cyclic garbage.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


WIDTH_KEYS = ("hidden_size", "embedding_size", "word_embed_proj_dim")
"""Config keys a vocabulary matrix's width may follow (ALBERT and OPT-350m project)."""


def check_width(config: PretrainedConfig, matrix: torch.Tensor, name: str, path: str) -> None:
    """The matrix must be as wide as the config says, or the output would not load."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    widths = {key: getattr(text_config, key, None) for key in WIDTH_KEYS}
    stated = [width for width in widths.values() if isinstance(width, int)]
    if stated and matrix.shape[1] not in stated:
        raise TransplantError(
            f"{path}: {name} is {matrix.shape[1]} wide but its config says hidden_size "
            f"{widths['hidden_size']}"
        )


def ties_embeddings(config: PretrainedConfig) -> bool:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(
        getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    )


def load_model(
    path: str, options: MergeOptions, *, lm_head_falls_back_to_embed: bool
) -> LoadedModel:
    """Read what a transplant needs from one model.

    With ``lm_head_falls_back_to_embed`` a model with tied embeddings reports its embedding
    matrix as its LM head (the donor side); otherwise its ``lm_head`` is None (the base side,
    whose output stays tied).
    """
    reference = model_reference(path)
    config, arch = architecture_of(reference, options)
    embed_info, lm_head_info = vocabulary_weights(arch)
    device = options.device or "cpu"
    embed = _read_matrix(reference, embed_info, device, tuple(embed_info.aliases or ()))
    if embed is None:
        raise TransplantError(f"{path} has no input embedding tensor ({embed_info.name})")
    check_width(config, embed, embed_info.name, path)
    lm_head = None
    if lm_head_info is not None and not ties_embeddings(config):
        lm_head = _read_matrix(reference, lm_head_info, device, tuple(lm_head_info.aliases or ()))
        if lm_head is None:
            raise TransplantError(f"{path} has untied embeddings but no {lm_head_info.name}")
        check_width(config, lm_head, lm_head_info.name, path)
    elif lm_head_info is not None and lm_head_falls_back_to_embed:
        lm_head = embed
    with garbage_collection_paused():
        tokenizer = load_tokenizer(path, options.trust_remote_code)
        vocabulary = vocabulary_of(tokenizer)
    return LoadedModel(
        reference=reference,
        config=config,
        arch=arch,
        embed_info=embed_info,
        lm_head_info=lm_head_info,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        embed=embed,
        lm_head=lm_head,
    )
