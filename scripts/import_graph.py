"""Figures on the internal import graph of finetune/ and reward/: cycles and imports written inside functions.

    python scripts/import_graph.py [REPO] [--list]

Counts every `import`/`from ... import` of our own modules, at module level and inside functions (imports
under `if TYPE_CHECKING:` are left out, as import-linter's `exclude_type_checking_imports` does), then the
strongly connected components of that graph: each component of more than one module is an import cycle.
`lint-imports` enforces the layers; this prints the numbers behind them.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("finetune", "reward")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for each internal import of one module."""

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), None)

    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            checking = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import | ast.ImportFrom) and not checking:
                if isinstance(child, ast.Import):
                    targets = {resolve(a.name) for a in child.names}
                else:
                    base = child.module or ""
                    if child.level:
                        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                        base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                    targets = {resolve(f"{base}.{a.name}") for a in child.names} - {None} or {resolve(base)}
                found.extend((t, in_function, child.lineno) for t in targets - {None, name})
            visit(child, function, checking)

    visit(ast.parse(path.read_text(encoding="utf-8")), False, False)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def main() -> None:
    root = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    known = modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    in_functions = []
    for name, path in known.items():
        graph[name]
        for target, in_function, line in imports(name, path, known):
            graph[name].add(target)
            if in_function:
                in_functions.append(f"{path.relative_to(root)}:{line} -> {target}")
    found = cycles(graph)
    print(f"modules: {len(known)}")
    print(f"internal imports inside functions: {len(in_functions)}")
    print(f"import cycles: {len(found)} ({', '.join(f'{len(c)} modules' for c in found) or 'none'})")
    if "--list" in sys.argv:
        print(*in_functions, sep="\n")
        for component in found:
            print("cycle:", " ".join(component))


if __name__ == "__main__":
    main()
