"""Assemble stage: the new vocabulary matrices in the donor's id order."""

from __future__ import annotations

import torch

from mergekit_omp.match import VocabularyMatch


def output_vocab_size(donor_rows: int, donor_max_id: int, pad_to_multiple_of: int | None) -> int:
    """The donor's row count (or tokenizer size, if larger), rounded up if asked."""
    size = max(donor_rows, donor_max_id + 1)
    if pad_to_multiple_of:
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    return size


def assemble_matrix(
    base_matrix: torch.Tensor,
    match: VocabularyMatch,
    new_rows: torch.Tensor,
    out_rows: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Matched tokens copy their base row, new tokens take ``new_rows``, the rest are zero."""
    result = torch.zeros(out_rows, base_matrix.shape[1], dtype=dtype, device=base_matrix.device)
    if match.matched:
        donor_ids = torch.tensor(list(match.matched), device=base_matrix.device)
        base_ids = torch.tensor([b for b, _ in match.matched.values()], device=base_matrix.device)
        result[donor_ids] = base_matrix[base_ids].to(dtype)
    if match.new_tokens:
        new_ids = torch.tensor(match.new_tokens, device=base_matrix.device)
        result[new_ids] = new_rows.to(dtype)
    return result


def remap_vocabulary_rows(
    tensor: torch.Tensor, match: VocabularyMatch, out_rows: int
) -> torch.Tensor:
    """Auxiliary per-token tensors (an LM-head bias): matched rows copied, others zero."""
    result = tensor.new_zeros((out_rows, *tensor.shape[1:]))
    for donor_id, (base_id, _) in match.matched.items():
        if base_id < tensor.shape[0]:
            result[donor_id] = tensor[base_id]
    return result
