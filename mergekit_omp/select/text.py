"""Validation text bits per byte: how ``auto`` scores a candidate method by running the
model.

The base model is loaded with ``transformers`` once; its vocabulary matrices are made
donor-sized, as the transplant writes them (each anchor's base row at its donor id). A
candidate's rows for the new tokens go into the matrix being validated (the embedding,
tied LM head included, or an untied LM head), and the model's bits per byte
(``evaluate/bpb.py``) is measured with the donor's tokenizer on a validation text that every
Python installation has, so it needs nothing downloaded:

* ``prose``: the running text of the language reference in English (``pydoc_data.topics``,
  the topics in sorted order): its paragraphs, without the indented blocks (code examples,
  grammar, tables) and section titles between them (``running_text``);
* ``reference``: the same reference as it is, code examples and grammar included, the
  topics in reverse order (prose with code in it, as in a tutorial);
* ``code``: the standard library's ``calendar.py``;
* ``quotes``: the Zen of Python (``this``), then the reference's paragraphs with a
  possessive or contraction (``’s``, ``’t``), dedented, ``’`` written ``'``: short sayings
  and apostrophes, tokens dialogue and quotations are full of;
* ``table``: ``calendar.TextCalendar().formatyear`` of the years from 2001 on (numbers laid
  out in columns: whitespace runs and digits).

``VALIDATION_BYTES`` bytes of each kind (``part`` p takes the p-th such slice; part 0 is
what ``auto`` uses), cut on a character boundary; a kind this Python lacks is left out.
Each kind is scored on its own (``TextScorer.kind_bits_per_byte``), so a choice can weigh
kinds (``auto``'s minimax regret) rather than pool them. Lower is better. The held-back
texts of ``benchmarks/quality.py`` are other texts (docs/evaluate.md).

Where the base's tokenizer inserts BOS, the base's own BOS row is put in front of every
window (``bos_embedding``), whatever the donor's tokenizer does: the model is scored as it
was trained to run (``--bos match_base``), so that a missing BOS does not drown the
difference between candidates. Elsewhere nothing is put in front.

In an untied model the other matrix keeps the base rows of the anchors and zero rows for
the new tokens while one matrix is validated.
"""

from __future__ import annotations

import math
import re
import sysconfig
import textwrap
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from mergekit_omp.approximators.base import ApproximationProblem
from mergekit_omp.errors import TransplantError
from mergekit_omp.lm import effective_window, tokenizer_adds_bos
from mergekit_omp.select.base import SelectionContext

VALIDATION_BYTES = 1500
"""Bytes of each kind of validation text."""
KINDS = ("prose", "reference", "code", "quotes", "table")
"""The kinds of validation text, in order."""
CODE_MODULE = "calendar.py"
QUOTING = re.compile(r"\w['\u2019](?:s|t|re|ll|ve|d|m)\b")
TABLE_YEARS = range(2001, 2101)
TITLE_UNDERLINE = re.compile(r"[*=\-^]+")
MAX_RUN_PARAMETERS = 1_000_000_000
"""The largest base (parameters, from its safetensors headers) that is run by default: its
float32 copy takes 4 GB, and five passes over the validation text a minute or two on a
CPU. Larger bases fall back to leave-out: the default of ``auto``'s ``max_run_parameters``."""
MEMORY_FRACTION = 0.5
"""The float32 copy of the base may take at most this share of the available memory."""
LOGITS_BYTES = 512 * 1024**2
"""Most float32 logits one forward pass of the scorer would make (windows are batched up to
it)."""
HEAD_SLICE_BYTES = 64 * 1024**2
"""Most float32 logits the scorer's LM head makes at a time (``TextScorer.sliced_nll``)."""


class ValidationUnavailable(TransplantError):
    """The model cannot be run on the validation text (no text, no model, no tokenizer)."""


def kind_sources() -> dict[str, str]:
    """The whole text of each kind this Python has (module docstring), in ``KINDS`` order."""
    sources = {}
    try:
        from pydoc_data.topics import topics

        names = sorted(topics)
        reference = "\n\n".join(topics[name] for name in names)
        sources["prose"] = running_text(reference)
        sources["reference"] = "\n\n".join(topics[name] for name in reversed(names))
    except ImportError:
        reference = ""
    try:
        path = Path(sysconfig.get_paths()["stdlib"]) / CODE_MODULE
        sources["code"] = path.read_bytes().decode("utf-8", errors="ignore")
    except OSError:
        pass
    sources["quotes"] = zen_of_python() + "\n\n".join(
        textwrap.dedent(p).replace("\u2019", "'")
        for p in re.split(r"\n[ \t]*\n", reference)
        if QUOTING.search(p)
    )
    import calendar

    sources["table"] = "\n".join(calendar.TextCalendar().formatyear(y) for y in TABLE_YEARS)
    return {kind: sources[kind] for kind in KINDS if sources.get(kind)}


