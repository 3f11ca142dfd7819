"""The package import graph: dependencies flow one way (features → training → serving →
twincast) and no module imports itself back through others — function-local imports
included, since those are how cycles hide."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("features", "training", "serving", "twincast")
MAY_IMPORT = {
    "features": set(),
    "training": {"features"},
    "serving": {"features", "training"},
    "twincast": {"features", "training", "serving"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                # the longest known module the name points into
                parts = name.split(".")
                for k in range(len(parts), 0, -1):
                    target = ".".join(parts[:k])
                    if target in modules:
                        if target != mod:
                            graph[mod].add(target)
                        break
    return graph


def test_packages_depend_one_way():
    wrong = [(m, t) for m, targets in import_graph().items() for t in targets
             if t.split(".")[0] != m.split(".")[0]
             and t.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert wrong == [], f"imports against the layering: {wrong}"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t):], t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_serving_core_does_not_import_the_http_layer():
    """The API and the pages (both HTTP) import the service, never the other way round."""
    http = ("serving.api", "serving.ui")
    wrong = [(m, t) for m, ts in import_graph().items() if m.startswith("serving.")
             and not m.startswith((*http, "serving.bento")) for t in ts
             if t.startswith(http)]
    assert wrong == []


def test_the_graph_is_read_from_the_code():
    graph = import_graph()
    assert "serving.store" in graph["serving.writes"]
    assert "serving.config" in graph["twincast.settings"]
    assert not any(t.startswith("twincast") for t in graph["serving.core"])
