"""Fault injection: bad inputs, interruptions and races against every command.

Each test builds its broken input itself from a copy of the tiny example models
(examples/make_tiny_pair.py) and, for signals and races, injects the fault at the exact step
through a hook (a monkeypatched rename or stage), never by timing. The promise under test
(docs/cli.md): a bad input gets one line on stderr and a non-zero exit before any heavy work;
inputs are never modified; OUT is either the complete new model or exactly what it was
before, and the message says which.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_omp import checkpoint, publish
from mergekit_omp.assemble import require_finite
from mergekit_omp.cli import check as check_cli
from mergekit_omp.cli import evaluate as eval_cli
from mergekit_omp.cli import merge as merge_cli
from mergekit_omp.cli import recipe
from mergekit_omp.cli import report as report_cli
from mergekit_omp.cli import transplant as cli
from mergekit_omp.errors import TransplantError

transplant_module = importlib.import_module("mergekit_omp.transplant")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMANDS = {
    "mergekit-omp": cli.main,
    "mergekit-omp-yaml": recipe.main,
    "mergekit-omp-merge": merge_cli.main,
    "mergekit-omp-eval": eval_cli.main,
    "mergekit-omp-report": report_cli.main,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """base/, donor/ and donor-chat/ as examples/make_tiny_pair.py builds them."""
    root = tmp_path_factory.mktemp("faults") / "tiny"
    argv = sys.argv
    sys.argv = ["make_tiny_pair.py", str(root)]
    try:
        runpy.run_path(str(EXAMPLES / "make_tiny_pair.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return root


@pytest.fixture
def m(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny models for one test (``m/`` in the issue)."""
    return Path(shutil.copytree(tiny, tmp_path / "m"))


def invoke(command, *args) -> object:
    return CliRunner().invoke(command, [str(a) for a in args])


def run(*args):
    return invoke(cli.main, *args, "--quiet")


