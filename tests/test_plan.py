"""One plan for every entry point: the eval path builds the rows mergekit-omp writes, and
options are validated once, before any model is read."""

from __future__ import annotations

import copy
import logging
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import tiny
import transformers
from click.testing import CliRunner
from mergekit.options import MergeOptions
from pydantic import ValidationError
from safetensors.torch import load_file

from mergekit_omp import TransplantOptions, transplant
from mergekit_omp.approximators import approximator, parse_method_spec, registry
from mergekit_omp.bos import adds_bos
from mergekit_omp.cli import evaluate as eval_cli
from mergekit_omp.cli import transplant as transplant_cli
from mergekit_omp.errors import TransplantError
from mergekit_omp.evaluate import compare
from mergekit_omp.load import load_pair
from mergekit_omp.match import MatchKind, MatchPolicy
from mergekit_omp.plan import ForcedPair, plan_transplant, with_matrix
from mergekit_omp.transplant import aux_match

TEXT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n" * 3


@pytest.fixture(scope="module")
def bos_pair(tmp_path_factory, metaspace_tok, byte_level_tok):
    """An untied base whose tokenizer adds <s>; a byte-level donor adding nothing, whose
    token 0 is both its BOS and its EOS."""
    root = tmp_path_factory.mktemp("plan")
    base_tok = copy.deepcopy(metaspace_tok)
    base_tok.add_bos_token = True
    assert adds_bos(base_tok) and not adds_bos(byte_level_tok)
    assert byte_level_tok.bos_token_id == byte_level_tok.eos_token_id == 0
    base = tiny.tiny_llama(base_tok, root / "base", hidden_size=16, tied=False, seed=21)
    donor = tiny.tiny_llama(byte_level_tok, root / "donor", hidden_size=12, seed=22)
    return base, donor


def test_plan_holds_the_bos_decision_and_its_forced_pair(bos_pair):
    base_path, donor_path = bos_pair
    base, donor = load_pair(str(base_path), str(donor_path), MergeOptions())
    options = TransplantOptions(
        base_model=str(base_path),
        donor=str(donor_path),
        method="omp",
        byte_match="yes",
        bos="match_base",
    )
    plan = plan_transplant(options, base, donor)
    assert plan.bos_diagnostics() == {
        "base_adds_bos": True,
        "donor_adds_bos": False,
        "output_adds_bos": True,
    }
    assert plan.forced_pairs == (ForcedPair(0, base.tokenizer.bos_token_id, "bos"),)
    assert adds_bos(plan.tokenizer) and not adds_bos(donor.tokenizer)
    assert [m.name for m in plan.matrices] == ["embed", "lm_head"]
    assert [m.is_output for m in plan.matrices] == [False, True]
    assert plan.matrix("embed").parameters == {"k": 64, "memory_gb": None, "screen": None}
    assert plan.out_rows == donor.embed.shape[0]
    match = plan.match(plan.matrix("embed"), base, donor)
    assert match.matched[0] == (base.tokenizer.bos_token_id, MatchKind.SPECIAL)
    # A matrix-specific forced pair wins over the plan-wide one, for that matrix only.
    head = plan.matrix("lm_head")
    changed = with_matrix(plan, head, forced_pairs=(ForcedPair(0, 5, "test"),))
    assert changed.pairs_for(changed.matrix("lm_head")) == {0: 5}
    assert changed.pairs_for(changed.matrix("embed")) == {0: base.tokenizer.bos_token_id}


def test_eval_path_scores_the_model_mergekit_omp_writes(bos_pair, tmp_path, monkeypatch):
    base, donor = bos_pair
    (tmp_path / "text.txt").write_text(TEXT)
    options = TransplantOptions(
        base_model=str(base),
        donor=str(donor),
        method="omp",
        byte_match="yes",
        prefix_match="yes",
        bos="match_base",
    )
    out = tmp_path / "out"
    result = transplant(options, out, progress=False)
    written = load_file(out / "model.safetensors")
    assert not written["model.embed_tokens.weight"].equal(written["lm_head.weight"])

    scored = []

    def capture(model, tokenizer, text, **kwargs):
        if kwargs["description"] != "bpb: base":
            scored.append(
                (
                    model.get_input_embeddings().weight.detach().clone(),
                    model.get_output_embeddings().weight.detach().clone(),
                    tokenizer,
                )
            )
        return compare.BitsPerByte(
            bpb=1.0, nll_nats=1.0, bytes=1, tokens=1, scored_tokens=1, window=1, bos_id=None
        )

    monkeypatch.setattr(compare, "bits_per_byte", capture)
    compare.compare_methods(
        str(base),
        str(donor),
        [parse_method_spec("omp")],
        policy=MatchPolicy(byte_match=True, prefix_match=True),
        text_path=str(tmp_path / "text.txt"),
        progress=False,
        transplant_choices={"bos": "match_base"},
    )
    ((embed, head, tokenizer),) = scored
    assert embed.equal(written["model.embed_tokens.weight"])
    assert head.equal(written["lm_head.weight"])
    base_tensors = load_file(base / "model.safetensors")
    base_bos = transformers.AutoTokenizer.from_pretrained(base).bos_token_id
    assert embed[0].equal(base_tensors["model.embed_tokens.weight"][base_bos])
    assert head[0].equal(base_tensors["lm_head.weight"][base_bos])
    assert tokenizer("The fox")["input_ids"][0] == 0  # the output tokenizer, inserting BOS
    assert result.report.matrices[0].counts["prefix"] > 0


