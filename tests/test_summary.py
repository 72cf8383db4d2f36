"""What a person reads at the end of a run: a short summary, the full audit under -v,
warnings that fire where something is wrong and only there, and never under --quiet."""

from __future__ import annotations

import copy

import pytest
import tiny
from click.testing import CliRunner
from make_tiny_pair import make_tiny_models

from mergekit_omp.cli.transplant import main as cli_main
from mergekit_omp.diagnostics.numbers import compare_numbers
from mergekit_omp.diagnostics.summary import number_line
from mergekit_omp.vocabulary import vocabulary_of

MAX_LINES = 10
MAX_WIDTH = 200


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The models of examples/make_tiny_pair.py, which the README's first command uses."""
    return make_tiny_models(tmp_path_factory.mktemp("shipped") / "tiny")


def run(*args: str):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def test_readme_first_command_prints_a_short_summary_without_breaker_warnings(shipped, tmp_path):
    out = tmp_path / "tiny-omp"
    result = run(shipped["base"], shipped["donor"], out, "--overwrite")
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    summary = lines[lines.index(next(x for x in lines if x.startswith("Wrote "))) :]
    assert len(summary) <= MAX_LINES, summary
    assert all(len(line.replace(str(out), "OUT")) <= MAX_WIDTH for line in summary), summary
    assert summary[0].startswith(f"Wrote {out}: base with the tokenizer of donor (")
    assert summary[1] == "  tokenizer: the donor's, unchanged"
    assert summary[2].startswith("  400 tokens (embed and lm_head): 170 exact, 1 special, ")
    assert not any("breaker" in line.lower() for line in summary)
    assert "\ufffd" not in result.output
    assert summary[-1] == f"  details: -v, or {out}/mergekit_omp_report.json"


def test_verbose_gives_the_audit_with_readable_tokens(shipped, tmp_path):
    result = run(shipped["base"], shipped["donor"], tmp_path / "out", "-v")
    assert result.exit_code == 0, result.output
    assert "  audit embed: 229 approximated rows, 0 flagged" in result.stderr
    assert "  seconds: " in result.stderr
    largest = next(x for x in result.stderr.splitlines() if x.startswith("  largest: "))
    assert largest.startswith("  largest: '\\x")  # a lone byte, shown as its escape
    assert "\ufffd" not in result.stderr


def test_quiet_hides_the_summary_but_not_the_warnings(tmp_path, metaspace_tok, byte_level_tok):
    base_tok = copy.deepcopy(metaspace_tok)
    base_tok.add_bos_token = True  # a base that expects BOS, a donor that adds none: a warning
    base = tiny.tiny_llama(base_tok, tmp_path / "base", hidden_size=16, seed=35)
    donor = tiny.tiny_llama(byte_level_tok, tmp_path / "donor", hidden_size=16, seed=36)
    result = run(base, donor, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), lines
    assert any("--bos match_base inserts it" in line for line in lines)
    assert "Wrote" not in result.stderr and "%|" not in result.stderr  # no summary, no bars


def test_a_tokenizer_change_is_the_second_line_with_the_flag_that_undoes_it(
    tmp_path, metaspace_tok, byte_level_tok
):
    base_tok = copy.deepcopy(metaspace_tok)
    base_tok.add_bos_token = True
    base = tiny.tiny_llama(base_tok, tmp_path / "base", hidden_size=16, seed=31)
    donor = tiny.tiny_llama(byte_level_tok, tmp_path / "donor", hidden_size=16, seed=32)
    result = run(base, donor, tmp_path / "out", "--bos", "match_base")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith("  tokenizer: "))
    assert "inserts the BOS token first" in line and "--bos keep_donor" in line
    card = (tmp_path / "out" / "README.md").read_text()
    assert "The output tokenizer differs from the donor's:" in card
    assert "inserts the BOS token first" in card


def test_numbers_split_differently_by_the_same_rule_are_no_warning(metaspace_tok, byte_level_tok):
    """Two learned-merge tokenizers split some numbers differently; with every numeric
    donor token matched, nothing is wrong; an approximated one is worth a warning."""
    base, donor = metaspace_tok, byte_level_tok
    comparison = compare_numbers(base, donor, vocabulary_of(base), vocabulary_of(donor))
    assert (comparison.base.scheme, comparison.donor.scheme) == ("mixed", "mixed")
    assert not comparison.aligned and comparison.warning() is None
    approximated = comparison.model_copy(
        update={
            "numeric_approximated": 1,
            "numeric_donor_tokens": 9,
            "approximated_examples": ["0"],
        }
    )
    assert approximated.warning().startswith("numbers: 1 of the donor's 9 numeric tokens")
    assert "-bm yes" in approximated.warning()
    verbose = number_line(comparison)
    assert "MISMATCHED" not in verbose and verbose.startswith("  numbers: splits differ")


def test_the_bos_warning_names_the_flag(tmp_path, metaspace_tok, byte_level_tok):
    base_tok = copy.deepcopy(metaspace_tok)
    base_tok.add_bos_token = True
    base = tiny.tiny_llama(base_tok, tmp_path / "base", hidden_size=16, seed=33)
    donor = tiny.tiny_llama(byte_level_tok, tmp_path / "donor", hidden_size=16, seed=34)
    result = run(base, donor, tmp_path / "out", "--bos", "keep_donor")
    assert result.exit_code == 0, result.output
    (warning,) = [x for x in result.stderr.splitlines() if "BOS" in x]
    assert "--bos match_base inserts it" in warning and "bos: match_base" not in warning


def test_the_headline_total_leaves_out_overlapped_work():
    """The copy that runs beside the approximation is reported but not added to the total."""
    from mergekit_omp.report import TransplantReport

    report = TransplantReport(base_model="b", donor="d", options={})
    report.seconds.update({"approximate": 2.0, "write": 1.0, "copy (overlapped)": 5.0})
    assert report.headline("out").endswith("(3.0 s)")
    assert "copy (overlapped) 5.0" in report.summary("out", verbose=True)
