"""Which tensors of a checkpoint are indexed by the vocabulary.

A transplant rewrites only these: the input embedding matrix, the LM head unless it is tied,
and per-token extras such as an LM-head bias. They are found from mergekit's architecture
info where mergekit knows the model, otherwise from transformers itself: the model class is
built on the meta device (no memory, no weights) and asked for its input and output
embeddings, whose parameter names are then mapped to the checkpoint's names (a multimodal
checkpoint may say ``language_model.model.embed_tokens.weight`` where the class says
``model.language_model.embed_tokens.weight``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from mergekit.architecture import ConfiguredModelArchitecture, WeightInfo, arch_info_for_config
from transformers import PretrainedConfig, PreTrainedModel

from mergekit_omp.errors import TransplantError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabularyTensors:
    """The vocabulary-indexed tensors of one checkpoint, under the checkpoint's names."""

    embed: WeightInfo
    lm_head: WeightInfo | None
    """The output matrix if the checkpoint stores one (a tied model may store a copy)."""
    extras: tuple[WeightInfo, ...]
    """Other per-token tensors (an LM-head bias), remapped row by row."""
    tied: bool
    source: str
    """``mergekit`` or ``transformers``: who said where they are."""
    vocab_size_key: str = "vocab_size"
    """The config key of the vocabulary size (in the text config of a multimodal model)."""

    @property
    def names(self) -> set[str]:
        infos = (self.embed, self.lm_head, *self.extras)
        return {info.name for info in infos if info is not None}


def _vocab_weights(weights: list[WeightInfo]) -> list[WeightInfo]:
    return [w for w in weights if w.vocabulary_axis is not None]


def _resolve(info: WeightInfo, names: set[str]) -> WeightInfo | None:
    """``info`` under the name the checkpoint uses (its own or an alias), or None."""
    for name in (info.name, *(info.aliases or ()), *(info.tied_names or ())):
        if name in names:
            return WeightInfo(name=name, vocabulary_axis=info.vocabulary_axis)
    return None


def ties_embeddings(config: PretrainedConfig) -> bool:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(
        getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    )


def from_mergekit(config: PretrainedConfig, names: set[str]) -> VocabularyTensors | None:
    """From mergekit's template of a single-module architecture, if it names tensors the
    checkpoint has."""
    if not config.architectures or len(config.architectures) != 1:
        return None
    try:
        info = arch_info_for_config(config)
    except Exception:  # mergekit raises on ambiguous templates
        return None
    if info is None or len(info.modules) != 1:
        return None
    arch = ConfiguredModelArchitecture(info=info, config=config)
    module = arch.get_module(next(iter(info.modules)))
    pre = _vocab_weights(list(module.pre_weights()))
    post = _vocab_weights(list(module.post_weights()))
    matrices = [w for w in pre if w.name.endswith(".weight")]
    if not matrices or (embed := _resolve(matrices[0], names)) is None:
        return None
    post_matrices = [w for w in post if w.name.endswith(".weight")]
    lm_head = None
    if post_matrices:
        lm_head = _resolve(post_matrices[0], names)
        if lm_head is not None and lm_head.name == embed.name:
            lm_head = None
    tied = ties_embeddings(config)
    if not tied and post_matrices and lm_head is None:
        return None  # the template's LM head is not in this checkpoint: ask transformers
    extras = [_resolve(w, names) for w in pre + post if w not in matrices[:1] + post_matrices[:1]]
    return VocabularyTensors(
        embed=embed,
        lm_head=lm_head,
        extras=tuple(e for e in extras if e is not None and e.name not in {embed.name}),
        tied=tied,
        source="mergekit",
        vocab_size_key=info.vocab_size_config_key or "vocab_size",
    )


def _model_classes(config: PretrainedConfig) -> list[Any]:
    classes: list[Any] = [getattr(transformers, name, None) for name in config.architectures or ()]
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        with contextlib.suppress(KeyError, ValueError, AttributeError):
            classes.append(auto._model_mapping[type(config)])
    return [c for c in classes if c is not None]


