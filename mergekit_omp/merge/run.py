"""Run a mergekit merge, with OMP rows for tokens a model lacks, into OUT atomically."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_omp.merge.card import merge_card
from mergekit_omp.merge.config import OmpMergeConfig
from mergekit_omp.merge.omp_vocabulary_task import OmpFill, omp_token_rows
from mergekit_omp.write import staged_output


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
    with (
        staged_output(out_path, overwrite) as staging,
        omp_token_rows(config.settings, config.token_sources) as fills,
    ):
        run_merge(config.merge, str(staging), options=inner_options, config_source=config.text)
        if merge_options.write_model_card:
            (staging / "README.md").write_text(merge_card(config, fills, name), encoding="utf-8")
            (staging / "mergekit_config.yml").write_text(config.text, encoding="utf-8")
    return fills
