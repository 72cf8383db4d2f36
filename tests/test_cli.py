"""The command line: drop-in arguments, one-line errors, and never a half-written OUT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from mergekit_omp import write
from mergekit_omp.cli.transplant import main


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def no_leftovers(parent: Path) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_help_explains_every_flag():
    result = invoke("--help")
    assert result.exit_code == 0
    for flag in [
        "-k",
        "-a",
        "-c",
        "-w",
        "-s",
        "--batch-size",
        "-pm",
        "-bm",
        "--magikarp",
        "-nvn",
        "-nvs",
        "--overwrite",
        "--pad-vocab-to-multiple-of",
        "--report",
        "--out-shard-size",
        "--safe-serialization",
        "--lazy-unpickle",
        "--cuda",
        "--device",
        "--trust-remote-code",
    ]:
        assert flag in result.output, flag
    for param in main.params:
        if param.param_type_name == "option":
            assert param.help, param.name


def test_accepts_mergekit_tokensurgeon_arguments(mixed_pair, tmp_path):
    base, donor = mixed_pair
    report = tmp_path / "report.json"
    result = invoke(
        base,
        donor,
        tmp_path / "out",
        "-k",
        "8",
        "-a",
        "omp",
        "--batch-size",
        "64",
        "-pm",
        "embed",
        "-bm",
        "lm_head",
        "--magikarp",
        "-nvn",
        "0.001",
        "-nvs",
        "1.0",
        "--out-shard-size",
        "1M",
        "--no-safe-serialization",
        "--lazy-unpickle",
        "--device",
        "cpu",
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(report.read_text())
    embed, lm_head = saved["matrices"]
    assert embed["prefix_match"] and not embed["byte_match"]
    assert lm_head["byte_match"] and not lm_head["prefix_match"]
    assert embed["parameters"] == {"k": 8, "memory_gb": None, "screen": None}
    assert list((tmp_path / "out").glob("*.bin"))


@pytest.mark.parametrize(
    "method,flags,parameters",
    [
        ("common_interpolation", ["-c", "-w", "barycentric"], {"cosine_similarity": True}),
        ("subword", ["-s", "sum"], {"subword_method": "sum"}),
        ("omp:k=5", ["-p", "screen=false"], {"k": 5, "screen": False}),
    ],
)
def test_method_flags_reach_the_methods_that_take_them(
    mixed_pair, tmp_path, method, flags, parameters
):
    base, donor = mixed_pair
    report = tmp_path / "report.json"
    result = invoke(base, donor, tmp_path / "out", "-a", method, *flags, "--report", report)
    assert result.exit_code == 0, result.output
    saved = json.loads(report.read_text())["matrices"][0]["parameters"]
    assert parameters.items() <= saved.items()


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["-c"],
            "-c/--cosine-similarity: method 'omp' takes no cosine_similarity (methods that do: common_interpolation)",
        ),
        (["-w", "barycentric"], "-w/--weight-scheme: method 'omp' takes no weight_scheme"),
        (
            ["-s", "sum"],
            "-s/--subword-method: method 'omp' takes no subword_method (methods that do: fvt, hybrid)",
        ),
    ],
)
def test_method_flags_are_refused_where_unused(mixed_pair, tmp_path, flags, message):
    base, donor = mixed_pair
    result = invoke(base, donor, tmp_path / "out", "-a", "omp", *flags)
    assert_one_line_error(result, message)


def test_each_command_lists_only_the_options_it_uses():
    from mergekit_omp.cli.evaluate import main as eval_main
    from mergekit_omp.cli.report import main as report_main

    unused = ("--copy-tokenizer", "--lora-merge-cache", "--allow-crimes", "--multi-gpu")
    for command in (main, report_main, eval_main):
        text = CliRunner().invoke(command, ["--help"]).output
        assert not [flag for flag in unused if flag in text], command.name
        assert "--report" in text and "-bm, --byte-match [no|yes|embed|lm_head]" in text
    for command in (report_main, eval_main):
        assert "--out-shard-size" not in CliRunner().invoke(command, ["--help"]).output
    eval_help = CliRunner().invoke(eval_main, ["--help"]).output
    assert "--window-prefix" in eval_help and "--bos [match_base|keep_donor]" in eval_help
    assert (
        "each method's own: clp all, common_interpolation 64, hybrid 16, mp_rope 64, omp 64, omp_ridge 16, wechsel 10"
        in (" ".join(CliRunner().invoke(main, ["--help"]).output.split()))
    )


def test_missing_model_path(mixed_pair, tmp_path):
    _, donor = mixed_pair
    result = invoke(tmp_path / "nope", donor, tmp_path / "out")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_directory_that_is_not_a_model(mixed_pair, tmp_path):
    _, donor = mixed_pair
    (tmp_path / "empty").mkdir()
    result = invoke(tmp_path / "empty", donor, tmp_path / "out")
    assert_one_line_error(result, "not a model directory")


def test_model_without_embedding_tensor(mixed_pair, tmp_path):
    base, donor = mixed_pair
    broken = copy_model(base, tmp_path / "base")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = invoke(broken, donor, tmp_path / "out")
    assert_one_line_error(result, "embed_tokens")
    assert not (tmp_path / "out").exists()


def test_nan_in_embeddings(mixed_pair, tmp_path):
    base, donor = mixed_pair
    broken = copy_model(donor, tmp_path / "donor")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.embed_tokens.weight"][5, 3] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = invoke(base, broken, tmp_path / "out")
    assert_one_line_error(result, "NaN or Inf")


def test_corrupt_weight_file(mixed_pair, tmp_path):
    base, donor = mixed_pair
    broken = copy_model(base, tmp_path / "base")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    result = invoke(broken, donor, tmp_path / "out")
    assert_one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_k_larger_than_the_anchors(mixed_pair, tmp_path):
    base, donor = mixed_pair
    result = invoke(base, donor, tmp_path / "out", "-a", "omp", "-k", "100000")
    assert_one_line_error(result, "k=100000", "anchor")
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path)


def word_level_model(words: list[str], directory: Path) -> Path:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    return tiny.tiny_llama(fast, directory, hidden_size=8)


def test_no_shared_tokens(tmp_path):
    base = word_level_model(["alpha", "beta", "gamma", "delta"], tmp_path / "base")
    donor = word_level_model(["uno", "dos", "tres", "cuatro"], tmp_path / "donor")
    result = invoke(base, donor, tmp_path / "out")
    assert_one_line_error(result, "share no tokens")


def test_output_path_is_a_file(mixed_pair, tmp_path):
    base, donor = mixed_pair
    (tmp_path / "out").write_text("not a directory")
    result = invoke(base, donor, tmp_path / "out")
    assert_one_line_error(result, "is a file")
    assert (tmp_path / "out").read_text() == "not a directory"


def test_non_empty_output_needs_overwrite(mixed_pair, tmp_path):
    base, donor = mixed_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke(base, donor, out)
    assert_one_line_error(result, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    result = invoke(base, donor, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").exists()
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_no_output(mixed_pair, tmp_path, monkeypatch, existing):
    base, donor = mixed_pair
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous model")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(write.GenerationConfig, "from_pretrained", interrupted)
    args = [base, donor, out] + (["--overwrite"] if existing else [])
    result = invoke(*args)
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert no_leftovers(tmp_path)


def test_unknown_method_parameter(mixed_pair, tmp_path):
    base, donor = mixed_pair
    result = invoke(base, donor, tmp_path / "out", "-p", "sparsity=3")
    assert_one_line_error(result, "sparsity")


def test_writes_loadable_model_with_method_parameter(mixed_pair, tmp_path):
    base, donor = mixed_pair
    result = invoke(base, donor, tmp_path / "out", "-a", "omp", "-p", "k=5", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "ignored" not in result.stderr
    assert "approximated by omp (k=5)" in result.stderr
    saved = json.loads((tmp_path / "out" / "mergekit_omp_report.json").read_text())
    assert saved["matrices"][0]["parameters"] == {"k": 5, "memory_gb": None, "screen": None}


@pytest.mark.parametrize("flag,expected", [([], False), (["--trust-remote-code"], True)])
def test_remote_code_only_when_asked(mixed_pair, tmp_path, monkeypatch, flag, expected):
    base, donor = mixed_pair
    seen = []
    original = transformers.AutoTokenizer.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    result = invoke(base, donor, tmp_path / "out", "-a", "zero", *flag)
    assert result.exit_code == 0, result.output
    assert seen and all(value is expected for value in seen)


def test_method_spec_and_knobs_mean_the_same_in_every_command():
    from mergekit_omp.cli.evaluate import method_specs

    (spec,) = method_specs(("omp:k=8",), {})
    (knob,) = method_specs(("omp",), {"k": 8})
    assert spec.parameters == knob.parameters and spec.label == knob.label == "omp:k=8"
    defaults = {s.approximator.name: s.parameters for s in method_specs((), {"k": 5})}
    assert defaults["omp"]["k"] == defaults["wechsel"]["k"] == 5  # where a method takes k
    assert "k" not in defaults["mean"]


@pytest.mark.parametrize(
    ("setting", "user_value", "expected"),
    [
        ("always [madvise] never", None, "1"),
        ("always madvise [never]", None, None),
        (None, None, None),  # no such file: a kernel without transparent huge pages
        ("always [madvise] never", "0", "0"),
    ],
)
def test_console_scripts_ask_torch_for_huge_pages_where_the_kernel_gives_them(
    setting, user_value, expected, tmp_path, monkeypatch
):
    from mergekit_omp.cli import process

    path = tmp_path / "enabled"
    if setting is not None:
        path.write_text(setting + "\n")
    monkeypatch.setattr(process, "THP_SETTING", str(path))
    if user_value is None:
        monkeypatch.delenv(process.THP_ENV, raising=False)
    else:
        monkeypatch.setenv(process.THP_ENV, user_value)
    process.prepare_process()
    assert process.os.environ.get(process.THP_ENV) == expected


def test_k_is_ignored_with_one_warning_by_a_method_without_k(caplog):
    import logging

    from mergekit_omp.cli.options import parameters_for
    from mergekit_omp.errors import TransplantError

    with caplog.at_level(logging.WARNING, logger="mergekit_omp"):
        assert parameters_for("auto", {"k": 8}) == {}
        assert parameters_for("omp", {"k": 8}) == {"k": 8}
    assert [r.getMessage() for r in caplog.records] == ["Method 'auto' takes no k; -k ignored"]
    with pytest.raises(TransplantError, match="-w/--weight-scheme: method 'omp' takes no"):
        parameters_for("omp", {"weight_scheme": "x"})
