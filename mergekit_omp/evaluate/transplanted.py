"""A transplanted model in memory: the base model with another method's vocabulary matrices.

The base is loaded once with ``transformers``; for each method its embedding (and, when the
base's LM head is untied, its LM head) is resized to the donor's vocabulary and overwritten
with the rows ``transplant.build_matrices`` made from a ``TransplantPlan``, exactly the
tensors ``mergekit-omp`` would write. Nothing touches the disk.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from mergekit_omp.assemble import remap_vocabulary_rows
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import LoadedModel
from mergekit_omp.transplant import MatrixResult


class InMemoryTransplant:
    """The base model, ready to take the vocabulary matrices of one method after another."""

    def __init__(
        self, base: LoadedModel, *, device: str = "cpu", trust_remote_code: bool = False
    ) -> None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                base.path, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        except Exception as exc:
            raise TransplantError(f"cannot load {base.path} as a causal LM: {exc}") from exc
        # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), whose
        # typeshed stub takes the instance for an argument.
        self.model: PreTrainedModel = model.to(device).eval()  # type: ignore[arg-type]
        output = self.model.get_output_embeddings()
        bias = getattr(output, "bias", None) if output is not None else None
        self.base_bias = None if bias is None else bias.detach().clone()

    @torch.no_grad()
    def apply(self, matrices: dict[str, MatrixResult]) -> PreTrainedModel:
        """The model with ``matrices`` (from ``build_matrices``) as its vocabulary matrices."""
        embed = matrices["embed"]
        rows = embed.matrix.shape[0]
        self.model.resize_token_embeddings(rows, mean_resizing=False)
        inputs = cast(torch.nn.Embedding, self.model.get_input_embeddings())
        inputs.weight.copy_(embed.matrix.to(inputs.weight))
        output = self.model.get_output_embeddings()
        if output is not None:
            head = matrices["lm_head"].matrix if "lm_head" in matrices else embed.matrix
            if output.weight is not inputs.weight:
                output.weight.copy_(head.to(output.weight))
            if self.base_bias is not None:
                head_match = matrices["lm_head"].match if "lm_head" in matrices else embed.match
                output.bias.copy_(remap_vocabulary_rows(self.base_bias, head_match, rows))
        return self.model
