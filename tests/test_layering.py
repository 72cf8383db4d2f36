"""The package's imports follow its layers (docs/architecture.md): methods know nothing of
selection, evaluation or the pipeline; selection wraps methods and knows nothing of the
pipeline; only the commands import the evaluation and the commands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mergekit_omp

PACKAGE = Path(mergekit_omp.__file__).parent
METHOD_LAYER = {"approximators", "errors", "kernels", "match", "vocabulary"}
"""What approximators/ may import: the methods, their kernels and the vocabulary types."""
SELECTION_LAYER = METHOD_LAYER | {"select", "lm", "records"}
"""What select/ may import: the methods, how to run a model on a text, and the report's record
types (``records.py``, pydantic only: ``Choice`` is one)."""


def part_of(module: str) -> str:
    """The package's top-level module or package ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported mergekit_omp module, whether the import is at module level) of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(n, id(node) in top_level) for n in names if n.split(".")[0] == "mergekit_omp"]
    return found


def files_of(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def module_parts() -> dict[str, set[str]]:
    """Each file (relative path) -> the top-level parts it imports."""
    return {
        str(path.relative_to(PACKAGE)): {part_of(module) for module, _ in imports(path)}
        for path in sorted(PACKAGE.rglob("*.py"))
    }


@pytest.mark.parametrize(
    ("package", "allowed"), [("approximators", METHOD_LAYER), ("select", SELECTION_LAYER)]
)
def test_methods_and_selection_import_only_their_own_layers(package, allowed):
    assert files_of(package)
    for path in files_of(package):
        reached = {part_of(module) for module, _ in imports(path)} - allowed
        assert not reached, f"{path.relative_to(PACKAGE)} imports {sorted(reached)}"


@pytest.mark.parametrize("package", ["approximators", "select"])
def test_methods_and_selection_import_nothing_of_ours_inside_functions(package):
    for path in files_of(package):
        local = [module for module, at_top in imports(path) if not at_top]
        assert not local, f"{path.relative_to(PACKAGE)} imports {local} inside a function"


def test_only_the_commands_import_the_evaluation_and_the_commands():
    for path, parts in module_parts().items():
        top = path.split("/")[0].removesuffix(".py")
        if top in ("cli", "evaluate"):
            continue
        assert not parts & {"evaluate", "cli"}, (
            f"{path} imports {sorted(parts & {'evaluate', 'cli'})}"
        )


def test_the_entry_points_import_nothing_heavy_of_ours():
    """The console scripts' module runs before torch is imported (Ctrl-C there is one line):
    at module level it imports only the package (lazy), the error types and ``publish``."""
    path = PACKAGE / "cli" / "process.py"
    top_level = {module for module, at_top in imports(path) if at_top}
    assert top_level <= {"mergekit_omp", "mergekit_omp.errors"}, sorted(top_level)
    assert "from mergekit_omp import publish\n" in path.read_text(encoding="utf-8")


def test_the_checker_sees_a_layer_being_crossed(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mergekit_omp.evaluate.compare import x\n")
    assert imports(bad) == [("mergekit_omp.evaluate.compare", False)]