def test_lm_head_tensors_are_laid_out_by_the_lm_head_match(bos_pair):
    base, donor = bos_pair
    options = TransplantOptions(base_model=str(base), donor=str(donor), byte_match="lm_head")
    result = transplant(options, progress=False)
    embed, head = result.matrices["embed"].match, result.matrices["lm_head"].match
    assert embed.matched != head.matched
    assert aux_match(result) is head


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["-a", "omp", "-k", "0"],
            "parameters.k: Input should be greater than or equal to 1 (method 'omp')",
        ),
        (
            ["-a", "omp", "-p", "memory_gb=nan"],
            "parameters.memory_gb: Input should be a finite number (method 'omp')",
        ),
        (
            ["-a", "wechsel", "-p", "temperature=0"],
            "parameters.temperature: Input should be greater than 0 (method 'wechsel')",
        ),
        (["-nvs", "nan"], "new_vocab_scale: Input should be a finite number"),
        (["-nvn", "inf"], "new_vocab_noise: Input should be a finite number"),
        (
            ["-a", "omp", "-p", "kk=3"],
            "parameters.kk: method 'omp' takes no such parameter (did you mean 'k'?)",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line_before_loading(tmp_path, flags, expected):
    args = ["/no/such/base", "/no/such/donor", str(tmp_path / "out"), *flags]
    result = CliRunner().invoke(transplant_cli.main, args)
    assert result.exit_code == 2  # a value of the command line out of range (#28)
    assert result.stderr.strip() == f"Error: {expected}; {tmp_path / 'out'} was left as it was"
    assert not (tmp_path / "out").exists()


def test_eval_refuses_bad_method_parameters_before_loading():
    result = CliRunner().invoke(eval_cli.main, ["/no/such/base", "/no/such/donor", "-a", "omp:k=0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: bad parameters for method 'omp': k: Input should be greater than or equal to 1"
    )


def test_recipes_refuse_non_finite_values():
    for key in ("new_vocab_noise", "new_vocab_scale"):
        with pytest.raises(ValidationError, match="finite"):
            TransplantOptions.model_validate({"base_model": "a", "donor": "b", key: float("nan")})
    with pytest.raises(ValidationError, match="embed.parameters.k"):
        TransplantOptions(base_model="a", donor="b", embed={"parameters": {"k": -1}})


PLUGIN_WITH_FUTURE_ANNOTATIONS = '''
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mergekit_omp.approximators import Approximation, ApproximationProblem, approximator


@approximator("future_mean")
def future_mean(
    problem: ApproximationProblem,
    *,
    factor: Annotated[float, Field(gt=0)] = 2.0,
    rounds: int = 1,
) -> Approximation:
    """Scaled mean."""
    row = problem.base_mean().unsqueeze(0) * factor
    return Approximation(rows=row.expand(problem.num_targets, -1).clone())
'''


def test_plugin_module_with_future_annotations(tmp_path, monkeypatch):
    (tmp_path / "future_plugin.py").write_text(textwrap.dedent(PLUGIN_WITH_FUTURE_ANNOTATIONS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "future_plugin", raising=False)
    import future_plugin

    method = future_plugin.future_mean
    assert method.validate_parameters({"rounds": "3"}) == {"factor": 2.0, "rounds": 3}
    with pytest.raises(TransplantError, match="factor: Input should be greater than 0"):
        method.validate_parameters({"factor": 0})


def test_unannotated_parameters_are_refused_when_decorated():
    with pytest.raises(TypeError, match="parameter 'factor' needs a type annotation"):

        @approximator("untyped")
        def untyped(problem, *, factor=2.0):  # noqa: ANN001
            raise AssertionError


def test_a_name_claimed_twice_keeps_the_builtin_and_warns_naming_both(monkeypatch, caplog):
    points = [
        EntryPoint("omp", "mergekit_omp.approximators.mean:mean", registry.ENTRY_POINT_GROUP),
        EntryPoint("omp", "mergekit_omp.approximators.omp:omp", registry.ENTRY_POINT_GROUP),
        EntryPoint("zero", "mergekit_omp.approximators.zero:zero", registry.ENTRY_POINT_GROUP),
    ]
    # a plugin outside the package claiming a built-in's name
    points[0] = EntryPoint("omp", "tiny_plugin_clash:mean", registry.ENTRY_POINT_GROUP)
    from mergekit_omp.approximators.mean import mean

    fake = type(sys)("tiny_plugin_clash")
    fake.mean = mean
    monkeypatch.setitem(sys.modules, "tiny_plugin_clash", fake)
    monkeypatch.setattr(registry, "entry_points", lambda group: points)
    registry._registry.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=registry.LOG.name):
            assert registry.get_approximator("omp").name == "omp"
        assert "'omp' is claimed twice: kept omp" in caplog.text
        assert "ignored mean (tiny_plugin_clash:mean)" in caplog.text
    finally:
        registry._registry.cache_clear()


def test_defaults_live_in_one_place():
    from mergekit_omp.approximators.base import DEFAULT_BATCH_SIZE
    from mergekit_omp.approximators.omp import DEFAULT_K

    params = {p.name: p for p in transplant_cli.main.params}
    assert params["batch_size"].default == DEFAULT_BATCH_SIZE
    assert TransplantOptions.model_fields["batch_size"].default == DEFAULT_BATCH_SIZE
    assert params["k"].default is None  # each method's own; the help lists them
    assert f"omp {DEFAULT_K}" in params["k"].help
    assert registry.get_approximator("omp").validate_parameters({})["k"] == DEFAULT_K
    assert {p.name: p for p in eval_cli.main.params}["batch_size"].default == DEFAULT_BATCH_SIZE
