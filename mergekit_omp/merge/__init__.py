"""mergekit merges with OMP rows for the tokens a model lacks (``mergekit-omp-merge``).

from mergekit_omp.merge import load_merge_config, run_omp_merge
fills = run_omp_merge(load_merge_config("merge.yml"), "out")
"""

from mergekit_omp.merge.config import (
    OmpMergeConfig,
    OmpMergeSettings,
    OmpTokenSource,
    load_merge_config,
    parse_merge_config,
)
from mergekit_omp.merge.omp_vocabulary_task import OmpFill, OmpPermutedVocabulary, omp_token_rows
from mergekit_omp.merge.run import run_omp_merge

__all__ = [
    "OmpFill",
    "OmpMergeConfig",
    "OmpMergeSettings",
    "OmpPermutedVocabulary",
    "OmpTokenSource",
    "load_merge_config",
    "omp_token_rows",
    "parse_merge_config",
    "run_omp_merge",
]