def error_line(result, *fragments: str) -> str:
    """The one line of a failed command's stderr, checked for ``fragments``."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (symbolic links as their target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir"
    return found


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def a_model_was_written(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def previous_output(out: Path) -> Path:
    out.mkdir()
    (out / "keep.txt").write_text("the previous model")
    return out


# 1. An OUT that is or holds an input is refused before anything is loaded.


@pytest.mark.parametrize(
    "out_of",
    [
        lambda m: m,  # holds base and donor
        lambda m: m / "base",
        lambda m: m / "donor",
        lambda m: m / "base" / "..",
        lambda m: m / "base" / "sub",  # inside an input
    ],
    ids=["holds-inputs", "is-base", "is-donor", "dotdot", "inside-base"],
)
def test_out_holding_an_input_is_refused_even_with_overwrite(m, out_of):
    before = fingerprint(m)
    result = run(m / "base", m / "donor", out_of(m), "--overwrite")
    error_line(result, "input", "left as it was")
    assert fingerprint(m) == before


def test_out_is_the_current_directory_holding_the_inputs(m, monkeypatch):
    monkeypatch.chdir(m)
    before = fingerprint(m)
    error_line(run("base", "donor", ".", "--overwrite"), "contains the input base")
    assert fingerprint(m) == before


def test_inputs_reached_through_a_symlink_are_recognised(m, tmp_path):
    (tmp_path / "link").symlink_to(m)
    before = fingerprint(m)
    error_line(run(tmp_path / "link" / "base", tmp_path / "link" / "donor", m, "--overwrite"))
    assert fingerprint(m) == before


def test_recipe_folder_as_out_is_refused(m):
    recipe_file = m / "recipes" / "r.yml"
    recipe_file.parent.mkdir()
    recipe_file.write_text(yaml.safe_dump({"base_model": "../base", "donor": "../donor"}))
    before = fingerprint(m)
    result = invoke(recipe.main, recipe_file, m / "recipes", "--overwrite", "--quiet")
    error_line(result, "contains the input")
    result = invoke(recipe.main, recipe_file, m / "base", "--overwrite", "--quiet")
    error_line(result, "is the input")
    assert fingerprint(m) == before


def merge_config(m: Path, **extra) -> dict:
    return {
        "merge_method": "linear",
        "base_model": "donor",
        "models": [
            {"model": "donor", "parameters": {"weight": 0.5}},
            {"model": "donor-chat", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        "tokenizer": {"source": "union"},
        **extra,
    }


@pytest.mark.parametrize("out_name", ["donor-chat", "."], ids=["a-model", "config-folder"])
def test_merge_into_one_of_its_inputs_is_refused(m, out_name):
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(merge_config(m)))
    before = fingerprint(m)
    result = invoke(merge_cli.main, config_file, m / out_name, "--overwrite", "--quiet")
    error_line(result, "input")
    assert fingerprint(m) == before


# 2. Publishing fails: OUT restored, staging removed, one line.


def test_publish_error_restores_out_and_cleans_up(m, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")

    def refused(source, target, flags):
        raise PermissionError(errno.EACCES, "Permission denied", str(source))

    monkeypatch.setattr(publish, "renameat2", refused)
    result = run(m / "base", m / "donor", out, "--overwrite")
    error_line(result, "cannot publish", "Permission denied", "left as it was")
    assert fingerprint(out) == {"keep.txt": fingerprint(out)["keep.txt"]}
    assert (out / "keep.txt").read_text() == "the previous model"
    assert leftovers(tmp_path) == []


def test_publish_error_in_the_two_rename_fallback_puts_out_back(m, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    monkeypatch.setattr(publish, "_RENAMEAT2", None)  # no renameat2: two renames
    real_rename = os.rename

    def second_rename_fails(source, target, *args, **kwargs):
        if Path(source).name.startswith(".out.partial-"):  # the staged model, not its files
            raise OSError(errno.EIO, "Input/output error", str(source))
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    result = run(m / "base", m / "donor", out, "--overwrite")
    error_line(result, "cannot publish", "left as it was")
    assert (out / "keep.txt").read_text() == "the previous model"
    assert leftovers(tmp_path) == []


def test_dangling_symlink_out_is_refused_up_front(m, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    error_line(run(m / "base", m / "donor", tmp_path / "out"), "symbolic link")
    assert os.readlink(tmp_path / "out") == str(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists() and leftovers(tmp_path) == []


def test_out_that_cannot_be_replaced_is_refused_up_front(m, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    (out / "sub").mkdir()
    real_access = os.access
    monkeypatch.setattr(  # as if out/sub were read-only (the tests may run as root)
        os, "access", lambda p, mode, **kw: Path(p) != out / "sub" and real_access(p, mode)
    )
    loads = []
    monkeypatch.setattr(cli, "transplant", lambda *a, **kw: loads.append(a))
    error_line(run(m / "base", m / "donor", out, "--overwrite"), "not writable")
    assert loads == [] and (out / "keep.txt").exists()


# 3. Replacing OUT is one atomic step; without renameat2, signals wait for the rollback.


def test_overwrite_swaps_in_one_rename(m, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    exchanges = []
    real_exchange = publish.rename_exchange

    def recorded(source, target):
        exchanges.append(target)
        real_exchange(source, target)

    monkeypatch.setattr(publish, "rename_exchange", recorded)
    real_rename = os.rename

    def no_directory_renames(source, target, *args, **kwargs):
        assert out.name not in (Path(source).name, Path(target).name), "two-step replace"
        real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", no_directory_renames)
    result = run(m / "base", m / "donor", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert exchanges == [out.resolve()]
    assert a_model_was_written(out) and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []


def test_sigint_between_the_two_renames_of_the_fallback(m, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    monkeypatch.setattr(publish, "_RENAMEAT2", None)
    real_rename = os.rename

    def interrupted_after_first(source, target, *args, **kwargs):
        real_rename(source, target, *args, **kwargs)
        if Path(source) == out.resolve():  # OUT moved aside, the new one not yet in place
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", interrupted_after_first)
    result = run(m / "base", m / "donor", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "complete new model" in result.stderr
    assert a_model_was_written(out) and leftovers(tmp_path) == []


# 4. Once published, the status is success whatever signal arrives.


@pytest.mark.parametrize("existing", [False, True])
def test_sigint_right_after_publishing(m, tmp_path, monkeypatch, existing):
    out = previous_output(tmp_path / "out") if existing else tmp_path / "out"
    name = "rename_exchange" if existing else "rename_noreplace"
    real = getattr(publish, name)

    def then_interrupted(source, target):
        real(source, target)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(publish, name, then_interrupted)
    report = tmp_path / "report.json"
    result = invoke(cli.main, m / "base", m / "donor", out, "--overwrite", "--report", report)
    assert result.exit_code == 0, result.output
    assert "no output was written" not in result.stderr
    assert f"{out} holds the complete new model" in result.stderr
    assert a_model_was_written(out) and leftovers(tmp_path) == []
    assert json.loads(report.read_text())["vocab_size"] == 400  # the rest of the command ran


def test_sigterm_right_after_a_merge_is_published(m, tmp_path, monkeypatch):
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(merge_config(m, omp={"missing_tokens": "omp", "k": 8})))
    real = publish.rename_noreplace

    def then_terminated(source, target):
        real(source, target)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(publish, "rename_noreplace", then_terminated)
    result = invoke(merge_cli.main, config_file, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "holds the complete new model" in result.stderr
    assert (tmp_path / "merged" / "config.json").exists()


# 5. Every output path is checked before any work.


def test_report_into_a_missing_folder_fails_before_out_is_touched(m, tmp_path):
    out = previous_output(tmp_path / "out")
    result = run(m / "base", m / "donor", out, "--overwrite", "--report", tmp_path / "no" / "r")
    error_line(result, "--report", "does not exist", "left as it was")
    assert (out / "keep.txt").read_text() == "the previous model"


@pytest.mark.parametrize(
    "command,stage,option",
    [
        (eval_cli.main, "compare_methods", "--json"),
        (report_cli.main, "transplant", "--json"),
        (report_cli.main, "transplant", "--plot"),
    ],
)
def test_output_files_are_checked_before_any_work(m, tmp_path, monkeypatch, command, stage, option):
    calls = []
    module = sys.modules[command.callback.__module__]
    monkeypatch.setattr(module, stage, lambda *a, **kw: calls.append(a))
    result = invoke(command, m / "base", m / "donor", option, tmp_path / "missing" / "f")
    error_line(result, option, "does not exist")
    assert calls == []


def test_report_must_not_overwrite_an_input(m, tmp_path):
    before = fingerprint(m)
    result = run(m / "base", m / "donor", tmp_path / "out", "--report", m / "base" / "config.json")
    error_line(result, "--report", "input")
    assert fingerprint(m) == before


# 6. Without --overwrite, a model published meanwhile by another run is never replaced.


def test_out_published_meanwhile_is_not_replaced(m, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_umask = publish._apply_umask

    def another_run_publishes_first(staging):
        previous_output(out)
        real_umask(staging)

    monkeypatch.setattr(publish, "_apply_umask", another_run_publishes_first)
    result = run(m / "base", m / "donor", out)
    error_line(result, "appeared", "not replaced", "left as it was")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_publish_without_renameat2_still_refuses_a_filled_out(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "_RENAMEAT2", None)
    out = tmp_path / "out"
    out.mkdir()  # empty: no --overwrite needed
    with pytest.raises(publish.TransplantError, match="appeared"):
        with publish.staged_output(tmp_path / "out", overwrite=False) as staging:
            (staging / "new.txt").write_text("new")
            (out / "other.txt").write_text("another run")  # out was empty at the check
    assert [p.name for p in out.iterdir()] == ["other.txt"]
    assert leftovers(tmp_path) == []


# 7. A donor tokenizer longer than its embedding matrix.


def short_donor(m: Path, rows: int = 300) -> Path:
    donor = m / "donor"
    tensors = load_file(donor / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:rows].clone()
    save_file(tensors, donor / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((donor / "config.json").read_text())
    config["vocab_size"] = rows
    (donor / "config.json").write_text(json.dumps(config))
    return donor


def test_donor_tokens_without_rows_are_not_anchors(m, tmp_path):
    donor = short_donor(m)
    out = tmp_path / "out"
    result = run(m / "base", donor, out, "-k", "8", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    embed = report["matrices"][0]
    assert embed["anchors"] < embed["counts"]["exact"]  # tokens 300+ matched but not anchors
    rows = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert rows.shape[0] == 400 and torch.isfinite(rows).all()


def test_eval_and_report_with_a_short_donor(m, tmp_path):
    donor = short_donor(m)
    result = invoke(eval_cli.main, m / "base", donor, "-a", "omp:k=8", "-a", "mean", "--quiet")
    assert result.exit_code == 0, result.output
    assert "error" not in result.output.lower()
    result = invoke(report_cli.main, m / "base", donor, "-k", "8", "--quiet")
    assert result.exit_code == 0, result.output


# 9, 10. Never write a non-finite vocabulary matrix, checked in the output dtype.


def test_rows_that_overflow_are_refused(m, tmp_path):
    result = run(m / "base", m / "donor", tmp_path / "out", "-a", "mean", "-nvs", "1e300")
    error_line(result, "not finite", "left as it was")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_fp16_base_whose_rows_overflow_after_the_cast(m, tmp_path):
    base = m / "base"
    tensors = load_file(base / "model.safetensors")
    tensors = {name: t.to(torch.float16) for name, t in tensors.items()}
    tensors["model.embed_tokens.weight"] = torch.full_like(
        tensors["model.embed_tokens.weight"], 40000.0
    )
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float16"
    (base / "config.json").write_text(json.dumps(config))
    result = run(base, m / "donor", tmp_path / "out", "-a", "mean", "-nvs", "2")
    error_line(result, "not finite", "float16")
    assert not (tmp_path / "out").exists()


def test_base_rows_that_overflow_in_the_output_dtype_are_refused(m, tmp_path):
    """A cast to another dtype can overflow the copied base rows too, not only new ones."""
    base = m / "base"
    tensors = load_file(base / "model.safetensors")
    tensors["model.embed_tokens.weight"] = torch.full_like(
        tensors["model.embed_tokens.weight"], 1e5
    )
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    result = run(base, m / "donor", tmp_path / "out", "-a", "zero", "--dtype", "float16")
    error_line(result, "not finite", "float16")
    assert not (tmp_path / "out").exists()


def test_require_finite_checks_the_rows_it_is_given():
    matrix = torch.zeros(4, 3, dtype=torch.float16)
    matrix[1, 0] = math.inf
    require_finite(matrix, "embed", rows=[0, 2, 3])
    with pytest.raises(TransplantError, match=r"has 1 rows .* float16 \(token ids 1\)"):
        require_finite(matrix, "embed", rows=[3, 1])
    with pytest.raises(TransplantError, match=r"token ids 1\)"):
        require_finite(matrix, "embed")
    # Entries below float16's largest, with a sum far above it: finite.
    require_finite(torch.full((64, 64), 60000.0, dtype=torch.float16), "embed")
    require_finite(torch.full((64, 64), 3e38, dtype=torch.bfloat16), "embed")


# 11. One line on stderr for each failure.


def test_missing_tokenizer_file(m, tmp_path):
    (m / "donor" / "tokenizer.json").unlink()
    error_line(run(m / "base", m / "donor", tmp_path / "out"), "tokenizer")


def test_custom_code_is_refused_in_one_line(m, tmp_path):
    donor = m / "donor"
    config = json.loads((donor / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    config["model_type"] = "xllama"
    (donor / "config.json").write_text(json.dumps(config))
    (donor / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n"
        "class XConfig(LlamaConfig):\n    model_type = 'xllama'\n"
    )
    error_line(run(m / "base", donor, tmp_path / "out"), "--trust-remote-code")


def test_malicious_pickle_is_not_run_and_is_one_line(m, tmp_path):
    import zipfile

    base = m / "base"
    marker = tmp_path / "PWNED"
    (base / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, base / "pytorch_model.bin")
    with zipfile.ZipFile(base / "pytorch_model.bin") as source:
        entries = {name: source.read(name) for name in source.namelist()}
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # os.system("touch ...")
    with zipfile.ZipFile(base / "pytorch_model.bin", "w") as target:
        for name, data in entries.items():
            target.writestr(name, payload if name.endswith("data.pkl") else data)
    error_line(run(base, m / "donor", tmp_path / "out"), "pickle", "never run")
    assert not marker.exists()


def test_uncached_hub_id(m, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    error_line(run("nobody/nothing", m / "donor", tmp_path / "out"), "nobody/nothing", "cache")


@pytest.mark.parametrize("name", COMMANDS)
def test_usage_errors_are_one_line_with_exit_2(name):
    result = invoke(COMMANDS[name], "--no-such-flag")
    line = error_line(result, "--no-such-flag", f"{name} --help")
    assert result.exit_code == 2, line


SCRIPT_INTERRUPTED_DURING_IMPORTS = """
import sys

class InterruptTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, InterruptTorchImport())
from mergekit_omp.cli.process import {entry}  # what the console script runs
sys.exit({entry}())
"""


@pytest.mark.parametrize("entry", ["mergekit_omp", "mergekit_omp_merge"])
def test_sigint_during_imports_is_one_line(entry, tmp_path):
    assert_interrupted_during_imports(SCRIPT_INTERRUPTED_DURING_IMPORTS, entry, tmp_path)


def assert_interrupted_during_imports(script: str, entry: str, tmp_path: Path) -> None:
    """``script`` (one of the scripts above, for console script ``entry``) exits 130 with
    the one line an interruption before publishing promises."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script.format(entry=entry)), "a", "b"]
        + [str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["Interrupted: nothing was written."]


# 12. The config's width must be the embedding's.


def test_hidden_size_that_disagrees_with_the_embedding(m, tmp_path):
    config = json.loads((m / "base" / "config.json").read_text())
    config["hidden_size"] = 64  # the embedding is 48 wide
    (m / "base" / "config.json").write_text(json.dumps(config))
    error_line(run(m / "base", m / "donor", tmp_path / "out"), "hidden_size", "48")
    assert not (tmp_path / "out").exists()


# 13. Clear messages.


def test_memory_gb_nan_names_the_parameter(m, tmp_path):
    error_line(run(m / "base", m / "donor", tmp_path / "out", "-p", "memory_gb=nan"), "memory_gb")


def test_seed_out_of_range_in_a_recipe(m, tmp_path):
    recipe_file = tmp_path / "r.yml"
    seed = 10**23  # an integer torch cannot take ("Overflow when unpacking long long")
    recipe_file.write_text(f"base_model: {m / 'base'}\ndonor: {m / 'donor'}\nseed: {seed}\n")
    result = invoke(recipe.main, recipe_file, tmp_path / "out", "--quiet")
    error_line(result, "seed", "less than")


@pytest.mark.parametrize("seed", ["-5", str(2**32)])
def test_random_seed_out_of_numpys_range_is_a_usage_error(m, tmp_path, seed):
    result = run(m / "base", m / "donor", tmp_path / "out", "--random-seed", seed)
    assert result.exit_code == 2, result.output
    assert "--random-seed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_eval_bos_id_out_of_range(m, tmp_path):
    result = invoke(
        eval_cli.main, m / "base", m / "donor", "-a", "mean", "--text", EXAMPLES / "README.md",
        "--max-bytes", "200", "--bos", "99999", "--quiet",
    )  # fmt: skip
    error_line(result, "99999", "--bos")


@pytest.mark.parametrize("value", ["200%", "0%", "-5", "1.5", "0"])
def test_eval_holdout_out_of_range(m, monkeypatch, value):
    calls = []
    eval_module = sys.modules[eval_cli.main.callback.__module__]
    monkeypatch.setattr(eval_module, "compare_methods", lambda *a, **kw: calls.append(a))
    result = invoke(eval_cli.main, m / "base", m / "donor", "--holdout", value)
    error_line(result, "--holdout", value)
    assert calls == []


def test_merge_error_has_no_stray_brace(m, tmp_path):
    config = merge_config(m, omp={"missing_tokens": "omp"})
    del config["tokenizer"]
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(config))
    line = error_line(invoke(merge_cli.main, config_file, tmp_path / "out"), "tokenizer")
    assert "{source: union}" in line and "}}" not in line


