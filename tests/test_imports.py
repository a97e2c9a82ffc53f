"""No import circles between bitsmith's modules (imports inside functions included; a package's ``__init__``, which
only re-exports, is left out, and so are ``if TYPE_CHECKING:`` imports, which name types for annotations and never
run): each module can be read knowing only the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"


def import_graph(src: Path = SRC, packages: bool = False) -> dict[str, set[str]]:
    """Module -> the bitsmith modules it imports (``packages``: the ``__init__`` modules too, named by their package;
    ``benchmarks/import_floors.py`` uses it so)."""
    files = {".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (src / "bitsmith").rglob("*.py") if packages or f.name != "__init__.py"}  # fmt: skip
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # annotation-only imports are cut out first
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_modules_import_each_other_without_circles() -> None:
    graph = import_graph()
    assert len(graph) > 100 and graph["bitsmith.cli"]  # the walk sees the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_a_circle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


FRONT_DOORS = {"bitsmith.cli", "bitsmith.cli_eval", "bitsmith.cli_scale", "bitsmith.tune", "bitsmith.sweep"}


def family(module: str) -> str | None:
    """The method family (``bitsmith.methods.FAMILY.*``) a module belongs to, or None for the core."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["bitsmith", "methods"] else None


def test_families_meet_only_through_the_core() -> None:
    """A family imports no other family; the core imports no family; a front door (the CLI, tuning, sweeps)
    imports from one family at most. What two families need lives in the core."""
    graph = import_graph()
    crossings = []
    for module, targets in graph.items():
        families = {family(t) for t in targets} - {None, family(module)}
        own = family(module)
        if own is not None and families:
            crossings.append(f"{module} (family {own}) imports family {sorted(families)}")
        elif own is None and module not in FRONT_DOORS and families:
            crossings.append(f"core module {module} imports family {sorted(families)}")
        elif module in FRONT_DOORS and len(families) > 1:
            crossings.append(f"{module} imports two families {sorted(families)}")
    assert not crossings, crossings
