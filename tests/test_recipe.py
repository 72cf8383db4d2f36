"""YAML recipes: the same schema as the command line, errors that name the key, paths read
beside the recipe, and a recipe that produces exactly what its command line produces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_omp.cli import recipe
from mergekit_omp.cli import transplant as cli
from mergekit_omp.errors import TransplantError
from mergekit_omp.options import (
    MatchScope,
    MatrixOverride,
    TransplantOptions,
)
from mergekit_omp.paths import resolve_model_path
from mergekit_omp.recipe import load_recipe, recipe_dict, recipe_yaml


def write_recipe(directory: Path, text: str, name: str = "recipe.yml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def recipe_error(directory: Path, text: str) -> str:
    path = write_recipe(directory, text)
    with pytest.raises(TransplantError) as excinfo:
        load_recipe(path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


FULL_OPTIONS = TransplantOptions(
    base_model="models/base",
    donor="org/donor-model",
    method="omp",
    parameters={"k": 32},
    embed=MatrixOverride(prefix_match=True),
    lm_head=MatrixOverride(method="mean"),
    prefix_match=MatchScope.LM_HEAD,
    byte_match=MatchScope.YES,
    magikarp=True,
    new_vocab_noise=0.01,
    new_vocab_scale=0.5,
    pad_vocab_to_multiple_of=64,
    batch_size=128,
    dtype="bfloat16",
    seed=7,
)


def test_recipe_yaml_round_trips_every_option(tmp_path):
    path = write_recipe(tmp_path, recipe_yaml(FULL_OPTIONS))
    assert load_recipe(path).written == FULL_OPTIONS


def test_recipe_of_default_options_names_only_models_and_method():
    options = TransplantOptions(base_model="a", donor="b")
    assert recipe_dict(options) == {"base_model": "a", "donor": "b", "method": "auto"}


def test_yaml_yes_and_no_are_match_scopes(tmp_path):
    path = write_recipe(tmp_path, "base_model: a\ndonor: b\nbyte_match: yes\nprefix_match: no\n")
    options = load_recipe(path).written
    assert options.byte_match is MatchScope.YES
    assert options.prefix_match is MatchScope.NO


@pytest.mark.parametrize(
    "text,expected",
    [
        ("base_model: a\ndonor: b\nmetod: omp\n", "unknown key 'metod' (did you mean 'method'?)"),
        (
            "base_model: a\ndonor: b\nembed: {methd: mean}\n",
            "unknown key 'embed.methd' (did you mean 'method'?)",
        ),
        ("base_model: a\n", "missing key 'donor'"),
        ("base_model: a\ndonor: b\nmagikarp: maybe\n", "magikarp: Input should be a valid boolean"),
        (
            "base_model: a\ndonor: b\nbyte_match: sometimes\n",
            "byte_match: Input should be 'no', 'yes', 'embed' or 'lm_head'",
        ),
        (
            "base_model: a\ndonor: b\nmethod: omp\nparameters: {k: many}\n",
            "parameters.k: Input should be a valid integer",
        ),
        (
            "base_model: a\ndonor: b\nmethod: omp\nparameters: {kk: 3}\n",
            "parameters.kk: method 'omp' takes no such parameter (did you mean 'k'?)",
        ),
        (
            "base_model: a\ndonor: b\nlm_head: {method: omp, parameters: {k: x}}\n",
            "lm_head.parameters.k: Input should be a valid integer",
        ),
        (
            "base_model: a\ndonor: b\nmethod: magic\n",
            "method: unknown approximation method 'magic'",
        ),
        (
            "base_model: a\ndonor: b\nembed: {method: magic}\n",
            "embed.method: unknown approximation",
        ),
        ("- base_model: a\n", "a recipe is a mapping of keys, got list"),
        ("base_model: [a\n", "not valid YAML"),
        ("", "the file is empty"),
        ("merge_method: linear\nmodels: []\n", "run it with mergekit-omp-merge"),
    ],
)
def test_bad_recipes_get_one_line_naming_the_key(tmp_path, text, expected):
    assert expected in recipe_error(tmp_path, text)


def test_relative_paths_are_read_beside_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "models" / "base").mkdir(parents=True)
    (tmp_path / "cwd" / "donor").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    path = write_recipe(tmp_path / "recipes", "base_model: models/base\ndonor: donor\n")
    loaded = load_recipe(path)
    assert loaded.options.base_model == str(tmp_path / "recipes" / "models" / "base")
    assert loaded.options.donor == "donor"  # not beside the recipe: the current directory's
    assert loaded.written.base_model == "models/base"  # as written, for the model card


def test_model_path_resolution_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M", tmp_path / "r") == (
        "HuggingFaceTB/SmolLM2-135M"
    )
    assert resolve_model_path("/abs/model", tmp_path / "r") == "/abs/model"
    assert resolve_model_path("./missing", tmp_path / "r") == str(tmp_path / "r" / "missing")


def test_bad_parameters_fail_before_any_model_is_read(tmp_path):
    message = recipe_error(
        tmp_path,
        "base_model: /no/such/base\ndonor: /no/such/donor\nmethod: omp\nparameters: {k: 0.5}\n",
    )
    assert message.startswith("parameters.k: Input should be a valid integer")


def test_recipe_command_reports_bad_recipe_on_one_line(tmp_path):
    path = write_recipe(tmp_path, "base_model: a\ndonor: b\nmetod: omp\n")
    result = CliRunner().invoke(recipe.main, [str(path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {path}: unknown key 'metod' (did you mean 'method'?); "
        f"{tmp_path / 'out'} was left as it was"
    )
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_param_before_reading_models(tmp_path):
    result = CliRunner().invoke(
        cli.main,
        ["/no/such/base", "/no/such/donor", str(tmp_path / "out"), "-a", "omp", "-p", "k=x"],
    )
    assert result.exit_code == 2  # a value of the command line of the wrong type
    assert "parameters.k: Input should be a valid integer" in result.stderr


def test_print_recipe_gives_the_options_of_the_command_line(tmp_path):
    args = ["base", "org/donor", str(tmp_path / "out"), "-k", "16", "-bm", "embed", "-pm", "yes"]
    args += ["--magikarp", "--dtype", "float16", "--pad-vocab-to-multiple-of", "8"]
    args += ["-a", "omp", "--random-seed", "3", "--print-recipe"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# mergekit-omp-yaml THIS_FILE OUT")
    assert yaml.safe_load(result.stdout) == {
        "base_model": "base",
        "donor": "org/donor",
        "method": "omp",
        "parameters": {"k": 16},
        "prefix_match": True,
        "byte_match": "embed",
        "magikarp": True,
        "pad_vocab_to_multiple_of": 8,
        "dtype": "float16",
        "seed": 3,
    }
    assert not (tmp_path / "out").exists()


def load_tensors(directory: Path) -> dict:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_printed_recipe_builds_the_same_model_as_its_command_line(tmp_path, mixed_pair):
    base, donor = mixed_pair
    flags = ["-k", "8", "-bm", "yes", "--dtype", "float32", "--quiet"]
    from_cli = tmp_path / "from-cli"
    result = CliRunner().invoke(cli.main, [str(base), str(donor), str(from_cli), *flags])
    assert result.exit_code == 0, result.output
    printed = CliRunner().invoke(cli.main, [str(base), str(donor), "x", *flags, "--print-recipe"])
    path = write_recipe(tmp_path, printed.stdout)
    from_recipe = tmp_path / "from-recipe"
    result = CliRunner().invoke(recipe.main, [str(path), str(from_recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    cli_tensors, recipe_tensors = load_tensors(from_cli), load_tensors(from_recipe)
    assert cli_tensors.keys() == recipe_tensors.keys()
    for name, tensor in cli_tensors.items():
        assert tensor.equal(recipe_tensors[name]), name
    card_recipe = (from_recipe / "README.md").read_text().split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(card_recipe) == yaml.safe_load(printed.stdout)


def test_random_seed_applies_only_when_the_recipe_has_no_seed(tmp_path):
    without = recipe.with_seed(load_recipe(write_recipe(tmp_path, "base_model: a\ndonor: b\n")), 5)
    assert without.options.seed == 5 and without.written.seed == 5
    path = write_recipe(tmp_path, "base_model: a\ndonor: b\nseed: 2\n", "seeded.yml")
    assert recipe.with_seed(load_recipe(path), 5).options.seed == 2


@pytest.mark.parametrize(
    ("name", "base", "donor", "k"),
    [
        ("gemma-from-smollm.yml", "gemma-3-270m", "smollm2-135m", 64),
        ("smollm-from-gemma.yml", "smollm2-135m", "gemma-3-270m", 16),
    ],
)
def test_real_pair_recipes_point_into_the_asset_cache(
    name: str, base: str, donor: str, k: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = load_recipe(Path(__file__).parent.parent / "examples" / "real" / name)
    cache = tmp_path / ".cache" / "mergekit-omp" / "real"
    assert loaded.options.base_model == str(cache / base)
    assert loaded.options.donor == str(cache / donor)
    assert (loaded.options.method, loaded.options.parameters) == ("omp", {"k": k})
