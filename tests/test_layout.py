"""The code's shape (issue 32): no import cycle anywhere in engine/, lazy imports and those for
type checking included, and no class built on the server (an executor is given to it, never
made by overriding its methods)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, package: str, modules: set[str]) -> set[str]:
    """The engine modules a module's `source` imports, wherever in it (`from a import b`: the
    module a.b when it is one, else a); `package`: the one it is in, for relative imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]  # fmt: skip
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ENGINE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges[name] = imports(path.read_text(), package, set(files)) - {name}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, else None (a depth-first search)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_sees_lazy_and_relative_imports():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    source = "def f():\n    from engine.serve import server\n    from . import jobs, x\n"
    modules = {"engine.serve.server", "engine.serve", "engine.serve.jobs", "engine.devices"}
    assert imports(source, "engine.serve", modules) == {
        "engine.serve.server", "engine.serve.jobs", "engine.serve"
    }


def test_no_import_cycle_in_the_engine():
    edges = graph()
    assert "engine.serve.server" in edges and "engine.methods.pixel" in edges
    assert edges["engine.serve.cli"] >= {"engine.serve.cluster", "engine.serve.server"}  # lazy too
    assert cycle(edges) is None, " -> ".join(cycle(edges))


def test_no_class_subclasses_the_server():
    found = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
                if "Server" in bases:
                    found.append(f"{module_name(path)}.{node.name}")
    assert found == []
