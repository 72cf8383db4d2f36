"""Beginning-of-sequence handling: the transplanted model should receive what its base expects.

A base trained with a BOS token first (Gemma) degenerates without one, and a donor tokenizer
that adds none (SmolLM2) would never give it one. With ``bos: match_base`` (the default) the
output tokenizer inserts the donor's BOS token exactly when the base tokenizer inserts its
own; the donor's BOS token carries the base's BOS row (matched by role or by content).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

PROBE_TEXT = "Hello"


class BosPolicy(str, enum.Enum):
    MATCH_BASE = "match_base"
    KEEP_DONOR = "keep_donor"


@dataclass(frozen=True)
class BosPlan:
    base_adds_bos: bool
    donor_adds_bos: bool
    output_adds_bos: bool
    warning: str | None = None

    @property
    def changes_tokenizer(self) -> bool:
        return self.output_adds_bos != self.donor_adds_bos


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding plain text puts the BOS token first."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    ids = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos_id


def plan_bos(
    base: PreTrainedTokenizerBase, donor: PreTrainedTokenizerBase, policy: BosPolicy
) -> BosPlan:
    base_adds, donor_adds = adds_bos(base), adds_bos(donor)
    if base_adds == donor_adds:
        return BosPlan(base_adds, donor_adds, donor_adds)
    if policy == BosPolicy.KEEP_DONOR:
        if base_adds:
            problem = "the base was trained with a BOS token first; the donor's tokenizer adds none"
            fix = "--bos match_base inserts it"
        else:
            problem = "the donor's tokenizer inserts a BOS token the base was not trained with"
            fix = "--bos match_base leaves it out"
        return BosPlan(
            base_adds,
            donor_adds,
            donor_adds,
            warning=f"{problem}: {fix} (then llama.cpp refuses it as a draft for the donor's models)",
        )
    if base_adds and donor.bos_token_id is None:
        return BosPlan(
            base_adds,
            donor_adds,
            donor_adds,
            warning=(
                "the base model expects a BOS token first but the donor tokenizer has no BOS "
                "token: prepend one yourself (for example the donor's EOS token)"
            ),
        )
    return BosPlan(base_adds, donor_adds, base_adds)


def output_tokenizer(
    donor: PreTrainedTokenizerBase, plan: BosPlan
) -> tuple[PreTrainedTokenizerBase, str | None]:
    """The donor tokenizer inserting BOS as ``plan`` says, or the donor's and a warning."""
    if not plan.changes_tokenizer:
        return donor, None
    tokenizer = copy.deepcopy(donor)
    tokenizer.add_bos_token = plan.output_adds_bos
    if adds_bos(tokenizer) != plan.output_adds_bos:
        return donor, "could not change the donor tokenizer's BOS insertion; do it when encoding"
    return tokenizer, None