@pytest.mark.parametrize("path", ["./missing", "models/missing", "missing"])
def test_merge_with_a_missing_relative_path(m, tmp_path, path):
    (m / "models").mkdir()
    config = merge_config(m)
    config["models"][1]["model"] = path
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(config))
    line = error_line(invoke(merge_cli.main, config_file, tmp_path / "out"), path)
    assert "does not exist" in line and "huggingface" not in line.lower()


def test_merge_model_with_more_tokens_than_rows(m, tmp_path):
    chat = m / "donor-chat"
    tensors = load_file(chat / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][:400].clone()
    save_file(tensors, chat / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((chat / "config.json").read_text())
    config["vocab_size"] = 400  # its tokenizer has 404 entries
    (chat / "config.json").write_text(json.dumps(config))
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(merge_config(m)))
    line = error_line(invoke(merge_cli.main, config_file, tmp_path / "out", "--quiet"))
    assert "404" in line and "400" in line and "donor-chat" in line


# The copy of the shards without a vocabulary tensor runs beside the approximation: its errors
# are one line, and any fault meanwhile stops it before the staging directory is removed.

COPY_THREAD = "mergekit-omp shard copy"


def sharded(base: Path) -> Path:
    """``base`` with its layer weights in one shard per module (attention, MLP, norms), the
    other tensors in a shard apart."""
    tensors = load_file(base / "model.safetensors")
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        part = ".".join(name.split(".")[2:4]) if name.startswith("model.layers.") else "rest"
        shards.setdefault(part, {})[name] = tensor
    weight_map = {}
    for index, group in enumerate(dict(sorted(shards.items())).values(), start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(group, base / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
    (base / "model.safetensors").unlink()
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(shards) >= 3  # shards to copy, and the vocabulary shard to rewrite
    return base


def copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == COPY_THREAD]


def test_an_error_of_the_background_copy_is_one_line(m, tmp_path, monkeypatch):
    base = sharded(m / "base")
    failed_in: list[str] = []

    def disk_full(source, destination, *args):
        failed_in.append(threading.current_thread().name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "clone_file", disk_full)
    out = tmp_path / "out"
    result = run(base, m / "donor", out)
    error_line(result, "cannot copy the weights", "No space left on device", "left as it was")
    assert failed_in == [COPY_THREAD]
    assert not out.exists() and leftovers(tmp_path) == [] and copy_threads() == []


@pytest.mark.parametrize(
    "fault", ["error", signal.SIGINT, signal.SIGTERM], ids=["error", "sigint", "sigterm"]
)
def test_fault_during_approximation_stops_the_copy_before_cleanup(m, tmp_path, monkeypatch, fault):
    """The copy is still running when the approximation fails; it is told to stop and waited
    for before the staging directory is removed."""
    base = sharded(m / "base")
    copy_started = threading.Event()
    when_stopped: list[tuple[bool, bool]] = []  # (told to stop, staging still there)

    def copy_until_stopped(source, destination, stop):
        copy_started.set()
        deadline = time.monotonic() + 60
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        when_stopped.append((stop(), destination.parent.is_dir()))
        raise checkpoint.CopyCancelled

    def failing_approximation(*args, **kwargs):
        assert copy_started.wait(timeout=60)
        if fault == "error":
            raise RuntimeError("the approximation failed")
        signal.raise_signal(fault)

    monkeypatch.setattr(checkpoint, "clone_file", copy_until_stopped)
    monkeypatch.setattr(transplant_module, "approximate_new_rows", failing_approximation)
    out = previous_output(tmp_path / "out")
    result = run(base, m / "donor", out, "--overwrite")
    if fault == "error":
        error_line(result, "RuntimeError: the approximation failed", "left as it was")
    else:
        assert result.exit_code == 130, result.output
        assert f"Interrupted: {out} was left as it was" in result.stderr
    assert when_stopped == [(True, True)]
    assert (out / "keep.txt").read_text() == "the previous model"
    assert leftovers(tmp_path) == [] and copy_threads() == []


# 14. An empty output path (an unset variable) is a usage error in every command.


def empty_path_commands(m: Path, tmp_path: Path) -> dict[str, tuple]:
    recipe_file = tmp_path / "r.yml"
    recipe_file.write_text(
        yaml.safe_dump({"base_model": str(m / "base"), "donor": str(m / "donor")})
    )
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(merge_config(m)))
    models = (m / "base", m / "donor")
    out = tmp_path / "out"
    return {
        "mergekit-omp OUT": (cli.main, *models, "", "--overwrite"),
        "mergekit-omp-yaml OUT": (recipe.main, recipe_file, "", "--overwrite"),
        "mergekit-omp-merge OUT": (merge_cli.main, config_file, "", "--overwrite"),
        "mergekit-omp --report": (cli.main, *models, out, "--report", ""),
        "mergekit-omp-yaml --report": (recipe.main, recipe_file, out, "--report", ""),
        "mergekit-omp-merge --report": (merge_cli.main, config_file, out, "--report", ""),
        "mergekit-omp-eval --report": (eval_cli.main, *models, "--report", ""),
        "mergekit-omp-eval --json": (eval_cli.main, *models, "--json", ""),
        "mergekit-omp-report --report": (report_cli.main, *models, "--report", ""),
        "mergekit-omp-report --plot": (report_cli.main, *models, "--plot", ""),
        "mergekit-omp-check --report": (check_cli.main, *models, "--report", ""),
    }


