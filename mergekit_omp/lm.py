"""What running a causal LM on a text needs, for bits per byte (``evaluate/bpb.py``) and for
selection's text scorer (``select/text.py``): the window a model takes, whether a tokenizer
inserts BOS by itself."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergekit_omp.errors import TransplantError

DEFAULT_WINDOW = 1024


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def context_limit(model: PreTrainedModel) -> int | None:
    """The longest input the model takes, from its config, if it states one."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return getattr(config, "max_position_embeddings", None)


def effective_window(model: PreTrainedModel, window: int | None) -> int:
    """``window`` tokens (default 1024), one less than the model's context for the prefix."""
    limit = context_limit(model)
    size = window or DEFAULT_WINDOW
    if limit is not None:
        size = min(size, limit - 1)
    if size < 1:
        raise TransplantError(f"window must be at least 1 token, got {size}")
    return size
