#!/usr/bin/env python
"""Transplant quality on the real pair: bits per byte of every method, two texts, both
directions, with the noise of the measurement.

    python benchmarks/quality.py [--cache DIR] [--direction gemma-from-smollm]
        [--methods omp fvt hybrid:k=16 ...] [--texts prose,code] [--bytes 40000] [--out DIR]

For each direction (base <- donor tokenizer) the base is loaded once; each method's
vocabulary matrices are built by ``transplant.build_matrices`` (exactly the rows
``mergekit-omp`` writes, output tokenizer and BOS handling included) and put into the
in-memory base model (``evaluate/transplanted.py``), which is scored by
``evaluate/bpb.py`` with the output tokenizer (``bos="auto"``). Every transplant is made
with ``--bos match_base`` (the model on its own, BOS inserted as the base was trained).
Methods that start from the same OMP run (``omp``, ``omp_ridge``, ``hybrid`` with the same
k) share it: the OMP result is computed once per k and direction (same numbers, less time).

``--leave-out`` adds, beside the order by bits per byte, the orders by leave-out (random
anchors and anchors like the new tokens) and by ``auto``'s validation (bits per byte on
parts 0 and 1 of ``select/text.py``'s text; ``--validation-bytes N`` takes N bytes
of each text instead of what ``auto`` uses), each with Kendall's tau. ``--documents N``
scores every method on N other standard-library modules as ``auto``'s validation scores
(the first 8,000 bytes of each) and counts, for each pair of methods the held-back texts
resolve, on how many of them the pair keeps its order; with ``--leave-out`` too, how many
of the pairs that keep it on all of them each part of the validation text orders as bits
per byte does.

Texts (held back: none of them was used while designing the methods; see
docs/results.md):

* ``prose``: ``english.txt`` (Shakespeare) from byte 100,000 on;
* ``code``: the running interpreter's standard library modules ``fractions.py`` then
  ``graphlib.py``, concatenated (Python 3.11.7 here).

Each text is cut to ``--bytes`` (on a character boundary) and scored as two halves; the
table gives the whole text's bpb (total bits over total bytes) and, for each method, the
difference from a reference method on each half: a difference whose sign and size hold on
both halves is larger than the measurement's noise. ``--dev`` scores the design texts
instead (``english.txt`` from byte 0; ``textwrap.py`` and ``shlex.py``).

Results are cached as JSON under ``OUT/<direction>/`` (one file per method, text and half;
the base model's own bpb too), so a rerun only scores what is new; the validation's rows
for the new tokens under ``OUT/../rows/<direction>/`` and its scores under
``OUT/../validation/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

from machine import print_machine

DEFAULT_CACHE = Path(os.environ.get("MERGEKIT_OMP_CACHE", "~/.cache/mergekit-omp/real"))
GEMMA, SMOLLM = "gemma-3-270m", "smollm2-135m"
DIRECTIONS = {"gemma-from-smollm": (GEMMA, SMOLLM), "smollm-from-gemma": (SMOLLM, GEMMA)}
SINGLE = ["fvt", "wechsel", "zero", "mean", "ridge", "omp_ridge", "hybrid"]
DEFAULT_METHODS = {
    "gemma-from-smollm": ["omp", "omp:k=16", *SINGLE, "hybrid:omp_error_scale=1", "auto"],
    # omp with k = 64 takes about 25 min for this direction's 216,122 new tokens: k = 16.
    "smollm-from-gemma": ["omp:k=16", *SINGLE, "hybrid:omp_error_scale=1", "auto"],
}
TEXTS = {
    "prose": ("english.txt", 100_000),
    "code": ("fractions.py+graphlib.py", 0),
}
DEV_TEXTS = {
    "prose": ("english.txt", 0),
    "code": ("textwrap.py+shlex.py", 0),
}
DOCUMENT_BYTES = 8000


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_source(cache: Path, source: str, offset: int, size: int) -> str:
    """``size`` bytes of the named text from ``offset``, cut on a character boundary."""
    if source.startswith("kind:"):
        from mergekit_omp.select.text import kind_sources

        data = kind_sources()[source.removeprefix("kind:")].encode("utf-8")
    elif source == "english.txt":
        data = (cache.expanduser() / source).read_bytes()
    elif "/" in source:
        data = Path(source).expanduser().read_bytes()
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        data = b"".join((stdlib / name).read_bytes() for name in source.split("+"))
    return data[offset : offset + size].decode("utf-8", errors="ignore")


def named_text(option: str) -> tuple[str, tuple[str, int]]:
    """``NAME=SOURCE[@OFFSET]`` (``--text``): a file path, or ``kind:KIND`` for a kind of
    ``auto``'s validation text (``select/text.py``), from byte OFFSET."""
    name, _, source = option.partition("=")
    source, _, offset = source.partition("@")
    return name, (source, int(offset or 0))