EMPTY_PATH_CASES = [
    "mergekit-omp OUT",
    "mergekit-omp-yaml OUT",
    "mergekit-omp-merge OUT",
    "mergekit-omp --report",
    "mergekit-omp-yaml --report",
    "mergekit-omp-merge --report",
    "mergekit-omp-eval --report",
    "mergekit-omp-eval --json",
    "mergekit-omp-report --report",
    "mergekit-omp-report --plot",
    "mergekit-omp-check --report",
]


@pytest.mark.parametrize("case", EMPTY_PATH_CASES)
def test_an_empty_output_path_is_refused(m, tmp_path, monkeypatch, case):
    command, *args = empty_path_commands(m, tmp_path)[case]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "user-file.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    before = fingerprint(tmp_path)
    result = invoke(command, *args)
    line = error_line(result, "empty")
    assert result.exit_code == 2, line
    assert fingerprint(tmp_path) == before


def test_the_library_refuses_an_empty_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransplantError, match="empty"):
        publish.check_output_path("", overwrite=True)
    with pytest.raises(TransplantError, match="empty"):
        publish.check_output_file("", "--report")


# 15. An output file that is OUT, lies inside it or is another output file.


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("report_at", ["out", "inside"])
def test_report_at_or_inside_out_is_refused_before_any_work(
    m, tmp_path, monkeypatch, existing, report_at
):
    calls = []
    monkeypatch.setattr(transplant_module, "load_pair", lambda *a, **kw: calls.append(a))
    out = tmp_path / "out"
    if existing:
        previous_output(out)
    report = out if report_at == "out" else out / "keep.txt"
    result = run(m / "base", m / "donor", out, "--overwrite", "--report", report)
    error_line(result, "--report")
    assert calls == []
    assert out.exists() == existing
    if existing:
        assert (out / "keep.txt").read_text() == "the previous model"


