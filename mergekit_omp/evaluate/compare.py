"""Which method for this pair? Leave-out scores, optional bits per byte, one ranked table.

from mergekit_omp.evaluate import compare_methods, parse_method_spec
report = compare_methods("base", "donor", [parse_method_spec("omp:k=32"), ...])
print(report.table())
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import tqdm
from mergekit.options import MergeOptions
from pydantic import BaseModel, Field

from mergekit_omp.approximators import approximator_names, get_approximator
from mergekit_omp.approximators.base import DEFAULT_BATCH_SIZE
from mergekit_omp.approximators.spec import MethodSpec
from mergekit_omp.errors import TransplantError
from mergekit_omp.evaluate.bpb import BitsPerByte, bits_per_byte, read_text, resolve_bos
from mergekit_omp.evaluate.leave_out import (
    HoldoutLike,
    LeaveOutTask,
    MatrixScore,
    leave_out_tasks,
    score_method,
)
from mergekit_omp.evaluate.transplanted import InMemoryTransplant
from mergekit_omp.load import LoadedModel, load_pair
from mergekit_omp.match import MatchPolicy
from mergekit_omp.options import MatchScope, TransplantOptions
from mergekit_omp.plan import TransplantPlan, plan_transplant
from mergekit_omp.report import TransplantReport
from mergekit_omp.transplant import MatrixResult, build_matrices

LOG = logging.getLogger(__name__)


def default_method_specs() -> list[MethodSpec]:
    """Every installed method once (an alias such as ``subword`` is not run twice), less
    those that refuse every parameter set (``stb``, broken in mergekit)."""
    specs, seen = [], set()
    for name in approximator_names():
        method = get_approximator(name)
        if method.name in seen:
            continue
        seen.add(method.name)
        try:
            specs.append(MethodSpec(method.name, method, method.validate_parameters({})))
        except TransplantError:
            continue
    return specs


class MethodResult(BaseModel):
    """Everything measured for one method."""

    label: str
    method: str
    parameters: dict[str, Any]
    rank: int = 0
    leave_out: dict[str, MatrixScore] = Field(default_factory=dict)
    seconds: float = 0.0
    bpb: BitsPerByte | None = None
    transplant_seconds: float | None = None
    error: str | None = None

    @property
    def quality(self) -> float:
        """Mean of the mean cosine similarities over the matrices (higher is better)."""
        return sum(s.mean_cosine for s in self.leave_out.values()) / max(len(self.leave_out), 1)

    @property
    def error_l2(self) -> float:
        return sum(s.relative_l2 for s in self.leave_out.values()) / max(len(self.leave_out), 1)


class EvaluationReport(BaseModel):
    """The figures ``mergekit-omp-eval`` prints and writes with ``--json``."""

    base_model: str
    donor: str
    seed: int
    anchors: dict[str, int]
    held_out: dict[str, int]
    held_out_like: str = "random"
    """Which anchors were held out: ``random`` or ``new`` (like the new tokens)."""
    ranked_by: str
    methods: list[MethodResult]
    text: str | None = None
    base_bpb: BitsPerByte | None = None

    def table(self) -> str:
        return format_table(self)


def rank_results(results: list[MethodResult], by_bpb: bool) -> str:
    """Sort in place, best first: by bits per byte with a text, else by leave-out cosine."""

    def key(result: MethodResult) -> tuple:
        failed = result.error is not None or (by_bpb and result.bpb is None)
        if by_bpb and not failed and result.bpb is not None:
            bpb = result.bpb.bpb if math.isfinite(result.bpb.bpb) else math.inf
            return (0, bpb, -result.quality)
        return (int(failed), -result.quality, result.error_l2)

    results.sort(key=key)
    for position, result in enumerate(results, start=1):
        result.rank = position
    return (
        "bits per byte (lower is better)" if by_bpb else "leave-out mean cosine (higher is better)"
    )


def evaluation_options(
    base_model: str,
    donor: str,
    *,
    policy: MatchPolicy | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    **choices: Any,
) -> TransplantOptions:
    """The transplant every method of an evaluation shares (its method aside).

    ``choices`` are further TransplantOptions fields (``byte_match``/``prefix_match`` scopes,
    ``bos``), as ``mergekit-omp-eval`` takes them with the names of ``mergekit-omp``."""
    policy = policy or MatchPolicy()
    fields: dict[str, Any] = {
        "byte_match": MatchScope.YES if policy.byte_match else MatchScope.NO,
        "prefix_match": MatchScope.YES if policy.prefix_match else MatchScope.NO,
    }
    fields.update(choices)
    return TransplantOptions(
        base_model=base_model, donor=donor, batch_size=batch_size, seed=seed, **fields
    )


def with_method(
    options: TransplantOptions, method: str, parameters: dict[str, Any]
) -> TransplantOptions:
    """``options`` with another method for every matrix (validated again)."""
    data = options.model_dump()
    data.update(method=method, parameters=parameters, embed=None, lm_head=None)
    return TransplantOptions.model_validate(data)


def transplanted_matrices(
    options: TransplantOptions, base: LoadedModel, donor: LoadedModel
) -> tuple[TransplantPlan, dict[str, MatrixResult]]:
    """The plan and matrices ``mergekit-omp`` would write for ``options``."""
    plan = plan_transplant(options, base, donor)
    report = TransplantReport(base_model=base.path, donor=donor.path, options={})
    return plan, build_matrices(plan, base, donor, report, progress=False)


def run_leave_out(
    tasks: list[LeaveOutTask], specs: list[MethodSpec], progress: bool
) -> list[MethodResult]:
    results = []
    bar = tqdm.tqdm(total=len(tasks) * len(specs), desc="Leave-out", disable=not progress)
    for spec in specs:
        result = MethodResult(
            label=spec.label, method=spec.approximator.name, parameters=spec.parameters
        )
        for task in tasks:
            bar.set_postfix_str(f"{spec.label} ({task.matrix})")
            try:
                result.leave_out[task.matrix] = score_method(
                    task, spec.approximator, spec.parameters
                )
            except TransplantError as exc:
                result.error = str(exc)
                bar.update(len(tasks) - len(result.leave_out))
                result.leave_out.clear()
                break
            bar.update(1)
        result.seconds = round(sum(s.seconds for s in result.leave_out.values()), 4)
        results.append(result)
    bar.close()
    return results


def run_bits_per_byte(
    base: LoadedModel,
    donor: LoadedModel,
    results: list[MethodResult],
    text: str,
    *,
    options: TransplantOptions,
    window: int | None,
    bos: str,
    merge_options: MergeOptions,
    progress: bool,
) -> BitsPerByte:
    """Bits per byte of the base (its tokenizer) and of each method's transplant: the
    model ``mergekit-omp`` writes for ``options`` with that method, scored with the output
    tokenizer it writes."""
    in_memory = InMemoryTransplant(
        base,
        device=merge_options.device or "cpu",
        trust_remote_code=merge_options.trust_remote_code,
    )
    base_bpb = bits_per_byte(
        in_memory.model,
        base.tokenizer,
        text,
        window=window,
        bos=bos,
        progress=progress,
        description="bpb: base",
    )
    for result in results:
        if result.error is not None:
            continue
        start = time.perf_counter()
        try:
            plan, matrices = transplanted_matrices(
                with_method(options, result.method, result.parameters), base, donor
            )
        except TransplantError as exc:
            result.error = str(exc)
            continue
        result.transplant_seconds = round(time.perf_counter() - start, 3)
        result.bpb = bits_per_byte(
            in_memory.apply(matrices),
            plan.tokenizer,
            text,
            window=window,
            bos=bos,
            progress=progress,
            description=f"bpb: {result.label}",
        )
    return base_bpb


def compare_methods(
    base_model: str,
    donor: str,
    specs: list[MethodSpec] | None = None,
    *,
    holdout: float | None = None,
    like: HoldoutLike = "random",
    seed: int = 0,
    policy: MatchPolicy | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    text_path: str | None = None,
    max_bytes: int | None = None,
    window: int | None = None,
    bos: str = "auto",
    merge_options: MergeOptions | None = None,
    progress: bool = True,
    transplant_choices: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Rank methods for one base/donor pair: leave-out scores, and bpb on ``text_path``."""
    merge_options = merge_options or MergeOptions()
    specs = specs if specs is not None else default_method_specs()
    if not specs:
        raise TransplantError("no approximation methods to compare")
    text = read_text(text_path, max_bytes) if text_path is not None else None
    options = evaluation_options(
        base_model,
        donor,
        policy=policy,
        batch_size=batch_size,
        seed=seed,
        **(transplant_choices or {}),
    )
    base, donor_model = load_pair(base_model, donor, merge_options)
    if text is not None:  # a bad --bos fails before any work
        resolve_bos(base.tokenizer, bos)
        resolve_bos(donor_model.tokenizer, bos)
    tasks = leave_out_tasks(
        base, donor_model, options=options, holdout=holdout, seed=seed, like=like
    )
    results = run_leave_out(tasks, specs, progress)
    base_bpb = None
    if text is not None:
        base_bpb = run_bits_per_byte(
            base,
            donor_model,
            results,
            text,
            options=options,
            window=window,
            bos=bos,
            merge_options=merge_options,
            progress=progress,
        )
    ranked_by = rank_results(results, by_bpb=text is not None)
    return EvaluationReport(
        base_model=base_model,
        donor=donor,
        seed=seed,
        anchors={task.matrix: task.anchors for task in tasks},
        held_out={task.matrix: task.held_out for task in tasks},
        held_out_like=like,
        ranked_by=ranked_by,
        methods=results,
        text=text_path,
        base_bpb=base_bpb,
    )


