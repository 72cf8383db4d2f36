"""Run a mergekit merge, with OMP rows for tokens a model lacks, into OUT atomically."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import mergekit.tokenizer.build
import tqdm
import transformers
from mergekit.io.tasks import LoaderCache
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_omp.errors import TransplantError
from mergekit_omp.load import check_local_model, library_warnings_silenced, read_checkpoint
from mergekit_omp.merge.card import merge_card
from mergekit_omp.merge.config import OmpMergeConfig
from mergekit_omp.merge.omp_vocabulary_task import OmpFill, omp_token_rows
from mergekit_omp.publish import staged_output


def check_vocabularies_fit(config: OmpMergeConfig, merge_options: MergeOptions) -> None:
    """Each model's tokenizer must fit its embedding rows when vocabularies are merged:
    mergekit indexes rows by token id and otherwise fails deep inside (a KeyError)."""
    merge = config.merge
    if merge.tokenizer is None and merge.tokenizer_source is None:
        return
    trust = merge_options.trust_remote_code
    for reference in merge.referenced_models():
        model_config = reference.config(trust_remote_code=trust)
        if hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        rows = getattr(model_config, "vocab_size", None)
        path = reference.model
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path.path, revision=path.revision, trust_remote_code=trust
        )
        if isinstance(rows, int) and len(tokenizer) > rows:
            raise TransplantError(
                f"model {path.path}: its tokenizer has {len(tokenizer)} entries but its "
                f"embedding has {rows} rows (vocab_size); mergekit cannot merge its vocabulary "
                "(resize its embeddings to the tokenizer first)"
            )


def check_weights_readable(config: OmpMergeConfig, merge_options: MergeOptions) -> None:
    """Each local model's checkpoint index is read now, as a transplant reads it, so weights
    that cannot be read (a pickle torch's safe loader refuses) are one line naming the model
    before any work, not mergekit's error and torch's warning midway. mergekit's loader cache
    keeps the indexes, so the merge does not read them again."""
    LoaderCache().setup(merge_options)
    for reference in config.merge.referenced_models():
        if reference.lora is None and os.path.isdir(reference.model.path):
            read_checkpoint(reference)


class _QuietBuild:
    """``mergekit.tokenizer.build``'s view of the ``tqdm`` module with its bars off: mergekit
    shows "Building tokenizer permutations" even with ``--quiet``."""

    @staticmethod
    def tqdm(*args: object, **kwargs: object) -> tqdm.tqdm:
        return tqdm.tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def tokenizer_bar_hidden(quiet: bool) -> Iterator[None]:
    original = mergekit.tokenizer.build.tqdm
    if quiet:
        mergekit.tokenizer.build.tqdm = _QuietBuild
    try:
        yield
    finally:
        mergekit.tokenizer.build.tqdm = original


DEPRECATED_DTYPE_NOTE = "`torch_dtype` is deprecated"
"""What transformers logs when mergekit's ``run_merge`` sets ``config.torch_dtype``."""


class _WithoutDeprecatedDtype(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return DEPRECATED_DTYPE_NOTE not in record.getMessage()


@contextlib.contextmanager
def deprecated_dtype_note_silenced() -> Iterator[None]:
    """mergekit's own use of ``torch_dtype``: nothing the user can act on."""
    logger = logging.getLogger("transformers.configuration_utils")
    note = _WithoutDeprecatedDtype()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def run_omp_merge(
    config: OmpMergeConfig,
    out_path: str | os.PathLike,
    merge_options: MergeOptions | None = None,
    *,
    overwrite: bool = False,
) -> list[OmpFill]:
    """mergekit's ``run_merge`` of ``config.merge``, with ``OmpPermutedVocabulary`` as its
    vocabulary step; returns the OMP rows made.

    The output is written to a temporary directory renamed to ``out_path`` at the end; the
    model card (mergekit's, plus the OMP rows) and ``mergekit_config.yml`` are written by us,
    because mergekit would name the card after the temporary directory.
    """
    merge_options = merge_options or MergeOptions()
    inner_options = merge_options.model_copy(update={"write_model_card": False})
    name = Path(os.path.abspath(out_path)).name
    for path in config.models.values():
        if os.path.isdir(path):
            check_local_model(path)
    check_vocabularies_fit(config, merge_options)
    check_weights_readable(config, merge_options)
    with (
        staged_output(out_path, overwrite, inputs=config.models.values()) as staging,
        omp_token_rows(config.settings, config.token_sources, merge_options) as fills,
        deprecated_dtype_note_silenced(),
        library_warnings_silenced(),
        tokenizer_bar_hidden(merge_options.quiet),
    ):
        run_merge(config.merge, str(staging), options=inner_options, config_source=config.text)
        if merge_options.write_model_card:
            (staging / "README.md").write_text(merge_card(config, fills, name), encoding="utf-8")
            (staging / "mergekit_config.yml").write_text(config.text, encoding="utf-8")
    return fills
