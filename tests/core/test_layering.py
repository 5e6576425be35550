"""The one dependency rule of docs/architecture.md, checked on the source text:
`evomerge_core` never imports Prefect (nor the `evomerge.tasks` / `evomerge.flows` layers), and
`tasks/` never imports `flows/`. Function-local imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an `import` / `from ... import` in the file names, with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in _imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(folder.parent)}:{line} imports {module}")
    return bad


def test_core_never_imports_prefect_or_the_prefect_layers():
    assert list((ROOT / "evomerge_core").rglob("*.py")), "the core's sources were not found"
    assert _violations(ROOT / "evomerge_core", ("prefect", "prefect_dask", "evomerge", "tasks", "flows")) == []


def test_tasks_never_import_flows():
    assert list((ROOT / "tasks").rglob("*.py")), "the tasks' sources were not found"
    assert _violations(ROOT / "tasks", ("evomerge.flows", "flows")) == []


@pytest.mark.parametrize("source, expected", [
    ("import prefect\n", ["pkg/x.py:1 imports prefect"]),
    ("def f():\n    from prefect.runtime import flow_run\n", ["pkg/x.py:2 imports prefect.runtime"]),
    ("from evomerge_core import io\nimport prefectlike\nfrom . import prefect\n", []),
])
def test_the_check_sees_top_level_and_function_local_imports(tmp_path, source, expected):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "x.py").write_text(source)
    assert _violations(tmp_path / "pkg", ("prefect",)) == expected
