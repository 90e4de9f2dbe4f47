"""The shape of training/: no import circle (every import statement counts, function-level and
TYPE_CHECKING ones too), exactly one epoch loop, modules and classes of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "training"


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "training":
                found |= {a.name for a in node.names if a.name in modules}
            elif node.module.startswith("training."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("training.")}
    return found


def test_no_import_circle_in_training() -> None:
    trees = _trees()
    graph = {name: _imports(tree, set(trees)) - {name} for name, tree in trees.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, {name: sorted(graph[name]) for name in circles}


def test_exactly_one_epoch_loop() -> None:
    loops = [
        f"{name}:{node.lineno}"
        for name, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.For) and "epoch" in ast.unparse(node.target)
    ]
    assert loops and len(loops) == 1 and loops[0].startswith("fit:"), loops


def test_modules_and_classes_stay_readable() -> None:
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text().count("\n")
        assert lines <= 600, f"{path.name}: {lines} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size <= 300, f"{path.name}:{node.name}: {size} lines"
