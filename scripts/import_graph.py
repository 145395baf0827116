"""Print which rooms of the package import which (``python scripts/import_graph.py``), and fail on
a cycle between them.

A room is a subpackage of ``tnt_lightning`` (``engine``, ``methods``, ...) or a module at its root.
Imports are read from the source (``ast``), not by importing it; an import inside a function counts
too, since it is a dependency all the same. Exit status 1 when two rooms import each other, directly
or round a longer loop.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tnt_lightning"


def room_of(module: str) -> str:
    """``tnt_lightning.methods.tome`` -> ``methods``; ``tnt_lightning`` -> ``(package)``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The ``tnt_lightning`` modules ``path`` imports, relative imports resolved."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tnt_lightning")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                found |= set(names)
            elif node.module and node.module.startswith("tnt_lightning"):
                found.add(node.module)
    return found


def room_graph() -> dict[str, set[str]]:
    """Room -> the other rooms it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = room_of(module_name(path))
        graph[src]
        for target in imported_modules(path):
            dst = room_of(target)
            if dst != src and dst != "(package)":
                graph[src].add(dst)
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def main() -> int:
    graph = room_graph()
    width = max(map(len, graph))
    for room in sorted(graph, key=lambda r: (len(graph[r]), r)):
        print(f"{room:<{width}}  -> {', '.join(sorted(graph[room])) or '(nothing)'}")
    loops = cycles(graph)
    for group in loops:
        print(f"cycle: {' <-> '.join(group)}", file=sys.stderr)
    print(f"{len(graph)} rooms, {sum(map(len, graph.values()))} imports between them, {len(loops)} cycles")
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main())
