"""bnmove's packages form layers that only point down, and no module imports itself in a loop.

Every ``import`` of a bnmove module is read from the source (the ast, lazy imports inside
functions included), so a new upward import fails here before it becomes a cycle at run time.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

import bnmove

ROOT = Path(bnmove.__file__).parent

#: lowest first; a package may import its own layer's packages and every layer below
LAYERS: list[set[str]] = [
    {"errors", "core"},
    {"analysis"},
    {"rules"},
    {"moving", "fitting", "io"},
    {"pipeline"},
    {"study", "deploy"},
    {"sample_models", "report", "demo"},
    {"cli"},
    {"__init__", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_edges(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> the bnmove modules it imports`` (``from . import x`` names module ``x`` where it is one)."""
    modules = _modules(root)
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnmove"):
                target = str(node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("bnmove"):
                        edges[name].add(alias.name)
                continue
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                edges[name].add(full if full in modules else target)
    return edges


def layer_of(module: str) -> str:
    """``bnmove.analysis.detect`` -> ``analysis``; ``bnmove`` (its ``__init__``) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} imports {target}"
        for source, targets in edges.items()
        for target in targets
        if LEVEL[layer_of(target)] > LEVEL[layer_of(source)]
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan); a package's ``__init__``
    importing its own modules is not a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def package_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    packages: dict[str, set[str]] = collections.defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            if layer_of(source) != layer_of(target):
                packages[layer_of(source)].add(layer_of(target))
    return cycles(packages)


def test_every_package_has_a_layer() -> None:
    assert {layer_of(m) for m in _modules(ROOT)} <= set(LEVEL)


def test_no_import_points_up() -> None:
    assert upward_imports(import_edges()) == []


def test_no_module_or_package_imports_itself_in_a_loop() -> None:
    edges = import_edges()
    assert cycles(edges) == []
    assert package_cycles(edges) == []


@pytest.mark.parametrize(
    ("files", "upward", "loops"),
    [
        (
            {"core/a.py": "from ..analysis import b\n", "analysis/b.py": ""},
            ["bnmove.core.a imports bnmove.analysis.b"],
            [],
        ),
        (
            {
                "moving/a.py": "from ..fitting.b import f\n",
                "fitting/b.py": "def f(): from ..moving import a\n",
            },
            [],
            [["bnmove.fitting.b", "bnmove.moving.a"]],
        ),
        ({"moving/a.py": "from ..analysis import b\n", "analysis/b.py": "import torch\n"}, [], []),
    ],
)
def test_the_checks_catch_what_they_claim(
    tmp_path: Path, files: dict[str, str], upward: list[str], loops: list[list[str]]
) -> None:
    package = tmp_path / "bnmove"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    edges = import_edges(package)
    assert upward_imports(edges) == upward
    assert cycles(edges) + package_cycles(edges) == [
        *loops,
        *([[layer_of(m) for m in group] for group in loops] if loops else []),
    ]
