"""The house's layering, read from the source: no import circles anywhere in the three packages, models and
tasks never reach into the harness, and bench's rooms depend one way (cli -> running -> measuring; analysing
reads only the store from running; every room may use the shared vocabulary, bench.cells and bench.metrics).
Imports under `if TYPE_CHECKING:` are annotations only, never run, and are not edges."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "tasks", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of the tree except those under an `if TYPE_CHECKING:` block."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports when it runs (at any depth of its code, not only at the top)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None (a package importing its own modules is not one)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a module importing its own package's __init__
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_there_are_no_import_circles():
    assert cycle(import_graph()) is None


def test_type_checking_imports_are_not_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nimport a\n"
                     "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n")
    imported = {alias.name for node in runtime_nodes(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported == {"a", "c"}


def test_the_circle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_models_and_tasks_never_import_the_harness_but_its_metric_names():
    """Tasks write metrics, so they may name them from bench.metrics, a leaf that imports nothing of the project."""
    graph = import_graph()
    allowed = {"models": (), "tasks": ("bench.metrics",)}
    offenders = {m: sorted(t for t in ts if t.startswith("bench") and t not in allowed[m.split(".")[0]])
                 for m, ts in graph.items() if m.startswith(("models", "tasks"))}
    assert not {m: ts for m, ts in offenders.items() if ts}
    assert graph["bench.metrics"] == set()


def test_bench_rooms_depend_one_way():
    graph = import_graph()
    shared = ("bench.cells", "bench.metrics")
    allowed = {"bench.running": ("bench.running", "bench.measuring", *shared),
               "bench.measuring": ("bench.measuring", *shared),
               "bench.analysing": ("bench.analysing", "bench.running.store", *shared)}
    wrong = {}
    for room, ok in allowed.items():
        for module, targets in graph.items():
            if module.startswith(room + ".") or module == room:
                bad = sorted(t for t in targets if t.startswith("bench.") and not t.startswith(ok))
                if bad:
                    wrong[module] = bad
    assert not wrong