def meta_model(config: PretrainedConfig, trust_remote_code: bool) -> PreTrainedModel | None:
    """The model class of ``config`` built on the meta device, or None if none is known."""
    for model_class in _model_classes(config):
        try:
            with torch.device("meta"):
                return model_class._from_config(config)
        except Exception as exc:
            LOG.debug("cannot build %s on the meta device: %s", model_class.__name__, exc)
    if trust_remote_code:
        with contextlib.suppress(Exception), torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return None


def _parameter_name(model: torch.nn.Module, parameter: torch.Tensor, avoid: str = "") -> str:
    found = [n for n, p in model.named_parameters(remove_duplicate=False) if p is parameter]
    preferred = [n for n in found if avoid not in n] if avoid else found
    return (preferred or found)[0]


def checkpoint_name(
    parameter_name: str,
    shape: tuple[int, ...],
    names: set[str],
    shapes: dict[str, tuple[int, ...]],
) -> str | None:
    """The checkpoint's name for a parameter: the same name, else the one name sharing the
    longest dotted suffix (at least module and parameter) and, where known, the shape."""
    if parameter_name in names:
        return parameter_name
    parts = parameter_name.split(".")
    for length in range(len(parts), 1, -1):
        suffix = "." + ".".join(parts[-length:])
        found = [
            n for n in names if ("." + n).endswith(suffix) and shapes.get(n, shape) == tuple(shape)
        ]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            return None
    return None


def from_transformers(
    config: PretrainedConfig,
    names: set[str],
    shapes: dict[str, tuple[int, ...]],
    trust_remote_code: bool,
    path: str,
) -> VocabularyTensors | None:
    """From the model class transformers builds for ``config`` (None if it cannot)."""
    model = meta_model(config, trust_remote_code)
    if model is None:
        return None
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    input_weight = getattr(input_embeddings, "weight", None)
    if not isinstance(input_weight, torch.Tensor):
        return None

    def locate(parameter: torch.Tensor, avoid: str = "", missing: str = "") -> WeightInfo | None:
        own_name = _parameter_name(model, parameter, avoid)
        name = checkpoint_name(own_name, tuple(parameter.shape), names, shapes)
        if name is None and missing:
            raise TransplantError(f"{path} has {missing} ({own_name} or a name ending like it)")
        return None if name is None else WeightInfo(name=name, vocabulary_axis=0)

    embed = locate(input_weight, avoid="lm_head", missing="no input embedding tensor")
    assert embed is not None  # locate raised otherwise
    output_weight = getattr(output_embeddings, "weight", None)
    tied = output_weight is not None and output_weight is input_weight
    lm_head = None
    if output_weight is not None:
        if tied:
            own_name = _parameter_name(model, output_weight, avoid="embed")
            lm_head = (
                WeightInfo(name=own_name, vocabulary_axis=0)
                if own_name in names and own_name != embed.name
                else None
            )
        else:
            lm_head = locate(output_weight, missing="untied embeddings but no LM head tensor")
    extras = []
    bias = getattr(output_embeddings, "bias", None)
    if isinstance(bias, torch.Tensor) and (info := locate(bias)) is not None:
        extras.append(info)
    return VocabularyTensors(
        embed=embed, lm_head=lm_head, extras=tuple(extras), tied=tied, source="transformers"
    )


def vocabulary_tensors(
    config: PretrainedConfig,
    names: set[str],
    shapes: dict[str, tuple[int, ...]],
    *,
    trust_remote_code: bool,
    path: str,
) -> VocabularyTensors:
    """The vocabulary tensors of a checkpoint: mergekit's template, else transformers'."""
    found = from_mergekit(config, names) or from_transformers(
        config, names, shapes, trust_remote_code, path
    )
    if found is None:
        architecture = ", ".join(config.architectures or ()) or config.model_type
        raise TransplantError(
            f"cannot tell which tensors of {path} are its embeddings: {architecture} is "
            "unknown to mergekit and transformers cannot build it"
            + ("" if trust_remote_code else " (custom code models need --trust-remote-code)")
        )
    LOG.info("%s: vocabulary tensors %s (from %s)", path, sorted(found.names), found.source)
    return found