def format_table(report: EvaluationReport) -> str:
    """The ranked table: one line per method, leave-out figures per matrix, seconds, bpb."""
    matrices = list(report.held_out)
    with_bpb = report.base_bpb is not None
    header = ["#", "method"]
    for matrix in matrices:
        header += [f"{matrix} cos", f"{matrix} relL2"]
    header += ["seconds"] + (["bpb"] if with_bpb else [])
    lines, notes = [header], [""]
    for result in report.methods:
        row = [str(result.rank), result.label]
        for matrix in matrices:
            score = result.leave_out.get(matrix)
            row += [f"{score.mean_cosine:.4f}", f"{score.relative_l2:.4f}"] if score else ["-", "-"]
        row.append(f"{result.seconds:.2f}")
        if with_bpb:
            row.append(f"{result.bpb.bpb:.4f}" if result.bpb else "-")
        lines.append(row)
        notes.append(f"  failed: {result.error}" if result.error else "")
    if report.base_bpb is not None:
        lines.append(
            ["", "(base model)"] + [""] * (2 * len(matrices) + 1) + [f"{report.base_bpb.bpb:.4f}"]
        )
        notes.append("")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = [
        "  ".join(
            cell.rjust(width) if i != 1 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        + note
        for line, note in zip(lines, notes, strict=True)
    ]
    held = ", ".join(f"{m} {n} of {report.anchors[m] + n}" for m, n in report.held_out.items())
    like = "like the new tokens" if report.held_out_like == "new" else "random"
    title = f"Held-out anchors ({like}): {held} (seed {report.seed}); ranked by {report.ranked_by}"
    return "\n".join([title, *rendered])