def zen_of_python() -> str:
    """``import this``'s text, decoded as that module does, without printing it."""
    import codecs
    import importlib.util

    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:
        return ""
    source = Path(spec.origin).read_text(encoding="utf-8")
    match = re.search(r's = """(.*?)"""', source, re.S)
    return codecs.decode(match.group(1), "rot13") + "\n\n" if match else ""


def validation_texts(size: int = VALIDATION_BYTES, part: int = 0) -> dict[str, str]:
    """``{kind: text}``: bytes ``part * size`` to ``(part + 1) * size`` of each kind's text
    (module docstring), the kinds this Python has that are that long."""
    texts = {}
    for kind, source in kind_sources().items():
        data = source.encode("utf-8")[part * size : (part + 1) * size]
        text = data.decode("utf-8", errors="ignore")
        if text:
            texts[kind] = text
    if not texts:
        raise ValidationUnavailable(f"no validation text in this Python (part {part})")
    return texts


def running_text(restructured: str) -> str:
    """The paragraphs (blocks between blank lines) of a reStructuredText document that are
    running text: no line of them indented, and not a section title (a last line made of
    ``*``, ``=``, ``-`` or ``^`` only)."""
    paragraphs = (p for p in re.split(r"\n[ \t]*\n", restructured) if p.strip())
    return "\n\n".join(
        p
        for p in paragraphs
        if not any(line[:1].isspace() for line in p.splitlines())
        and not TITLE_UNDERLINE.fullmatch(p.splitlines()[-1])
    )


def matched_ids(
    problem: ApproximationProblem, context: SelectionContext
) -> tuple[list[int], list[int]]:
    """Donor and base ids of the rows the transplant copies from the base: the context's
    matched tokens, else the problem's anchors."""
    return context.matched_ids or (problem.donor_anchor_ids, problem.base_anchor_ids)


def donor_sized(
    weight: torch.Tensor,
    problem: ApproximationProblem,
    matched: tuple[list[int], list[int]],
    size: int,
    *,
    validated: bool,
) -> torch.Tensor:
    """A ``size``-row matrix laid out as the transplant assembles it: each ``matched`` donor
    id with its base token's row (of ``problem.base_matrix`` for the validated matrix, of
    ``weight`` for the other), zero elsewhere (the new tokens' rows come later)."""
    donor_ids, base_ids = matched
    source = problem.base_matrix if validated else weight
    matrix = weight.new_zeros(size, weight.shape[1])
    matrix[torch.tensor(donor_ids, dtype=torch.long)] = source[torch.tensor(base_ids)].to(weight)
    return matrix


