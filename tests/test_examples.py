"""Every example under examples/ (not examples/real) runs on a freshly built tiny pair."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from click.testing import CliRunner

from mergekit_omp.cli import merge as merge_cli
from mergekit_omp.cli import recipe
from mergekit_omp.cli import transplant as cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yml"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of examples/*.yml beside tiny/, built by examples/make_tiny_pair.py."""
    root = tmp_path_factory.mktemp("examples")
    argv = sys.argv
    sys.argv = ["make_tiny_pair.py", str(root / "tiny")]
    try:
        runpy.run_path(str(EXAMPLES / "make_tiny_pair.py"), run_name="__main__")
    finally:
        sys.argv = argv
    for example in EXAMPLE_FILES:
        shutil.copy(example, root)
    return root


def assert_loads_and_generates(out: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    assert (out / "README.md").is_file()


def test_there_are_recipe_and_merge_examples():
    kinds = {"merge_method" in yaml.safe_load(f.read_text()) for f in EXAMPLE_FILES}
    assert kinds == {True, False}


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda path: path.name)
def test_example_runs(workdir, example):
    path = workdir / example.name
    is_merge = "merge_method" in yaml.safe_load(path.read_text())
    command = merge_cli.main if is_merge else recipe.main
    out = workdir / "out" / example.stem
    result = CliRunner().invoke(command, [str(path), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert_loads_and_generates(out)


def test_readme_command_line_runs_from_the_examples_directory(workdir, monkeypatch):
    """`mergekit-omp tiny/base tiny/donor out/...` as the READMEs write it."""
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(cli.main, ["tiny/base", "tiny/donor", "out/cli", "--quiet"])
    assert result.exit_code == 0, result.output
    assert_loads_and_generates(workdir / "out" / "cli")