def halves(text: str) -> tuple[str, str]:
    """The text split near its middle, at a line break, so both halves are whole lines."""
    middle = len(text) // 2
    cut = text.rfind("\n", 0, middle) + 1 or middle
    return text[:cut], text[cut:]


def memoised_omp(store: Path) -> None:
    """Make ``batch_omp`` (as the omp approximator calls it) remember its answers, in
    memory and as files under ``store``.

    Keyed by the inputs' shapes, k and a digest of their bytes, so ``omp``, ``omp_ridge``
    and ``hybrid`` with the same k share one OMP run per direction, across runs too."""
    import torch

    import mergekit_omp.approximators.omp as omp_module

    original = omp_module.batch_omp
    answers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def digest(tensor: torch.Tensor) -> str:
        return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]

    def batch_omp(targets, candidates, k, **kwargs):
        key = f"omp-k{k}-{targets.shape[0]}-{digest(targets)}-{digest(candidates)}"
        path = store / f"{key}.pt"
        if key not in answers and path.exists():
            answers[key] = torch.load(path)
        if key not in answers:
            start = time.perf_counter()
            answers[key] = original(targets, candidates, k, **kwargs)
            log(f"  OMP k={k} on {targets.shape[0]} targets: {time.perf_counter() - start:.1f} s")
            store.mkdir(parents=True, exist_ok=True)
            torch.save(answers[key], path)
        indices, coeffs = answers[key]
        return indices.clone(), coeffs.clone()

    omp_module.batch_omp = batch_omp


