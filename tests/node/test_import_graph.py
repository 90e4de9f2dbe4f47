"""No import circle in ``dicom_node``, function-level imports included.

import-linter checks the layers from module-level imports (and lets modules of one layer import
each other); this reads every ``import`` statement of every module with :mod:`ast`, including
those inside functions, and looks for a strongly connected component. ``TYPE_CHECKING``
imports never run and are left out. ``from package import submodule`` is an edge to the
submodule: a submodule's import of its parent package always happens first and is no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "dicom_node").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``dicom_node`` modules ``module`` imports when it runs (any depth of the tree)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            targets = []
        for target in targets:
            if target.startswith("dicom_node"):
                found = owner(target)
                if found is not None and found != module:
                    out.add(found)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return circles


def test_the_checker_sees_a_circle_inside_functions(tmp_path: Path) -> None:
    files = {
        "dicom_node.x": "def f() -> None:\n    from dicom_node import y\n",
        "dicom_node.y": "import dicom_node.x\n",
        "dicom_node.z": "if TYPE_CHECKING:\n    from dicom_node.x import f\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / f"{name.rpartition('.')[2]}.py"
        path.write_text(text)
        modules[name] = path
    edges = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert edges == {
        "dicom_node.x": {"dicom_node.y"},
        "dicom_node.y": {"dicom_node.x"},
        "dicom_node.z": set(),
    }
    assert _circles(edges) == [["dicom_node.x", "dicom_node.y"]]


def test_no_import_circle_in_dicom_node() -> None:
    modules = _modules()
    assert len(modules) > 50
    edges = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, edges.values())) > 100  # the walk sees the imports at all
    assert _circles(edges) == []


def test_package_surfaces_resolve() -> None:
    """Every name of a package's ``__all__`` is there (the lazy ones load their module)."""
    import importlib

    for name in ("commands", "stages", "dicomweb", "web"):
        package = importlib.import_module(f"dicom_node.{name}")
        for attribute in package.__all__:
            assert getattr(package, attribute) is not None, (name, attribute)


def test_the_outputs_process_imports_stay_light() -> None:
    """The spawned outputs process imports ``stages.outputs``: not the network, HTTP or
    database stacks the other stages bring (the reason ``stages`` exports lazily)."""
    import subprocess
    import sys

    code = (
        "import sys, dicom_node.stages.outputs, dicom_node.dicomweb.stowrs; "
        "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'pynetdicom', 'dicom_node.net', "
        "'dicom_node.stages.process', 'dicom_node.dicomweb.router') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"