def test_two_output_files_at_one_path_are_refused(m, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        sys.modules[report_cli.main.callback.__module__], "transplant", calls.append
    )
    same = tmp_path / "same"
    result = invoke(report_cli.main, m / "base", m / "donor", "--report", same, "--plot", same)
    error_line(result, "--report", "--plot", "same file")
    assert calls == []


# 16. Weights and configs that would escape the model directory, hang, or print other
# libraries' lines.


def indexed(base: Path, shard_of_first_tensor: str) -> Path:
    """``base`` as a one-shard indexed checkpoint whose first tensor points elsewhere."""
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    names = sorted(load_file(base / "model-00001-of-00001.safetensors"))
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    weight_map[names[0]] = shard_of_first_tensor
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    return base


@pytest.mark.parametrize("shard", ["/etc/passwd", "../../../../../../etc/passwd", "../donor/x"])
def test_a_shard_outside_the_model_directory_is_refused(m, tmp_path, shard):
    base = indexed(m / "base", shard)
    line = error_line(run(base, m / "donor", tmp_path / "out"), "model.safetensors.index.json")
    assert shard in line and "outside the model directory" in line


def test_a_header_longer_than_its_file_is_one_line(m, tmp_path):
    shard = "model-00001-of-00001.safetensors"
    indexed(m / "base", shard)
    (m / "base" / shard).write_bytes((10**15).to_bytes(8, "little") + b"{}")
    error_line(run(m / "base", m / "donor", tmp_path / "out"), "not a safetensors file")