class Direction:
    """One base model given one donor's tokenizer, ready to score method after method."""

    def __init__(self, name: str, args) -> None:
        from mergekit.options import MergeOptions

        from mergekit_omp.evaluate.transplanted import InMemoryTransplant
        from mergekit_omp.load import load_pair

        base_name, donor_name = DIRECTIONS[name]
        self.name = name
        self.cache = args.cache.expanduser()
        self.base_path = str(self.cache / base_name)
        self.donor_path = str(self.cache / donor_name)
        self.out = args.out / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.base, self.donor = load_pair(self.base_path, self.donor_path, MergeOptions())
        self.in_memory = InMemoryTransplant(self.base)
        self.tokenizer = None
        self.built_label: str | None = None
        self.seconds: dict[str, dict] = {}
        self.problem = None
        self.context = None

    def build(self, spec: str) -> None:
        """Put ``spec``'s matrices into the in-memory model (unless they are already there):
        the plan and rows ``mergekit-omp BASE DONOR OUT -a NAME -p ...`` writes."""
        from mergekit_omp.approximators import parse_method_spec
        from mergekit_omp.options import TransplantOptions
        from mergekit_omp.plan import plan_transplant
        from mergekit_omp.report import TransplantReport
        from mergekit_omp.transplant import build_matrices

        if self.built_label == spec:
            return
        parsed = parse_method_spec(spec)
        options = TransplantOptions(
            base_model=self.base_path,
            donor=self.donor_path,
            method=parsed.approximator.name,
            parameters=parsed.parameters,
            bos="match_base",
        )
        report = TransplantReport(base_model=self.base_path, donor=self.donor_path, options={})
        start = time.perf_counter()
        plan = plan_transplant(options, self.base, self.donor)
        matrices = build_matrices(plan, self.base, self.donor, report, progress=False)
        choice = report.matrices[0].choice
        self.seconds[spec] = {
            "build_s": round(time.perf_counter() - start, 2),
            "stages": dict(report.seconds),
            "approximated": report.matrices[0].counts.get("approximated"),
            "choice": choice.model_dump(mode="json") if choice is not None else None,
        }
        self.in_memory.apply(matrices)
        self.tokenizer = plan.tokenizer
        self.built_label = spec

    def score(self, spec: str, text_name: str, half: int, text: str) -> dict:
        path = self.out / f"{safe(spec)}.{text_name}.{half}.json"
        if path.exists():
            return json.loads(path.read_text())
        from mergekit_omp.evaluate.bpb import bits_per_byte

        self.build(spec)
        result = bits_per_byte(self.in_memory.model, self.tokenizer, text, bos="auto")
        found = {**result.model_dump(), **self.seconds.get(spec, {})}
        path.write_text(json.dumps(found, indent=1) + "\n")
        chose = f", chose {found['choice']['chosen']}" if found.get("choice") else ""
        log(f"  {spec} {text_name}[{half}]: {found['bpb']:.4f} ({result.seconds:.0f} s{chose})")
        return found

    def score_base(self, text_name: str, half: int, text: str) -> dict:
        """The base model with its own tokenizer (its original vocabulary matrices)."""
        path = self.out / f"base.{text_name}.{half}.json"
        if path.exists():
            return json.loads(path.read_text())
        import torch
        from transformers import AutoModelForCausalLM

        from mergekit_omp.evaluate.bpb import bits_per_byte

        model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=torch.float32).eval()
        result = bits_per_byte(model, self.base.tokenizer, text, bos="auto")
        path.write_text(json.dumps(result.model_dump(), indent=1) + "\n")
        log(f"  base {text_name}[{half}]: {result.bpb:.4f} ({result.seconds:.0f} s)")
        return result.model_dump()


def safe(spec: str) -> str:
    return spec.replace(":", "_").replace("=", "").replace(",", "_").replace("/", "_")


def whole(parts: list[dict]) -> float:
    return sum(p["nll_nats"] for p in parts) / math.log(2) / sum(p["bytes"] for p in parts)


def table(direction: str, results: dict, texts: list[str], reference: str) -> str:
    """Markdown: bpb per text and the per-half differences from ``reference``."""
    lines = [
        f"\n### {direction}\n",
        "| method | " + " | ".join(f"{t} bpb | {t} Δ halves vs {reference}" for t in texts) + " |",
        "|---|" + "---|---|" * len(texts),
    ]
    for spec, by_text in results.items():
        cells = []
        for text_name in texts:
            parts = by_text[text_name]
            cells.append(f"{whole(parts):.4f}")
            if spec == "base" or reference not in results:
                cells.append("–")
                continue
            ref = results[reference][text_name]
            deltas = [p["bpb"] - r["bpb"] for p, r in zip(parts, ref, strict=True)]
            cells.append(" / ".join(f"{d:+.4f}" for d in deltas))
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leave_out_scores(direction: Direction, methods: list[str], args) -> dict[str, dict]:
    """Leave-out mean cosine of each method, anchors held out at random and like the new
    tokens (``evaluate/leave_out.py``), cached in ``leave-out.json``."""
    from mergekit_omp.approximators import parse_method_spec
    from mergekit_omp.evaluate.leave_out import leave_out_tasks, score_method

    path = direction.out.parent.parent / "leave-out" / f"{direction.name}.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    for like in ("random", "new"):
        todo = [m for m in methods if m not in scores.get(like, {})]
        if not todo:
            continue
        (task, *_) = leave_out_tasks(direction.base, direction.donor, seed=0, like=like)
        for spec in todo:
            parsed = parse_method_spec(spec)
            score = score_method(task, parsed.approximator, parsed.parameters)
            scores.setdefault(like, {})[spec] = score.model_dump()
            log(f"  leave-out ({like}) {spec}: mean cosine {score.mean_cosine:.4f}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def text_validation_scores(
    direction: Direction, methods: list[str], size: int | None = None
) -> dict[str, dict]:
    """``auto``'s validation of each method (``select/text.py``: bits per byte of
    the transplanted base on the validation text, the donor's tokenizer), on parts 0 (what
    ``auto`` uses) and 1 of the validation texts; ``size`` bytes of each text instead of
    ``VALIDATION_BYTES``. Cached in ``validation/<direction>-<digest of the texts>.json``."""
    from mergekit_omp.select.text import VALIDATION_BYTES, validation_texts

    text_sets = {part: validation_texts(size or VALIDATION_BYTES, part=int(part)) for part in "01"}
    texts = json.dumps(text_sets, sort_keys=True).encode("utf-8")
    name = f"{direction.name}-{hashlib.sha1(texts).hexdigest()[:12]}.json"
    return scores_on_texts(
        direction, methods, text_sets, direction.out.parent.parent / "validation" / name
    )


