"""What the tests share: the tiny builders of ``examples/tiny_models.py``, a pair with a known
linear answer, and the tensors of a written model.

The builders live with the examples so that the examples run without the test suite;
``examples`` and ``tests`` are on the import path through pytest's ``pythonpath`` setting.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import (
    BYTE_LEVEL_SPECIALS,
    CORPUS,
    METASPACE_SPECIALS,
    byte_level_tokenizer,
    corpus,
    metaspace_tokenizer,
    save,
    tiny_llama,
    tiny_llama_model,
)

from mergekit_omp.approximators import ApproximationProblem
from mergekit_omp.vocabulary import Encoding, Vocabulary

__all__ = [
    "BYTE_LEVEL_SPECIALS",
    "CORPUS",
    "METASPACE_SPECIALS",
    "byte_level_tokenizer",
    "corpus",
    "linear_pair",
    "load_tensors",
    "metaspace_tokenizer",
    "save",
    "tiny_llama",
    "tiny_llama_model",
]


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors shards in ``directory``, by name."""
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def linear_pair(
    root: Path,
    donor_tok,
    base_tok,
    donor_dim: int = 12,
    base_dim: int = 20,
    seed: int = 0,
) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """A pair whose base rows are exactly ``donor_row @ A`` for every token both would have.

    Returns (base dir, donor dir, donor embedding, A). Each base token's row is the donor row
    of the same bytes mapped through A; base tokens the donor lacks get random rows.
    """
    from mergekit_omp.vocabulary import vocabulary_of

    generator = torch.Generator().manual_seed(seed)
    donor_embed = torch.randn(len(donor_tok), donor_dim, generator=generator)
    mapping = torch.randn(donor_dim, base_dim, generator=generator) / donor_dim**0.5
    donor_vocab, base_vocab = vocabulary_of(donor_tok), vocabulary_of(base_tok)
    donor_id_of = {form: i for i, form in donor_vocab.forms.items()}
    base_embed = torch.randn(len(base_tok), base_dim, generator=generator)
    for base_id, form in base_vocab.forms.items():
        if form in donor_id_of:
            base_embed[base_id] = donor_embed[donor_id_of[form]] @ mapping
    base = tiny_llama(
        base_tok, root / "base", hidden_size=base_dim, embed=base_embed, lm_head=base_embed * 2
    )
    donor = tiny_llama(
        donor_tok, root / "donor", hidden_size=donor_dim, embed=donor_embed, lm_head=donor_embed * 2
    )
    return base, donor, donor_embed, mapping


EMPTY_VOCAB = Vocabulary(forms={}, strings={}, special_ids={}, encoding=Encoding.PLAIN)


def problem_of(
    targets: torch.Tensor,
    donor_anchors: torch.Tensor,
    base_anchors: torch.Tensor,
    **fields,
) -> ApproximationProblem:
    """A problem over given rows; the base matrix is the base anchors unless given."""
    fields.setdefault("base_matrix", base_anchors)
    return ApproximationProblem(
        targets=targets,
        donor_anchors=donor_anchors,
        base_anchors=base_anchors,
        target_ids=list(range(targets.shape[0])),
        donor_anchor_ids=list(range(donor_anchors.shape[0])),
        base_anchor_ids=list(range(base_anchors.shape[0])),
        donor_vocab=fields.pop("donor_vocab", EMPTY_VOCAB),
        base_vocab=fields.pop("base_vocab", EMPTY_VOCAB),
        **fields,
    )


def linear_world(anchors: int = 60, targets: int = 9, seed: int = 0):
    """Donor rows X, a known map A and offset b, base rows Y = X A + b (float64)."""
    generator = torch.Generator().manual_seed(seed)
    donor = torch.randn(anchors + targets, 8, generator=generator, dtype=torch.float64)
    mapping = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    offset = torch.randn(5, generator=generator, dtype=torch.float64)
    return donor[:anchors], donor[anchors:], mapping, offset