def run_script(entry: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """A console script in a process of its own (SIGKILLed after ``timeout`` seconds)."""
    script = f"from mergekit_omp.cli.process import {entry}; {entry}()"
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_named_pipe_in_a_model_is_refused_not_read(m, tmp_path, name):
    (m / "base" / name).unlink()
    os.mkfifo(m / "base" / name)  # a reader would wait for a writer forever
    try:
        done = run_script("mergekit_omp", m / "base", m / "donor", tmp_path / "out", timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a model whose {name} is a named pipe blocked")
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert name in line and "named pipe" in line, line


def test_a_pickle_checkpoint_leaves_no_torch_warning(m, tmp_path):
    import pickle
    import warnings

    (m / "base" / "model.safetensors").unlink()
    (m / "base" / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(m / "base", m / "donor", tmp_path / "out")
    error_line(result, "weights")
    assert [str(w.message) for w in caught if "pickle" in str(w.message)] == []


@pytest.mark.parametrize("value", [-5, 0, 1.5, "400", True])
@pytest.mark.parametrize("model", ["base", "donor"])
def test_a_config_vocab_size_that_is_not_a_positive_count(m, tmp_path, value, model):
    config = json.loads((m / model / "config.json").read_text())
    config["vocab_size"] = value
    (m / model / "config.json").write_text(json.dumps(config))
    line = error_line(run(m / "base", m / "donor", tmp_path / "out"), "vocab_size")
    assert json.dumps(value) in line and "at least 1" in line
    assert not (tmp_path / "out").exists()


def legacy_pickle_checkpoint(model: Path) -> None:
    """``model``'s weights as ``pytorch_model.bin`` in torch's legacy (not zip) format with
    pickle protocol 4, which torch's weights-only loader refuses (with a 3-line warning)."""
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(
        tensors,
        model / "pytorch_model.bin",
        _use_new_zipfile_serialization=False,
        pickle_protocol=4,
    )


def assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """The whole stderr of a refused command is one line, and it names ``fragments``."""
    assert done.returncode == 1, done.stderr
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("command", ["mergekit_omp", "mergekit_omp_merge"])
def test_a_legacy_pickle_checkpoint_is_refused_in_one_line(m, tmp_path, command):
    """Item 4 of #28: torch's "Detected pickle protocol 4" warning and mergekit's own error
    used to come with the refusal of a merge; in every command it is one line naming the
    model, before any work."""
    legacy_pickle_checkpoint(m / "donor")
    out = tmp_path / "out"
    if command == "mergekit_omp":
        done = run_script(command, m / "base", m / "donor", out)
    else:
        config_file = m / "merge.yml"
        config_file.write_text(yaml.safe_dump(merge_config(m, omp={"missing_tokens": "omp"})))
        done = run_script(command, config_file, out)
    line = assert_one_line(done, "cannot read the weights of", "donor", "pickle", "not loaded")
    assert "operand 149" in line and "was left as it was" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_merge_refusal_is_one_line_with_no_transformers_note(m, tmp_path):
    """Item 4 of #28: no ``torch_dtype is deprecated`` line, and with --quiet not mergekit's
    "Building tokenizer permutations" bar either: the whole stderr is the refusal."""
    config_file = m / "merge.yml"
    settings = {"missing_tokens": "omp", "method": "omp", "k": 100000}
    config_file.write_text(yaml.safe_dump(merge_config(m, omp=settings)))
    done = run_script("mergekit_omp_merge", config_file, tmp_path / "out", "--quiet")
    assert "torch_dtype" not in done.stderr
    assert_one_line(done, "k=100000 is larger than")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_a_merge_dtype_mergekit_lacks_is_refused_before_any_work(m, tmp_path, key, monkeypatch):
    """mergekit refuses ``dtype: float99`` only once the merge runs (``RuntimeError:
    Unimplemented dtype``, after its progress bars): here one line naming the key, first."""
    import mergekit_omp.merge.run

    calls = []
    monkeypatch.setattr(mergekit_omp.merge.run, "run_merge", lambda *a, **kw: calls.append(a))
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(merge_config(m, **{key: "float99"})))
    result = invoke(merge_cli.main, config_file, tmp_path / "out")
    line = error_line(result, f"{key}: 'float99' is not a dtype", "left as it was")
    assert result.exit_code == 1, line
    assert calls == [] and not (tmp_path / "out").exists()


# 17. Absurd values: one line before any work.

ABSURD_VALUES = [
    ("--out-shard-size", "-1"),
    ("--out-shard-size", "abc"),
    ("--out-shard-size", "1e999"),
    ("--out-shard-size", "0"),
    ("-nvn", "-1"),
    ("--batch-size", "0"),
    ("--batch-size", "-2"),
    ("--batch-size", "1e20"),
    ("--batch-size", str(10**20)),
    ("--write-threads", "0"),
    ("--write-threads", "-1"),
]


@pytest.mark.parametrize("flag,value", ABSURD_VALUES)
def test_absurd_values_are_usage_errors(m, tmp_path, monkeypatch, flag, value):
    calls = []
    monkeypatch.setattr(transplant_module, "load_pair", lambda *a, **kw: calls.append(a))
    result = run(m / "base", m / "donor", tmp_path / "out", flag, value)
    line = error_line(result, value)
    assert result.exit_code == 2, line
    assert calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--out-shard-size", "0"), ("--write-threads", "0")])
def test_absurd_values_are_usage_errors_in_merges(m, tmp_path, flag, value):
    config_file = m / "merge.yml"
    config_file.write_text(yaml.safe_dump(merge_config(m)))
    result = invoke(merge_cli.main, config_file, tmp_path / "out", flag, value)
    line = error_line(result, flag)
    assert result.exit_code == 2, line
    assert not (tmp_path / "out").exists()


def test_eval_batch_size_zero_is_a_usage_error(m, monkeypatch):
    calls = []
    eval_module = sys.modules[eval_cli.main.callback.__module__]
    monkeypatch.setattr(eval_module, "compare_methods", lambda *a, **kw: calls.append(a))
    result = invoke(eval_cli.main, m / "base", m / "donor", "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size" in error_line(result)
    assert calls == []


@pytest.mark.parametrize("method", ["hybrid", "omp_ridge"])
@pytest.mark.parametrize("memory", ["0", "-5"])
def test_memory_gb_must_be_positive_for_every_method_built_on_omp(m, tmp_path, method, memory):
    result = run(
        m / "base", m / "donor", tmp_path / "out", "-a", method, "-p", f"memory_gb={memory}"
    )
    error_line(result, "memory_gb", "greater than 0", method)
    assert result.exit_code == 2  # a value of the command line out of range (#28 item 7)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("new_vocab_noise", -1)])
def test_absurd_values_in_a_recipe(m, tmp_path, key, value):
    recipe_file = tmp_path / "r.yml"
    recipe_file.write_text(
        yaml.safe_dump({"base_model": str(m / "base"), "donor": str(m / "donor"), key: value})
    )
    error_line(invoke(recipe.main, recipe_file, tmp_path / "out", "--quiet"), key)
    assert not (tmp_path / "out").exists()


def test_eval_holdout_count_beyond_the_shared_tokens(m):
    result = invoke(eval_cli.main, m / "base", m / "donor", "-a", "mean", "--holdout", "1000000")
    error_line(result, "--holdout 1000000", "at most")
    assert result.exit_code == 2  # a value of the command line out of range (#28 item 7)


# 18. SIGTERM while the command starts; staging directories a killed run left.

SCRIPT_TERMINATED_DURING_IMPORTS = """
import os, signal, sys

class TerminateOnTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, TerminateOnTorchImport())
from mergekit_omp.cli.process import {entry}
sys.exit({entry}())
"""


@pytest.mark.parametrize("entry", ["mergekit_omp", "mergekit_omp_eval"])
def test_sigterm_during_imports_is_one_line_and_130(entry, tmp_path):
    assert_interrupted_during_imports(SCRIPT_TERMINATED_DURING_IMPORTS, entry, tmp_path)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_left_by_a_killed_run_is_swept_and_nothing_else(m, tmp_path):
    out = tmp_path / "out"
    tag = publish.machine_tag()
    stale = tmp_path / f".out.partial-{dead_pid()}.{tag}-abc123_x"
    running = tmp_path / f".out.partial-{os.getpid()}.{tag}-abc123_y"
    elsewhere = tmp_path / f".out.partial-{dead_pid()}.0badc0de-abc123_z"
    mine = tmp_path / ".out.partial-notes"
    for directory in (stale, running, elsewhere, mine):
        directory.mkdir()
        (directory / "f").write_text("x")
    result = run(m / "base", m / "donor", out, "-a", "mean")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert running.exists() and elsewhere.exists() and mine.exists()


def test_staging_names_fit_a_long_out_name(m, tmp_path):
    out = tmp_path / ("x" * 250)
    result = run(m / "base", m / "donor", out, "-a", "mean")
    assert result.exit_code == 0, result.output
    assert a_model_was_written(out) and leftovers(tmp_path) == []
    assert len(os.fsencode(publish.staging_prefix(out))) + publish.RANDOM_SUFFIX <= 255
    assert len(os.fsencode(publish.staging_prefix(tmp_path / ("é" * 127), "old"))) < 255