def other_documents(count: int) -> dict[str, str]:
    """The first ``DOCUMENT_BYTES`` of each of ``count`` standard-library modules that no
    other text here uses: public top-level modules of 10 to 40 KB, in name order."""
    from mergekit_omp.select.text import CODE_MODULE

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    used = {
        name for source, _ in (*TEXTS.values(), *DEV_TEXTS.values()) for name in source.split("+")
    } | {CODE_MODULE}
    modules = sorted(
        p
        for p in stdlib.glob("*.py")
        if p.name not in used
        and not p.name.startswith("_")
        and 10_000 <= p.stat().st_size <= 40_000
    )[:count]
    return {
        p.name: p.read_bytes()[:DOCUMENT_BYTES].decode("utf-8", errors="ignore") for p in modules
    }


def document_scores(direction: Direction, methods: list[str], count: int) -> dict[str, dict]:
    """Each method's bits per byte on each of ``other_documents(count)``, scored as
    ``auto``'s validation scores (cached in ``<direction>-documents.json``)."""
    path = direction.out.parent.parent / "validation" / f"{direction.name}-documents.json"
    text_sets = {name: {name: text} for name, text in other_documents(count).items()}
    return scores_on_texts(direction, methods, text_sets, path)


def scores_on_texts(
    direction: Direction, methods: list[str], text_sets: dict[str, dict[str, str]], path: Path
) -> dict[str, dict]:
    """``{set name: {method: bpb}}``: each method's rows (made once) scored on each set of
    texts by one ``TextScorer``; cached in ``path``, so a rerun scores only what is new."""
    from mergekit_omp.select.text import TextScorer

    scores = json.loads(path.read_text()) if path.exists() else {}
    scorer = None
    for spec in methods:
        todo = [name for name in text_sets if spec not in scores.get(name, {})]
        if not todo:
            continue
        problem = validation_problem(direction)
        rows = validation_rows(direction, spec)
        for name in todo:
            if scorer is None:
                scorer = TextScorer(problem, direction.context, text_sets[name])
            else:
                scorer.use_texts(text_sets[name])
            start = time.perf_counter()
            scores.setdefault(name, {})[spec] = scorer.bits_per_byte(rows)
            log(
                f"  validation [{name}] {spec}: {scores[name][spec]:.4f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def validation_rows(direction: Direction, spec: str):
    """``spec``'s rows for the new tokens of ``validation_problem``, cached in
    ``rows/<direction>/<spec>.pt`` (made once for the validation text and every document)."""
    import torch

    from mergekit_omp.approximators import parse_method_spec
    from mergekit_omp.approximators.omp import shared_omp_runs

    path = direction.out.parent.parent / "rows" / direction.name / f"{safe(spec)}.pt"
    if path.exists():
        return torch.load(path)
    parsed = parse_method_spec(spec)
    start = time.perf_counter()
    with shared_omp_runs():
        rows = parsed.approximator(validation_problem(direction), **parsed.parameters).rows
    log(f"  rows of {spec} for the validation: {time.perf_counter() - start:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return rows


def validation_problem(direction: Direction):
    """The embedding's approximation problem as ``auto`` sees it, and its selection context
    (``direction.context``), made once per direction."""
    if direction.problem is None:
        from mergekit_omp.approximate import build_problem, selection_context
        from mergekit_omp.options import TransplantOptions
        from mergekit_omp.plan import plan_transplant

        options = TransplantOptions(
            base_model=direction.base_path, donor=direction.donor_path, bos="match_base"
        )
        plan = plan_transplant(options, direction.base, direction.donor)
        (matrix, *_) = plan.matrices
        match = plan.match(matrix, direction.base, direction.donor)
        direction.context = selection_context(match, direction.base)
        direction.problem = build_problem(
            matrix.base_rows(direction.base),
            matrix.donor_rows(direction.donor),
            match,
            direction.base,
            direction.donor,
            is_lm_head=False,
            batch_size=None,
            progress=False,
            seed=0,
        )
    return direction.problem


def compared_methods(results: dict) -> list[str]:
    """The methods whose orders are compared: all but the base model and ``auto`` (the
    chooser, whose rows are one of the others')."""
    return [m for m in results if m not in ("base", "auto")]


def orders(results: dict, scores: dict, texts: list[str]) -> str:
    """Methods ordered by mean bpb over the texts, by each leave-out score and by the
    validation text's bpb (parts 0 and 1), side by side; ``auto`` is left out (it is the
    chooser)."""
    methods = compared_methods(results)
    mean_bpb = {m: sum(whole(results[m][t]) for t in texts) / len(texts) for m in methods}
    by_bpb = sorted(methods, key=mean_bpb.get)
    columns = {
        "leave-out, random anchors": {m: -scores["random"][m]["mean_cosine"] for m in methods},
        "leave-out, anchors like the new tokens": {
            m: -scores["new"][m]["mean_cosine"] for m in methods
        },
        "validation text bpb (part 0)": {m: scores["text"]["0"][m] for m in methods},
        "validation text bpb (part 1)": {m: scores["text"]["1"][m] for m in methods},
    }
    lines = [
        "",
        "| rank | by bpb (mean of texts) | " + " | ".join(f"by {c}" for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for rank, method in enumerate(by_bpb):
        cells = [f"{method} ({mean_bpb[method]:.4f})"]
        for values in columns.values():
            other = sorted(methods, key=values.get)[rank]
            cells.append(f"{other} ({abs(values[other]):.4f})")
        lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    for like, validation in columns.items():
        taus = [
            f"{t} {kendall_tau({m: whole(results[m][t]) for m in methods}, validation):+.2f}"
            for t in texts
        ]
        lines.append(
            f"\nKendall's tau, bpb order against {like}: "
            + ", ".join(taus)
            + f", mean of texts {kendall_tau(mean_bpb, validation):+.2f}"
        )
        lines.append(resolved_agreement(results, validation, texts))
    return "\n".join(lines)


def resolved_pairs(results: dict, methods: list[str], texts: list[str]) -> dict:
    """The pairs of methods whose order every half of every text agrees on, each with the
    sign of its difference (+1: the first is worse); the other pairs are within the texts'
    noise."""
    pairs = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            deltas = [
                p["bpb"] - q["bpb"]
                for t in texts
                for p, q in zip(results[a][t], results[b][t], strict=True)
            ]
            if all(d > 0 for d in deltas) or all(d < 0 for d in deltas):
                pairs[a, b] = 1 if deltas[0] > 0 else -1
    return pairs


def resolved_agreement(results: dict, validation: dict[str, float], texts: list[str]) -> str:
    """How many of the pairs the held-back texts resolve (``resolved_pairs``) the
    validation orders the same way, and which it does not."""
    methods = compared_methods(results)
    pairs = resolved_pairs(results, methods, texts)
    wrong = misordered(pairs, validation)
    total = len(methods) * (len(methods) - 1) // 2
    return (
        f"  pairs resolved by every half of every text: {len(pairs)} of {total}; "
        f"ordered the same: {len(pairs) - len(wrong)}"
        + (f" (not: {', '.join(wrong)})" if wrong else "")
    )


def misordered(pairs: dict, scores: dict[str, float]) -> list[str]:
    """The pairs (``resolved_pairs``) that ``scores`` (lower is better) order the other way."""
    return [f"{a} / {b}" for (a, b), sign in pairs.items() if (scores[a] - scores[b]) * sign <= 0]


def documents_holding(pairs: dict, documents: dict[str, dict]) -> dict[tuple[str, str], int]:
    """For each pair (``resolved_pairs``), on how many documents its order holds."""
    return {
        (a, b): sum((scores[a] - scores[b]) * sign > 0 for scores in documents.values())
        for (a, b), sign in pairs.items()
    }


def kendall_tau(first: dict[str, float], second: dict[str, float]) -> float:
    """Rank agreement of two orders of the same keys (lower is better in both): +1 same."""
    keys = list(first)
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    agree = sum(
        1 if (first[a] - first[b]) * (second[a] - second[b]) > 0 else -1
        for a, b in pairs
        if first[a] != first[b] and second[a] != second[b]
    )
    return agree / len(pairs)


def run_direction(name: str, args) -> str:
    texts = {**(DEV_TEXTS if args.dev else TEXTS), **dict(map(named_text, args.text))}
    chosen = [t for t in args.texts.split(",") if t]
    split = {t: halves(read_source(args.cache, *texts[t], args.bytes)) for t in chosen}
    log(f"{name}: " + ", ".join(f"{t} {sum(len(h.encode()) for h in split[t])} B" for t in chosen))
    direction = Direction(name, args)
    methods = args.methods or DEFAULT_METHODS[name]
    results: dict[str, dict[str, list[dict]]] = {}
    if not args.skip_base:
        results["base"] = {
            t: [direction.score_base(t, i, h) for i, h in enumerate(split[t])] for t in chosen
        }
    for spec in methods:
        results[spec] = {
            t: [direction.score(spec, t, i, h) for i, h in enumerate(split[t])] for t in chosen
        }
    reference = args.reference or methods[0]
    out = table(name, results, chosen, reference)
    if args.leave_out:
        scores = leave_out_scores(direction, methods, args)
        scores["text"] = text_validation_scores(
            direction, compared_methods(results), args.validation_bytes
        )
        out += orders(results, scores, chosen)
    if args.documents:
        documents = document_scores(direction, compared_methods(results), args.documents)
        out += document_agreement(results, documents, chosen)
        if args.leave_out:
            out += stable_agreement(results, documents, scores["text"], chosen)
    return out


def document_agreement(results: dict, documents: dict[str, dict], texts: list[str]) -> str:
    """Each method's bpb on each other document, and for each pair the held-back texts
    resolve, on how many documents the same order holds: a pair that holds on some and not
    on others is ordered by the document, not by the kind of text."""
    methods = compared_methods(results)
    names = list(documents)
    lines = ["", "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [
        f"| {m} | " + " | ".join(f"{documents[d][m]:.4f}" for d in names) + " |" for m in methods
    ]
    pairs = resolved_pairs(results, methods, texts)
    held = documents_holding(pairs, documents)
    split = [f"{a} / {b} ({n} of {len(names)})" for (a, b), n in held.items() if n < len(names)]
    lines.append(
        f"\nPairs resolved by every half of every text: {len(pairs)}; the same order on all "
        f"{len(names)} other documents: {len(pairs) - len(split)}"
        + (f"; on some: {', '.join(split)}" if split else "")
    )
    return "\n".join(lines)


def stable_agreement(
    results: dict, documents: dict[str, dict], validation: dict[str, dict], texts: list[str]
) -> str:
    """How many of the pairs that every half of every text resolves and that keep that
    order on every other document (the pairs whose order belongs to the methods, not to a
    text) each part of the validation text orders the same way."""
    pairs = resolved_pairs(results, compared_methods(results), texts)
    held = documents_holding(pairs, documents)
    stable = {pair: sign for pair, sign in pairs.items() if held[pair] == len(documents)}
    lines = [""]
    for part, scores in validation.items():
        wrong = misordered(stable, scores)
        lines.append(
            f"Validation text part {part}: of the {len(stable)} pairs resolved by every half "
            f"and every other document, ordered the same: {len(stable) - len(wrong)}"
            + (f" (not: {', '.join(wrong)})" if wrong else "")
        )
    return "\n".join(lines)


def time_methods(name: str, methods: list[str], args) -> str:
    """Each method's transplant timed as ``mergekit-omp`` runs it (no output written, no
    shared OMP): seconds per stage from the report, in one process."""
    from mergekit_omp import TransplantOptions, transplant
    from mergekit_omp.approximators import parse_method_spec

    base_name, donor_name = DIRECTIONS[name]
    cache = args.cache.expanduser()
    lines = [f"\n### {name}: seconds\n", "| method | load | match | approximate | total |"]
    lines.append("|---|---|---|---|---|")
    for spec in methods:
        parsed = parse_method_spec(spec)
        options = TransplantOptions(
            base_model=str(cache / base_name),
            donor=str(cache / donor_name),
            method=parsed.approximator.name,
            parameters=parsed.parameters,
        )
        start = time.perf_counter()
        report = transplant(options, progress=False).report
        total = time.perf_counter() - start
        seconds = report.seconds
        choice = report.matrices[0].choice
        log(
            f"  {spec}: {total:.1f} s {seconds}"
            + (f"; chose {choice.chosen}" if choice is not None else "")
        )
        lines.append(
            f"| {spec} | {seconds.get('load', 0):.1f} | {seconds.get('match', 0):.1f} | "
            f"{seconds.get('approximate', 0):.1f} | {total:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--direction", choices=[*DIRECTIONS, "both"], default="both")
    parser.add_argument("--methods", nargs="+", default=None, help="NAME[:P=V,...] specs")
    parser.add_argument("--reference", default=None, help="method the Δ columns compare with")
    parser.add_argument("--texts", default="prose,code")
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="NAME=SOURCE[@OFFSET]",
        help="another text (a path, or kind:KIND for a kind of auto's validation text); "
        "name it in --texts",
    )
    parser.add_argument("--bytes", type=int, default=40_000, help="bytes of each text")
    parser.add_argument("--dev", action="store_true", help="score the design texts instead")
    parser.add_argument(
        "--time", nargs="+", default=None, metavar="SPEC", help="only time these methods"
    )
    parser.add_argument(
        "--leave-out",
        action="store_true",
        help="also rank by leave-out (random, like new) and by auto's validation text",
    )
    parser.add_argument(
        "--validation-bytes",
        type=int,
        default=None,
        help="bytes of each validation text for --leave-out (default: what auto uses)",
    )
    parser.add_argument(
        "--documents",
        type=int,
        default=0,
        metavar="N",
        help="also score N other standard-library modules as auto's validation does, and "
        "count on how many each resolved pair of methods keeps its order",
    )
    parser.add_argument("--skip-base", action="store_true", help="no base-model row")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mergekit-omp-quality"))
    args = parser.parse_args()
    print_machine()
    names = list(DIRECTIONS) if args.direction == "both" else [args.direction]
    if args.time:
        print("\n".join(time_methods(name, args.time, args) for name in names))
        return
    memoised_omp(args.out / "omp")
    if args.dev:
        args.out = args.out / "dev"
    args.out = args.out / f"{args.bytes}"
    tables = [run_direction(name, args) for name in names]
    print("\n".join(tables))


if __name__ == "__main__":
    main()
