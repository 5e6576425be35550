"""The core's floor plan, checked on the source text (docs/architecture.md):

- no import cycle between modules of `evomerge_core` (module-level and function-level imports,
  relative imports resolved);
- no function-local import unless it defers a heavy or optional dependency and says so with a
  `# deferred: <reason>` comment on its line;
- at most eight modules at the top of `evomerge_core/`;
- every package under `evomerge_core/` is listed in pyproject's packages (a non-editable install
  would otherwise miss it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project runs on 3.11; 3.10 users have tomli through pip
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CORE = "evomerge_core"
MAX_TOP_MODULES = 8
DEFERRED_MARK = "# deferred:"


def _module_name(root: Path, path: Path) -> str:
    """`evomerge_core/runs/store.py` -> `evomerge_core.runs.store` (a package is its `__init__`)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path, package: str) -> dict[str, Path]:
    return {_module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The core modules one import statement loads (`from pkg import mod` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import mod` loads the module `pkg.mod`; `from pkg import name` reads pkg's namespace
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    found = []
    for name in names:
        # the deepest core module the name reaches (`a.b.c` where only `a.b` is a module -> `a.b`)
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
            # importing `a.b.c` first runs the `__init__` of each package above it that the
            # importing module is not itself inside (those are initialised before it runs)
            parts = name.split(".")
            found.extend(p for p in (".".join(parts[:i]) for i in range(1, len(parts)))
                         if p in known and not (module == p or module.startswith(p + ".")))
    return found


def _function_local(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside a function body (at any depth), not those at module or class level."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, inside)

    visit(tree, False)
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (never executed, so no cycle at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lines.add(sub.lineno)
    return lines


def import_graph(root: Path, package: str = CORE) -> dict[str, set[str]]:
    """Module -> the core modules it imports, anywhere in the file (TYPE_CHECKING blocks aside).

    Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`: an edge to each package that
    the importing module is not inside (a module's own parent packages are initialised before it
    runs, so `a/b/__init__` re-exporting `a.b.c`, which imports `a.b.d`, is no cycle).
    """
    modules = _modules(root, package)
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in skip:
                graph[module].update(_targets(node, module, path.name == "__init__.py", known))
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of two or more modules, as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_one_cycle(graph, set(c)) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, for the message."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)  # unreachable for a strongly connected component


def undeclared_local_imports(root: Path, package: str = CORE) -> list[str]:
    """`path:line: statement` for every function-local import without a `# deferred:` reason."""
    bad = []
    for path in _modules(root, package).values():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for node in _function_local(tree):
            text = lines[node.lineno - 1]
            reason = text.partition(DEFERRED_MARK)[2].strip()
            if not reason:
                bad.append(f"{path.relative_to(root)}:{node.lineno}: {text.strip()}")
    return bad


def test_no_import_cycles_between_core_modules():
    graph = import_graph(ROOT)
    assert len(graph) > 50, "the core's modules were not found"
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles in evomerge_core:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_say_why_they_are_deferred():
    bad = undeclared_local_imports(ROOT)
    assert bad == [], (
        "function-local imports without a `# deferred: <reason>` comment (move them to the top of "
        "the module, or say which heavy/optional dependency they defer):\n" + "\n".join(bad)
    )


def test_at_most_eight_modules_at_the_top_of_the_core():
    top = sorted(p.name for p in (ROOT / CORE).glob("*.py"))
    assert "__init__.py" in top, "the core's sources were not found"
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules at the top of {CORE}/: {top}"


def test_every_core_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {_module_name(ROOT, p) for p in (ROOT / CORE).rglob("__init__.py")}
    assert CORE in packages
    assert sorted(packages - listed) == [], "packages missing from pyproject's [tool.setuptools] packages"
    # a folder of modules without __init__.py would be a namespace package that setuptools skips
    folders = {p.parent for p in (ROOT / CORE).rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []


# --- the checks themselves, on small synthetic packages -------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_check_sees_relative_function_local_and_package_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import g\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "pkg/e.py": "from pkg.a import something\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.sub"}  # pkg.sub's init runs on the way
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.d"] == set()  # TYPE_CHECKING-only
    assert graph["pkg.e"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    del graph["pkg.c"]
    assert find_cycles(graph) == []


def test_the_cycle_check_sees_package_inits_run_on_the_way(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/gen/__init__.py": "from pkg.gen.loop import run\n",
        "pkg/gen/loop.py": "from pkg.gen.engine import step\n",
        "pkg/gen/engine.py": "",
        "pkg/user.py": "from pkg.gen.engine import step\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.gen.loop"] == {"pkg.gen.engine"}  # its own package's init ran before it
    assert graph["pkg.user"] == {"pkg.gen.engine", "pkg.gen"}
    assert find_cycles(graph) == []
    (tmp_path / "pkg/gen/engine.py").write_text("import pkg.user\n")  # engine <- pkg.gen init <- user
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.gen", "pkg.gen.loop", "pkg.gen.engine", "pkg.user", "pkg.gen"]]


@pytest.mark.parametrize("source, expected", [
    ("import os\n", []),
    ("class A:\n    import os\n", []),
    ("def f():\n    import os\n", ["pkg/x.py:2: import os"]),
    ("def f():\n    import os  # deferred:\n", ["pkg/x.py:2: import os  # deferred:"]),
    ("def f():\n    import jinja2  # deferred: only the card needs it\n", []),
    ("def f():\n    def g():\n        from . import y\n", ["pkg/x.py:3: from . import y"]),
])
def test_the_local_import_check_wants_a_reason(tmp_path, source, expected):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/x.py": source})
    assert undeclared_local_imports(tmp_path, "pkg") == expected


def test_the_public_generation_entry_points_keep_their_import_path():
    """`evomerge_core.generation.greedy_generate` (and its siblings) are public: user scorers
    import them from there, whatever module the loop lives in."""
    import evomerge_core.generation as generation
    from evomerge_core.generation.hf_loop import answer_logprobs, greedy_generate, truncate_at_stop

    assert generation.greedy_generate is greedy_generate
    assert generation.answer_logprobs is answer_logprobs
    assert generation.truncate_at_stop is truncate_at_stop
    assert truncate_at_stop("12\nrest", ["\n"]) == "12"
