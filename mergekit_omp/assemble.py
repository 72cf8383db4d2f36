"""Assemble stage: the new vocabulary matrices in the donor's id order."""

from __future__ import annotations

import torch

from mergekit_omp.errors import TransplantError
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
    """Matched tokens copy their base row, new tokens take ``new_rows``, the rest are zero.

    Matched rows are gathered straight into the result (converted afterwards if ``dtype``
    differs), which is then neither zeroed first nor given a gathered copy to scatter (0.4 s
    and 0.3 s of fresh memory for 49,152 rows of width 3,840)."""
    device = base_matrix.device
    matched = torch.tensor(list(match.matched), dtype=torch.long, device=device)
    sources = torch.tensor([b for b, _ in match.matched.values()], dtype=torch.long, device=device)
    new_ids = torch.tensor(match.new_tokens, dtype=torch.long, device=device)
    source_of_row = torch.zeros(out_rows, dtype=torch.long, device=device)
    source_of_row[matched] = sources
    result = torch.index_select(base_matrix, 0, source_of_row).to(dtype)
    unmatched = torch.ones(out_rows, dtype=torch.bool, device=device)
    unmatched[matched] = False
    unmatched[new_ids] = False
    result[unmatched] = 0
    result[new_ids] = new_rows.to(dtype)
    return result


def require_finite(matrix: torch.Tensor, name: str, rows: list[int] | None = None) -> None:
    """Refuse a new vocabulary matrix with NaN or Inf, as it would be written (in its output
    dtype: float16 overflows beyond 65,504); with ``rows``, only those rows are checked.

    The sum is finite only if every entry is, so the elementwise check runs only when it is
    not. float16 is summed in float32 (its own sum overflows); bfloat16 and float32 have
    float32's range and are summed as they are (30 times faster than converting 262,144 x
    3,840 bfloat16 entries)."""
    checked = (
        matrix
        if rows is None
        else matrix[torch.tensor(rows, dtype=torch.long, device=matrix.device)]
    )
    total = checked.sum(dtype=torch.float32) if checked.dtype == torch.float16 else checked.sum()
    if torch.isfinite(total):
        return
    bad = (~torch.isfinite(checked)).any(dim=1).nonzero().flatten().tolist()
    if not bad:
        return
    if rows is not None:
        bad = [rows[i] for i in bad]
    shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    raise TransplantError(
        f"the new {name} matrix has {len(bad)} rows that are not finite in "
        f"{str(matrix.dtype).removeprefix('torch.')} (token ids {shown}): their values exceed "
        "what the dtype holds (a smaller --new-vocab-scale, or --dtype float32)"
    )


def remap_vocabulary_rows(
    tensor: torch.Tensor, match: VocabularyMatch, out_rows: int
) -> torch.Tensor:
    """Auxiliary per-token tensors (an LM-head bias): matched rows copied, others zero."""
    result = tensor.new_zeros((out_rows, *tensor.shape[1:]))
    for donor_id, (base_id, _) in match.matched.items():
        if base_id < tensor.shape[0]:
            result[donor_id] = tensor[base_id]
    return result
