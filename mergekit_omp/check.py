"""Can a transplanted model serve as a draft model for a target (``mergekit-omp-check``)?

Speculative decoding is a main use of a transplant: a small base given the tokenizer of a
large model (the donor's own family) drafts tokens that the large model verifies. Each
runtime asks something of the pair:

* transformers assisted generation (``generate(assistant_model=...)`` without tokenizers)
  feeds the target's token ids to the draft and, when sampling, compares their logits:
  the same vocabulary size and the same ids for the same text.
* vLLM (draft-model speculative decoding) encodes with the target's tokenizer only: the
  same vocabulary size and the same ids for the same text.
* llama.cpp (``llama-speculative``, ``llama-server --model-draft``) refuses a draft whose
  vocabulary differs by more than 128 entries, whose token texts differ from id 5 on, or
  whose BOS/EOS ids or BOS/EOS insertion differ ("draft model special tokens must match
  target model to use speculation").

Only configs and tokenizers are read (no weights). The chat template is compared and
reported but blocks no runtime: each one formats chats with the target's template.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from mergekit_omp.bos import adds_bos
from mergekit_omp.errors import TransplantError
from mergekit_omp.load import load_tokenizer, model_reference
from mergekit_omp.readable import quoted, readable_text

TRANSFORMERS, VLLM, LLAMA_CPP = "transformers", "vllm", "llama.cpp"
RUNTIMES = {
    TRANSFORMERS: "transformers assisted generation",
    VLLM: "vLLM speculative decoding",
    LLAMA_CPP: "llama.cpp speculative decoding",
}
LLAMA_CPP_MAX_VOCAB_DIFFERENCE = 128
LLAMA_CPP_FIRST_CHECKED_ID = 5
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 2 + 2 == 4\n",
    "In 1969, 3 astronauts flew 384,400 km; pi is 3.14159.",
    "Grüße, café, naïve, 東京, emoji 🙂 and tabs\tand  double  spaces.",
    '{"id": 42, "tags": ["a", "b"], "ok": true}',
)
CHAT_SAMPLE = [
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": "84."},
]


@dataclass(frozen=True)
class Check:
    """One property the pair shares or not; ``blocks`` are the runtimes it stops."""

    name: str
    ok: bool
    detail: str
    blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Model:
    path: str
    config: Any
    tokenizer: PreTrainedTokenizerBase

    @property
    def vocab_size(self) -> int:
        config = self.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(getattr(text, "vocab_size", None) or len(self.tokenizer))


def load_model_files(path: str, trust_remote_code: bool) -> Model:
    reference = model_reference(path)
    try:
        config = reference.config(trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TransplantError(f"cannot read the config of {path}: {exc}") from exc
    return Model(path, config, load_tokenizer(path, trust_remote_code))


def adds_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    eos = tokenizer.eos_token_id
    ids = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    return eos is not None and len(ids) > 0 and ids[-1] == eos


def id_strings(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {token_id: token for token, token_id in tokenizer.get_vocab().items()}


def check_vocab_size(draft: Model, target: Model) -> Check:
    a, b = draft.vocab_size, target.vocab_size
    blocks: tuple[str, ...] = (TRANSFORMERS, VLLM) if a != b else ()
    if abs(a - b) > LLAMA_CPP_MAX_VOCAB_DIFFERENCE:
        blocks += (LLAMA_CPP,)
    return Check("vocabulary size", a == b, f"{a} (draft) vs {b} (target)", blocks)


def check_token_strings(draft: Model, target: Model) -> Check:
    ours, theirs = id_strings(draft.tokenizer), id_strings(target.tokenizer)
    differing = sorted(i for i in set(ours) | set(theirs) if ours.get(i) != theirs.get(i))
    if not differing:
        return Check("token strings", True, f"all {len(ours)} ids name the same token")
    first = differing[0]
    shown = (
        quoted(readable_text(ours[first])) if first in ours else "none",
        quoted(readable_text(theirs[first])) if first in theirs else "none",
    )
    shared = min(len(ours), len(theirs))
    blocks: tuple[str, ...] = (TRANSFORMERS, VLLM)
    if any(LLAMA_CPP_FIRST_CHECKED_ID <= i < shared for i in differing):
        blocks += (LLAMA_CPP,)
    return Check(
        "token strings",
        False,
        f"{len(differing)} ids differ, first id {first}: {shown[0]} (draft) vs {shown[1]} (target)",
        blocks,
    )


def check_special_tokens(draft: Model, target: Model) -> Check:
    differing = [
        f"{key[:-9]} {getattr(draft.tokenizer, key)} vs {getattr(target.tokenizer, key)}"
        for key in SPECIAL_TOKENS
        if getattr(draft.tokenizer, key) != getattr(target.tokenizer, key)
    ]
    if not differing:
        return Check("special-token ids", True, "bos, eos, pad and unk ids are the same")
    bos_or_eos = any(d.startswith(("bos", "eos")) for d in differing)
    return Check(
        "special-token ids",
        False,
        "; ".join(differing) + " (draft vs target)",
        (LLAMA_CPP,) if bos_or_eos else (),
    )


def check_insertion(draft: Model, target: Model) -> Check:
    def describe(tokenizer: PreTrainedTokenizerBase) -> str:
        bos = "adds BOS" if adds_bos(tokenizer) else "no BOS"
        eos = "adds EOS" if adds_eos(tokenizer) else "no EOS"
        return f"{bos}, {eos}"

    a, b = describe(draft.tokenizer), describe(target.tokenizer)
    if a == b:
        return Check("BOS/EOS insertion", True, f"both: {a}")
    return Check(
        "BOS/EOS insertion",
        False,
        f"draft: {a}; target: {b} (mergekit-omp's default, --bos keep_donor, keeps the donor's)",
        (LLAMA_CPP,),
    )


def check_chat_template(draft: Model, target: Model) -> Check:
    a, b = draft.tokenizer.chat_template, target.tokenizer.chat_template
    if a == b:
        return Check("chat template", True, "the same" if a else "neither has one")
    states = ("none" if t is None else "has one" for t in (a, b))
    return Check("chat template", False, "draft: {}; target: {} (differ)".format(*states))


def sample_texts(target: Model) -> list[str]:
    texts = list(SAMPLE_TEXTS)
    if target.tokenizer.chat_template:
        try:
            texts.append(str(target.tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False)))
        except Exception:  # a template that needs other roles or variables: skip it
            pass
    return texts


def check_sample_ids(draft: Model, target: Model) -> Check:
    texts = sample_texts(target)
    for text in texts:
        # BOS/EOS insertion is its own check (transformers and vLLM never use the draft's)
        ours = draft.tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = target.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None
            )
            at = min(len(ours), len(theirs)) if at is None else at
            return Check(
                "token ids of sample texts",
                False,
                f"{quoted(readable_text(text[:40]))} differs at position {at}",
                (TRANSFORMERS, VLLM, LLAMA_CPP),
            )
    return Check("token ids of sample texts", True, f"identical on {len(texts)} texts")


CHECKS = (
    check_vocab_size,
    check_token_strings,
    check_special_tokens,
    check_insertion,
    check_chat_template,
    check_sample_ids,
)


@dataclass(frozen=True)
class DraftCheck:
    draft: str
    target: str
    checks: list[Check]

    def blocked_by(self, runtime: str) -> list[str]:
        return [c.name for c in self.checks if not c.ok and runtime in c.blocks]

    @property
    def compatible(self) -> dict[str, bool]:
        return {runtime: not self.blocked_by(runtime) for runtime in RUNTIMES}

    def lines(self) -> list[str]:
        lines = [f"{self.draft} as a draft model for {self.target}:"]
        lines.extend(f"  {'ok  ' if c.ok else 'DIFF'} {c.name}: {c.detail}" for c in self.checks)
        for runtime, label in RUNTIMES.items():
            blocked = self.blocked_by(runtime)
            verdict = "yes" if not blocked else "no (" + ", ".join(blocked) + ")"
            lines.append(f"{label}: {verdict}")
        return lines

    def as_json(self) -> dict[str, Any]:
        return {
            "draft": self.draft,
            "target": self.target,
            "compatible": self.compatible,
            "checks": [asdict(c) for c in self.checks],
        }


def check_draft(draft_path: str, target_path: str, trust_remote_code: bool = False) -> DraftCheck:
    """Every check of ``draft_path`` as a draft model for ``target_path``."""
    draft = load_model_files(draft_path, trust_remote_code)
    target = load_model_files(target_path, trust_remote_code)
    return DraftCheck(draft_path, target_path, [check(draft, target) for check in CHECKS])