class TextScorer:
    """The base model, ready to score one candidate's new-token rows after another."""

    def __init__(
        self,
        problem: ApproximationProblem,
        context: SelectionContext,
        texts: dict[str, str] | None = None,
        *,
        max_parameters: int = MAX_RUN_PARAMETERS,
        load: bool = True,
    ) -> None:
        """The checks that need no model (a path and a donor tokenizer, the base's size)
        refuse here; the model is loaded now, or with ``load=False`` at the first scoring
        (``auto``: not beside the first candidate's OMP, whose working memory is freed by
        then). A model that cannot be loaded or given the donor's vocabulary then raises
        ``ValidationUnavailable``."""
        if context.base_path is None or problem.donor_tokenizer is None:
            raise ValidationUnavailable("the problem has no base model path or donor tokenizer")
        check_size(context.base_path, max_parameters)
        self.tokenizer = problem.donor_tokenizer
        self.targets = torch.tensor(problem.target_ids)
        self.texts = texts if texts is not None else validation_texts()
        self.sliced_head: bool | None = None
        """Whether the LM head's logits are the model's (found on the first pass)."""
        self._unloaded: tuple[ApproximationProblem, SelectionContext] | None = (problem, context)
        self.released = False
        if load:
            self.load()

    def load(self) -> None:
        """Load the base model and give it the donor's vocabulary (once)."""
        if self._unloaded is None:
            if self.released:
                raise RuntimeError("the scorer's model was released")
            return
        problem, context = self._unloaded
        assert context.base_path is not None
        matched = matched_ids(problem, context)
        size = max(len(self.tokenizer), 1 + max(problem.target_ids + matched[0]))
        self.model = load_base(context.base_path)
        self.bos_row = base_bos_row(self.model, problem)
        try:
            self.matrix = self.prepare(problem, matched, size)
        except Exception as exc:  # an architecture transformers cannot resize or rewrite
            raise ValidationUnavailable(
                f"cannot give the model the donor's vocabulary: {exc}"
            ) from None
        self._unloaded = None
        self.use_texts(self.texts)

    def use_texts(self, texts: dict[str, str]) -> None:
        """Score ``texts`` from now on (each text on its own: a window never spans two)."""
        self.load()
        size = effective_window(self.model, None)
        self.texts = texts
        self.windows = {
            name: text_windows(
                self.tokenizer(text, add_special_tokens=False)["input_ids"],
                size,
                self.bos_row is not None,
            )
            for name, text in texts.items()
        }

    @property
    def bytes(self) -> int:
        """UTF-8 bytes of the texts scored."""
        return sum(len(text.encode("utf-8")) for text in self.texts.values())

    def prepare(
        self, problem: ApproximationProblem, matched: tuple[list[int], list[int]], size: int
    ) -> torch.Tensor:
        """Make the model's vocabulary matrices donor-sized, as the transplant lays them out;
        the matrix being validated."""
        inputs = self.model.get_input_embeddings()
        output = self.model.get_output_embeddings()
        tied = output is None or output.weight is inputs.weight
        matrices = {"input": inputs.weight.detach()}
        if not tied:
            matrices["output"] = output.weight.detach()
        bias = getattr(output, "bias", None) if output is not None else None
        validated = "output" if problem.is_lm_head and not tied else "input"
        donor_matrices = {
            name: donor_sized(weight, problem, matched, size, validated=name == validated)
            for name, weight in matrices.items()
        }
        donor_bias = (
            None
            if bias is None
            else donor_sized(bias.detach()[:, None], problem, matched, size, validated=False)[:, 0]
        )
        self.model.resize_token_embeddings(size, mean_resizing=False)
        inputs = self.model.get_input_embeddings()
        output = self.model.get_output_embeddings()
        with torch.no_grad():
            inputs.weight.copy_(donor_matrices["input"])
            if "output" in donor_matrices:
                output.weight.copy_(donor_matrices["output"])
            if donor_bias is not None:
                output.bias.copy_(donor_bias)
        return (output if validated == "output" else inputs).weight

    def release(self) -> None:
        """Drop the model (the scorer cannot score after this; its texts stay)."""
        self.released, self._unloaded = True, None
        self.__dict__.pop("model", None)
        self.__dict__.pop("matrix", None)

    @torch.no_grad()
    def bits_per_byte(self, rows: torch.Tensor) -> float:
        """The model's bits per byte on the validation texts (total bits over total bytes)
        with ``rows`` as the new tokens' rows of the validated matrix."""
        nll = sum(self.kind_nll(rows).values())
        return nll / math.log(2) / self.bytes

    @torch.no_grad()
    def kind_bits_per_byte(self, rows: torch.Tensor) -> dict[str, float]:
        """``{kind: bits per byte}`` on each validation text, ``rows`` as in
        ``bits_per_byte``."""
        return {
            name: nll / math.log(2) / len(self.texts[name].encode("utf-8"))
            for name, nll in self.kind_nll(rows).items()
        }

    def kind_nll(self, rows: torch.Tensor) -> dict[str, float]:
        self.load()
        self.matrix[self.targets] = rows.to(self.matrix)
        try:
            return {name: self.nll(windows) for name, windows in self.windows.items()}
        except Exception as exc:  # the model itself fails on the text
            raise ValidationUnavailable(f"cannot run the model on the text: {exc}") from None

    def nll(self, windows: list[list[int]]) -> float:
        """Summed NLL in nats of the tokens of ``windows`` after the first (all of them when
        a BOS row goes in front), windows of one length in one batch, as
        ``bpb.bits_per_byte`` scores them one by one."""
        device = self.matrix.device
        total = 0.0
        for length in sorted({len(w) for w in windows}):
            batch = torch.tensor([w for w in windows if len(w) == length], device=device)
            for start in range(0, batch.shape[0], self.batch_limit(length)):
                total += self.batch_nll(batch[start : start + self.batch_limit(length)])
        return total

    def batch_nll(self, inputs: torch.Tensor) -> float:
        if self.bos_row is None:
            model_inputs, targets = {"input_ids": inputs}, inputs[:, 1:]
        else:
            embedded = self.model.get_input_embeddings()(inputs)
            bos = self.bos_row.to(embedded).expand(inputs.shape[0], 1, -1)
            model_inputs = {"inputs_embeds": torch.cat([bos, embedded], dim=1)}
            targets = inputs
        if self.sliced_head is not False:
            hidden, logits = self.head_input(model_inputs)
            if self.sliced_head is None:
                # A model that changes the head's output (soft-capping, a logit scale) must
                # give its own logits: it is run whole from then on.
                self.sliced_head = torch.allclose(
                    self.model.get_output_embeddings()(hidden[:, :1]), logits, rtol=1e-5
                )
            if self.sliced_head:
                return self.sliced_nll(hidden[:, :-1], targets)
        logits = self.model(**model_inputs).logits[:, : targets.shape[1]]
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()

    def head_input(
        self, model_inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states the LM head is given, and the model's logits of the first
        position only: the head is run on that one position (a forward pre-hook)."""
        captured: list[torch.Tensor] = []

        def first_position_only(module, args):
            captured.append(args[0])
            return (args[0][:, :1], *args[1:])

        handle = self.model.get_output_embeddings().register_forward_pre_hook(first_position_only)
        try:
            logits = self.model(**model_inputs).logits
        finally:
            handle.remove()
        return captured[0], logits

    def sliced_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        """Summed NLL of ``targets`` from ``hidden`` (one position each), the LM head run on
        ``HEAD_SLICE_BYTES`` of logits at a time: a 262,144-token vocabulary's logits for a
        1,024-token window are 1 GB, and the loss would copy them twice."""
        head = self.model.get_output_embeddings()
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
        step = max(1, HEAD_SLICE_BYTES // (4 * self.matrix.shape[0]))
        total = 0.0
        for start in range(0, targets.shape[0], step):
            logits = head(hidden[start : start + step]).float()
            total += F.cross_entropy(logits, targets[start : start + step], reduction="sum").item()
        return total

    def batch_limit(self, length: int) -> int:
        """Windows per forward pass: their logits within ``LOGITS_BYTES``."""
        return max(1, LOGITS_BYTES // (4 * (length + 1) * self.matrix.shape[0]))


def text_windows(ids: list[int], size: int, bos: bool) -> list[list[int]]:
    """The model inputs ``bpb.bits_per_byte`` makes of ``ids``: windows of ``size`` tokens;
    without a BOS row, each window after the first starts with the last token before it."""
    windows = []
    for start in range(0, len(ids), size):
        prefix = [] if bos or start == 0 else [ids[start - 1]]
        window = prefix + ids[start : start + size]
        if bos or len(window) >= 2:
            windows.append(window)
    return windows


def checkpoint_parameters(path: str) -> int | None:
    """Parameters in the safetensors shards at ``path`` (read from their headers), or None
    if there are none."""
    from safetensors import safe_open

    total, shards = 0, sorted(Path(path).glob("*.safetensors"))
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total if shards else None


def check_size(path: str, max_parameters: int) -> None:
    """Refuse (``ValidationUnavailable``) a base too large to be run: more than
    ``max_parameters``, or a float32 copy beyond ``MEMORY_FRACTION`` of the free memory."""
    parameters = checkpoint_parameters(path)
    if parameters is None:
        return
    if parameters > max_parameters:
        raise ValidationUnavailable(
            f"the base has {parameters / 1e9:.2f} B parameters, more than the "
            f"{max_parameters / 1e9:.2f} B it runs (max_run_parameters)"
        )
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        return
    if 4 * parameters > MEMORY_FRACTION * available:
        raise ValidationUnavailable(
            f"running the base takes {4 * parameters / 1024**3:.1f} GiB in float32, "
            f"{available / 1024**3:.1f} GiB are free"
        )


@torch.no_grad()
def base_bos_row(model, problem: ApproximationProblem) -> torch.Tensor | None:
    """The base's BOS row as its embedding module outputs it, if its tokenizer inserts BOS."""
    tokenizer = problem.base_tokenizer
    if tokenizer is None or not tokenizer_adds_bos(tokenizer):
        return None
    bos = torch.tensor([tokenizer.bos_token_id])
    return model.get_input_embeddings()(bos).detach().clone()


def load_base(path: str):
    from transformers import AutoModelForCausalLM, PreTrainedModel
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # the transplant's own output stays as it is
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise ValidationUnavailable(f"cannot run {path} as a causal LM: {exc}") from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return cast(PreTrainedModel, model).eval()
