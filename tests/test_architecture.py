"""The floors look down only: utils < toyworld < editors < runs < the entry scripts (docs/ARCHITECTURE.md).

Every import of every module is read from its source (function-level imports included), so a
dependency cannot hide inside a function.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ("utils", "toyworld", "editors", "runs")  # each may import itself and the ones before it
ENTRY_MODULES = ("train_vllm_editor", "test_vllm_edit", "run_demo", "run_tables")


def project_imports(path: str) -> set[str]:
    """Top-level names of the project packages / entry modules that `path` imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their own package
        found |= {name.split(".")[0] for name in names} & set(FLOORS + ENTRY_MODULES)
    return found


def package_files(package: str) -> list[str]:
    out = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(out)


@pytest.mark.parametrize("package", FLOORS)
def test_a_floor_imports_only_itself_and_the_floors_below(package):
    allowed = set(FLOORS[:FLOORS.index(package) + 1])
    files = package_files(package)
    assert files, f"no Python files under {package}/"
    wrong = {os.path.relpath(p, ROOT): sorted(project_imports(p) - allowed) for p in files}
    assert not {p: names for p, names in wrong.items() if names}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from editors import load_editor\n    import runs.training\n")
    assert project_imports(str(source)) == {"editors", "runs"}
