"""The layers import one way, down (DESIGN.md): flows -> tasks -> alignflow.

    .venv/bin/python -m pytest -q tests/test_layers.py

Reads every module's imports (top-level and inside functions) from its source, so an import that only
runs on some path counts too: the core (`alignflow/`) imports no `tasks`, `flows` or `prefect`, and no
module of the three packages takes part in an import circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alignflow", "tasks", "flows")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module name `path` imports (relative imports resolved; `from a import b` counts a.b as well)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    """module -> the modules of the three packages it imports (a name resolved to its closest module)."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    return {name: {owner(i) for i in imports(name, path) if owner(i) and owner(i) != name}
            for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_core_imports_no_stage_layer_flow_or_prefect():
    known = modules()
    upward = [f"{name} imports {target}" for name, path in known.items() if name.split(".")[0] == "alignflow"
              for target in sorted(imports(name, path)) if target.split(".")[0] in ("tasks", "flows", "prefect")]
    assert not upward, "the core reaches up:\n" + "\n".join(upward)


def test_no_import_circles():
    found = circles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_see_what_they_guard():
    """The walk finds the imports it must: a circle made by hand is found, and the stage layer is seen importing
    the core (a walk that read nothing would pass both tests above)."""
    edges = graph()
    assert "alignflow.config" in edges["tasks.stages"] and "tasks.stages" in edges["flows.pipeline"]
    assert circles({**edges, "alignflow.config": edges["alignflow.config"] | {"alignflow.pins"},
                    "alignflow.pins": edges["alignflow.pins"] | {"alignflow.config"}})
    assert any(t.split(".")[0] == "prefect" for t in imports("tasks.host", modules()["tasks.host"]))
