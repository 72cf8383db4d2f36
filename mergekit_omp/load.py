"""Load stage: a model's config, checkpoint index, tokenizer and vocabulary matrices.

Weights are read lazily through mergekit's ``LoaderCache``: only the input embeddings and
the LM head are materialised here (``locate.py`` says which tensors they are); every other
tensor is carried to the output as stored at write time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
from mergekit.architecture import WeightInfo
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from mergekit.vocabulary import vocabulary_views
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergekit_omp.checkpoint import Checkpoint, check_model_files, require_regular
from mergekit_omp.errors import TransplantError
from mergekit_omp.locate import VocabularyTensors, vocabulary_tensors
from mergekit_omp.vocabulary import Vocabulary, vocabulary_of

LOG = logging.getLogger(__name__)
HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    reference: ModelReference
    config: PretrainedConfig
    checkpoint: Checkpoint
    located: VocabularyTensors
    tokenizer: PreTrainedTokenizerBase
    vocabulary: Vocabulary
    embed: torch.Tensor | None
    lm_head: torch.Tensor | None

    @property
    def path(self) -> str:
        return self.reference.model.path

    @property
    def tied(self) -> bool:
        """The LM head is the input embedding matrix."""
        return self.located.tied

    @property
    def embed_info(self) -> WeightInfo:
        return self.located.embed

    @property
    def lm_head_info(self) -> WeightInfo | None:
        """The LM head tensor of the checkpoint, if it stores one (tied or not)."""
        return self.located.lm_head

    def without_matrices(self) -> LoadedModel:
        """This model without its loaded vocabulary matrices (everything else is kept)."""
        return dataclasses.replace(self, embed=None, lm_head=None)

    def release_matrices(self) -> None:
        """Drop the loaded vocabulary matrices from this model itself, for every holder of
        it: their memory is freed once no problem or view holds them."""
        object.__setattr__(self, "embed", None)
        object.__setattr__(self, "lm_head", None)


def model_reference(path: str) -> ModelReference:
    """A mergekit reference to a local model directory (or, if not local, a hub id)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise TransplantError(f"{path} is a file, not a model directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            require_regular(os.path.join(path, "config.json"))
            raise TransplantError(f"{path} is not a model directory (no config.json)")
        check_local_model(path)
    elif not HUB_ID_RE.match(path):
        raise TransplantError(f"model directory {path} does not exist")
    return ModelReference.model_validate(path)


def check_local_model(directory: str) -> None:
    """What is checked before anything of a local model directory is read."""
    check_model_files(directory)
    check_config_values(directory)


SIZE_KEYS = ("vocab_size",)
"""Config values that size a matrix: a whole number of at least 1, checked before
transformers reads the config (it accepts ``vocab_size: -5`` with a warning)."""


def check_config_values(directory: str) -> None:
    """The sizes in a local model's ``config.json`` (and its ``text_config``) are positive."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return  # reading the config says what is wrong
    sections = [config, config.get("text_config")] if isinstance(config, dict) else []
    for section in sections:
        if not isinstance(section, dict):
            continue
        for key in SIZE_KEYS:
            value = section.get(key)
            if key in section and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1
            ):
                raise TransplantError(
                    f"{path}: {key} is {json.dumps(value)}: it must be a whole number of at least 1"
                )


@contextlib.contextmanager
def library_warnings_silenced() -> Iterator[None]:
    """torch's warnings while unpickling a checkpoint (``Detected pickle protocol 4 ...``,
    three lines): what matters reaches the user as the error, if any, on one line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        yield


def read_config(reference: ModelReference, options: MergeOptions) -> PretrainedConfig:
    try:
        return reference.config(trust_remote_code=options.trust_remote_code)
    except Exception as exc:
        raise TransplantError(f"cannot read the config of {reference}: {exc}") from exc


def read_checkpoint(reference: ModelReference) -> Checkpoint:
    try:
        with library_warnings_silenced():
            return Checkpoint.of(reference)
    except Exception as exc:
        raise TransplantError(f"cannot read the weights of {reference}: {exc}") from exc


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
        with library_warnings_silenced():
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


def load_model(
    path: str, options: MergeOptions, *, lm_head_falls_back_to_embed: bool
) -> LoadedModel:
    """Read what a transplant needs from one model.

    With ``lm_head_falls_back_to_embed`` a model with tied embeddings reports its embedding
    matrix as its LM head (the donor side); otherwise its ``lm_head`` is None (the base side,
    whose output stays tied).
    """
    reference = model_reference(path)
    config = read_config(reference, options)
    checkpoint = read_checkpoint(reference)
    located = vocabulary_tensors(
        config,
        set(checkpoint.names),
        checkpoint.shapes(),
        trust_remote_code=options.trust_remote_code,
        path=path,
    )
    device = options.device or "cpu"
    embed = _read_matrix(reference, located.embed, device, ())
    if embed is None:
        raise TransplantError(f"{path} has no input embedding tensor ({located.embed.name})")
    check_width(config, embed, located.embed.name, path)
    lm_head = None
    if located.lm_head is not None and not located.tied:
        lm_head = _read_matrix(reference, located.lm_head, device, ())
        if lm_head is None:
            raise TransplantError(f"{path} has untied embeddings but no {located.lm_head.name}")
        check_width(config, lm_head, located.lm_head.name, path)
    elif lm_head_falls_back_to_embed:
        lm_head = embed
    # The matrices are views of the checkpoint's memory map, which the loader's open shard
    # keeps resident as well: closed here, the pages go when the matrices are released.
    LoaderCache().get(reference).flush()
    with garbage_collection_paused():
        tokenizer = load_tokenizer(path, options.trust_remote_code)
        vocabulary = vocabulary_of(tokenizer)
    return LoadedModel(
        reference=reference,
        config=config,
        checkpoint=checkpoint,
        located=located,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        embed=embed,
        lm_head=lm_head,
    )


def load_pair(
    base_model: str, donor: str, merge_options: MergeOptions
) -> tuple[LoadedModel, LoadedModel]:
    """Both models as a transplant reads them: the base's LM head stays None when tied,
    the donor's falls back to its embeddings."""
    LoaderCache().setup(merge_options)
    base = load_model(base_model, merge_options, lm_head_falls_back_to_embed=False)
    donor_model = load_model(donor, merge_options, lm_head_falls_back_to_embed=True)
    return base, donor_model
