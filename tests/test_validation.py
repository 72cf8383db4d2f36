"""auto's validation by running the model: the validation text, the scorer, the choice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tiny
import torch
import transformers
from mergekit.options import MergeOptions

import mergekit_omp.approximators.omp as omp_module
import mergekit_omp.select.text as text_module
from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.approximate import build_problem, selection_context
from mergekit_omp.approximators import get_approximator, parse_method_spec
from mergekit_omp.approximators.omp import shared_omp_runs
from mergekit_omp.evaluate.bpb import bits_per_byte
from mergekit_omp.load import load_pair
from mergekit_omp.plan import plan_transplant
from mergekit_omp.select.auto import LEAVE_OUT_VALIDATION, TEXT_VALIDATION, minimax_regret
from mergekit_omp.select.text import (
    KINDS,
    VALIDATION_BYTES,
    TextScorer,
    ValidationUnavailable,
    checkpoint_parameters,
    kind_sources,
    running_text,
    validation_texts,
)

CANDIDATES = ("zero", "mean", "ridge:alpha=0", "omp:k=4", "fvt")


def tied_pair_of(root: Path, base_adds_bos: bool) -> tuple[Path, Path]:
    """A tied byte-level base (inserting BOS or not) given a byte-level donor with a larger
    vocabulary that inserts none."""
    base, donor, _, _ = tiny.linear_pair(
        root, tiny.byte_level_tokenizer(400), tiny.byte_level_tokenizer(300)
    )
    tokenizer = tiny.byte_level_tokenizer(300)
    tokenizer.add_bos_token = base_adds_bos
    tied = tiny.tiny_llama(
        tokenizer,
        root / "tied",
        hidden_size=20,
        tied=True,
        embed=tiny.load_tensors(base)["model.embed_tokens.weight"],
    )
    return tied, donor


def problem_of(base_path: Path, donor_path: Path, bos: str = "keep_donor"):
    """The embedding's problem and selection context as ``mergekit-omp --bos BOS`` builds
    them."""
    base, donor = load_pair(str(base_path), str(donor_path), MergeOptions())
    options = TransplantOptions(base_model=str(base_path), donor=str(donor_path), bos=bos)
    plan = plan_transplant(options, base, donor)
    (matrix,) = plan.matrices
    match = plan.match(matrix, base, donor)
    problem = build_problem(
        matrix.base_rows(base),
        matrix.donor_rows(donor),
        match,
        base,
        donor,
        is_lm_head=False,
        batch_size=None,
        progress=False,
        seed=0,
    )
    return problem, selection_context(match, base)


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory) -> tuple[Path, Path]:
    return tied_pair_of(tmp_path_factory.mktemp("validation"), base_adds_bos=True)


@pytest.fixture(scope="module")
def selection(tied_pair):
    return problem_of(*tied_pair)


@pytest.fixture(scope="module")
def problem(selection):
    return selection[0]


@pytest.fixture(scope="module")
def context(selection):
    return selection[1]


def rows_of(problem, spec: str) -> torch.Tensor:
    parsed = parse_method_spec(spec)
    return parsed.approximator(problem, **parsed.parameters).rows


def test_every_kind_of_validation_text_is_found_and_fixed_on_this_python():
    sources = kind_sources()
    assert tuple(sources) == KINDS == ("prose", "reference", "code", "quotes", "table")
    assert all(len(source.encode()) >= 10 * VALIDATION_BYTES for source in sources.values())
    texts = validation_texts()
    assert tuple(texts) == KINDS
    assert texts == validation_texts()
    assert all(0 < len(t.encode()) <= VALIDATION_BYTES for t in texts.values())
    assert texts["prose"].startswith("Assert statements are a convenient way")
    assert "\n " not in texts["prose"] and "****" not in texts["prose"]
    assert "\n   " in texts["reference"] and "****" in texts["reference"]
    assert "def " in texts["code"] or "class " in texts["code"]
    assert texts["quotes"].startswith("The Zen of Python, by Tim Peters")
    assert "aren't" in texts["quotes"] and "\u2019" not in sources["quotes"]
    assert texts["table"].lstrip().startswith("2001") and "Mo Tu We Th Fr Sa Su" in texts["table"]
    other = validation_texts(part=1)
    assert all(other[kind] != texts[kind] for kind in KINDS)
    with pytest.raises(ValidationUnavailable, match="no validation text"):
        validation_texts(part=10**6)


def test_a_kind_shorter_than_the_part_is_left_out():
    quotes = len(kind_sources()["quotes"].encode())
    texts = validation_texts(size=quotes // 2 + 1, part=2)
    assert "quotes" not in texts and "prose" in texts


def test_minimax_regret_keeps_the_smallest_worst_loss_against_the_best_on_each_kind():
    table = {
        "a": {"prose": 1.00, "code": 0.90},  # best on prose, 0.10 behind on code
        "b": {"prose": 1.04, "code": 0.80},  # 0.04 behind on prose, best on code
        "c": {"prose": 1.01, "code": 0.86},  # 0.01 and 0.06 behind
    }
    chosen, regrets = minimax_regret(table)
    assert regrets == {"a": 0.1, "b": 0.04, "c": 0.06}
    assert chosen == "b"  # the lowest mean ("c", 0.935) is not what minimax keeps


def test_minimax_regret_prefers_the_first_of_equals_and_skips_failed_candidates():
    table = {
        "first": {"prose": 1.0, "code": 2.0},
        "second": {"prose": 2.0, "code": 1.0},
        "failed": {},
        "broken": {"prose": math.inf, "code": 0.5},
        "dominated": {"prose": 1.5, "code": 2.5},
    }
    chosen, regrets = minimax_regret(table)
    # the best code score is "broken"'s 0.5: "first" and "second" lose 1.5 there
    assert regrets == {
        "first": 1.5,
        "second": 1.0,
        "failed": math.inf,
        "broken": math.inf,
        "dominated": 2.0,
    }
    assert chosen == "second"
    assert minimax_regret({"x": {"k": 1.0}, "y": {"k": 1.0}}) == ("x", {"x": 0.0, "y": 0.0})
    nothing = {"x": {"k": math.inf}, "y": {}}
    assert minimax_regret(nothing) == ("x", {"x": math.inf, "y": math.inf})


def test_the_prose_is_the_references_running_text_without_blocks_or_titles():
    reference = (
        "The pass statement\n******************\n\n"
        '   pass_stmt ::= "pass"\n\n'
        '"pass" is a null operation -- when it is\nexecuted, nothing happens.\n\n'
        "Example:\n\n   def f(arg): pass    # a function\n\n"
        "Subtitle\n========\n  \t\n"
        "It is useful as a placeholder.\n"
    )
    assert running_text(reference) == (
        '"pass" is a null operation -- when it is\nexecuted, nothing happens.\n\n'
        "Example:\n\n"
        "It is useful as a placeholder.\n"
    )


@pytest.mark.parametrize("base_adds_bos", [True, False])
def test_the_scorer_scores_as_the_written_transplant(base_adds_bos, tmp_path):
    base, donor = tied_pair_of(tmp_path, base_adds_bos)
    problem, context = problem_of(base, donor, bos="match_base")
    out = tmp_path / "out"
    options = TransplantOptions(
        base_model=str(base), donor=str(donor), method="wechsel", bos="match_base"
    )
    transplant(options, out, progress=False)
    written = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = validation_texts()
    total = [bits_per_byte(written, tokenizer, text) for text in texts.values()]
    assert all((r.bos_id is not None) == base_adds_bos for r in total)
    expected = sum(r.nll_nats for r in total) / sum(r.bytes for r in total) / math.log(2)
    scorer = TextScorer(problem, context, texts)
    assert (scorer.bos_row is not None) == base_adds_bos
    assert scorer.bits_per_byte(rows_of(problem, "wechsel")) == pytest.approx(expected, rel=1e-5)


def test_a_scorer_given_other_texts_scores_as_one_made_for_them(problem, context):
    texts = validation_texts()
    rows = rows_of(problem, "wechsel")
    prose_only = TextScorer(problem, context, {"prose": texts["prose"]})
    scorer = TextScorer(problem, context, texts)
    both = scorer.bits_per_byte(rows)
    scorer.use_texts({"prose": texts["prose"]})
    assert scorer.bytes == len(texts["prose"].encode("utf-8"))
    assert scorer.bits_per_byte(rows) == prose_only.bits_per_byte(rows) != both


def test_only_the_new_tokens_rows_change(problem, context):
    scorer = TextScorer(problem, context)
    before = scorer.matrix.detach().clone()
    rows = torch.randn(problem.num_targets, problem.base_dim, dtype=torch.float64)
    scorer.bits_per_byte(rows)
    after = scorer.matrix.detach()
    new = torch.zeros(after.shape[0], dtype=torch.bool)
    new[problem.target_ids] = True
    assert torch.equal(after[~new], before[~new])
    assert torch.equal(after[new], rows.float())
    anchors = torch.tensor(problem.donor_anchor_ids)
    assert torch.equal(after[anchors], problem.base_anchors.float())


def test_validation_is_deterministic_and_garbage_rows_score_worse_than_true_rows(problem, context):
    scorer = TextScorer(problem, context)
    exact = rows_of(problem, "ridge:alpha=0")  # the linear pair's true rows
    garbage = 100 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    assert scorer.bits_per_byte(exact) == scorer.bits_per_byte(exact)
    assert scorer.bits_per_byte(garbage) > scorer.bits_per_byte(exact) + 1.0


def test_auto_keeps_the_candidate_with_the_smallest_worst_loss_per_kind_and_records_all(
    problem, context
):
    result = get_approximator("auto")(problem, context, candidates=CANDIDATES)
    by_kind = result.choice.scores_by_kind
    scorer = TextScorer(problem, context)
    for spec in CANDIDATES:
        expected = scorer.kind_bits_per_byte(rows_of(problem, spec))
        assert set(by_kind[spec]) == set(KINDS)
        assert by_kind[spec] == pytest.approx(expected, abs=1e-6)
    chosen, regrets = minimax_regret(by_kind)
    assert result.choice.scores == regrets
    assert result.choice.chosen == chosen
    assert regrets[chosen] == min(regrets.values())
    assert result.choice.validation == TEXT_VALIDATION
    total = sum(len(t.encode()) for t in validation_texts().values())
    assert result.choice.evidence == f"{total} bytes of text: " + ", ".join(KINDS)
    assert torch.equal(result.rows, rows_of(problem, result.choice.chosen))
    again = get_approximator("auto")(problem, context, candidates=CANDIDATES)
    assert again.choice == result.choice.model_copy(update={"seconds": again.choice.seconds})
    assert torch.equal(again.rows, result.rows)


def test_the_pooled_score_is_the_byte_weighted_mean_of_the_kinds(problem, context):
    scorer = TextScorer(problem, context)
    rows = rows_of(problem, "wechsel")
    by_kind = scorer.kind_bits_per_byte(rows)
    weights = {kind: len(text.encode()) / scorer.bytes for kind, text in scorer.texts.items()}
    pooled = sum(weights[kind] * by_kind[kind] for kind in by_kind)
    assert scorer.bits_per_byte(rows) == pytest.approx(pooled, rel=1e-9)


def test_auto_falls_back_to_leave_out_where_the_model_cannot_run_and_says_why(
    problem, context, tmp_path
):
    import dataclasses

    broken = dataclasses.replace(context, base_path=str(tmp_path))
    result = get_approximator("auto")(
        problem, broken, candidates=("zero", "ridge:alpha=0"), holdout=20
    )
    assert result.choice.validation.startswith(LEAVE_OUT_VALIDATION)
    assert f"the model could not be run: cannot run {tmp_path}" in result.choice.validation
    assert result.choice.evidence == "20 held-out tokens"
    chosen = get_approximator("auto")(
        problem, context, candidates=("zero", "ridge:alpha=0"), validation="leave_out", holdout=20
    )
    assert chosen.choice.validation == LEAVE_OUT_VALIDATION


def test_methods_built_on_omp_share_one_run_inside_shared_omp_runs(problem, monkeypatch):
    calls = []
    original = omp_module.batch_omp

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(omp_module, "batch_omp", counting)
    alone = rows_of(problem, "omp_ridge:k=4")
    assert calls == [4]
    with shared_omp_runs():
        shared = [rows_of(problem, spec) for spec in ("omp:k=4", "omp_ridge:k=4", "omp:k=3")]
        again = rows_of(problem, "omp_ridge:k=4")
    assert calls == [4, 4, 3]
    assert torch.equal(shared[1], alone) and torch.equal(again, alone)


def test_a_base_larger_than_auto_runs_falls_back_to_leave_out(tied_pair, problem, context):
    base, _ = tied_pair
    parameters = sum(t.numel() for t in tiny.load_tensors(base).values())
    assert checkpoint_parameters(str(base)) == parameters
    result = get_approximator("auto")(
        problem, context, candidates=("zero", "mean"), max_run_parameters=parameters - 1
    )
    assert result.choice.validation.startswith(LEAVE_OUT_VALIDATION)
    assert "more than the" in result.choice.validation
    kept = get_approximator("auto")(
        problem, context, candidates=("zero", "mean"), max_run_parameters=parameters
    )
    assert kept.choice.validation == TEXT_VALIDATION


@pytest.mark.parametrize("base_adds_bos", [True, False])
def test_the_lm_head_run_a_few_positions_at_a_time_scores_as_the_whole_model(
    tmp_path, monkeypatch, base_adds_bos
):
    problem, context = problem_of(*tied_pair_of(tmp_path, base_adds_bos))
    rows = rows_of(problem, "wechsel")
    whole = TextScorer(problem, context)
    whole.sliced_head = False
    monkeypatch.setattr(text_module, "HEAD_SLICE_BYTES", 4 * whole.matrix.shape[0] * 7)
    sliced = TextScorer(problem, context)
    assert (sliced.bos_row is not None) == base_adds_bos
    expected = whole.kind_bits_per_byte(rows)
    assert sliced.kind_bits_per_byte(rows) == pytest.approx(expected, rel=1e-6)
    assert sliced.sliced_head is True
    assert whole.sliced_head is False


def test_a_model_that_changes_its_heads_logits_is_run_whole(problem, context):
    rows = rows_of(problem, "wechsel")
    plain = TextScorer(problem, context).kind_bits_per_byte(rows)
    scorer = TextScorer(problem, context)

    def halved(module, args, output):
        output.logits = output.logits / 2  # as soft-capping or a logit scale would
        return output

    scorer.model.register_forward_hook(halved)
    halved_scores = scorer.kind_bits_per_byte(rows)
    assert scorer.sliced_head is False
    assert all(halved_scores[kind] != pytest.approx(plain[kind], rel=1e-3) for kind in plain)
    scorer.model._forward_hooks.clear()
    assert scorer.kind_bits_per_byte(rows) == pytest.approx(plain, rel=1e-6)


def test_a_scorer_made_not_to_load_loads_at_its_first_scoring_and_scores_the_same(
    problem, context, monkeypatch
):
    rows = rows_of(problem, "wechsel")
    loads = []
    load_base = text_module.load_base
    monkeypatch.setattr(
        text_module, "load_base", lambda path: loads.append(path) or load_base(path)
    )
    lazy = TextScorer(problem, context, load=False)
    assert loads == [] and "model" not in vars(lazy)
    assert lazy.bytes == sum(len(t.encode("utf-8")) for t in validation_texts().values())
    scores = lazy.kind_bits_per_byte(rows)
    assert loads == [context.base_path]
    assert lazy.kind_bits_per_byte(rows) == scores and len(loads) == 1
    assert scores == TextScorer(problem, context).kind_bits_per_byte(rows)
    lazy.release()
    assert "model" not in vars(lazy)
    with pytest.raises(RuntimeError, match="released"):
        lazy.kind_bits_per_byte(rows)


def test_auto_runs_its_first_candidate_before_it_loads_the_model(problem, context, monkeypatch):
    import mergekit_omp.approximators.omp as omp_module
    from mergekit_omp.approximators import get_approximator

    events = []
    load_base, batch_omp = text_module.load_base, omp_module.batch_omp
    monkeypatch.setattr(
        text_module, "load_base", lambda path: events.append("load") or load_base(path)
    )
    monkeypatch.setattr(
        omp_module, "batch_omp", lambda *a, **k: events.append("omp") or batch_omp(*a, **k)
    )
    result = get_approximator("auto")(problem, context, candidates=("omp:k=2", "mean"))
    assert events == ["omp", "load"]  # the winner's rerun shares the OMP run
    assert result.choice.evidence.endswith(", ".join(validation_texts()))
