"""How a recipe walks through bitsmith's modules: the floors of the import graph (a module's floor is one more than
the highest floor it imports; modules importing nothing of bitsmith are floor 0) and, over a traced
``bitsmith run RECIPE --smoke``, every call from one bitsmith module into another, counted as a *climb* when the
callee sits on a higher floor than the caller (code calling back up into the modules that import it).

    python benchmarks/import_floors.py [RECIPE ...]       # prints a table; --src DIR measures another checkout

Used for issue 39's target (a recipe's walk goes down the floors); run it on two checkouts to compare.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path


def import_graph(src: Path) -> dict[str, set[str]]:
    """The import graph of ``src`` with packages (tests/test_imports.py builds it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_imports import import_graph as graph_of

    return graph_of(src, packages=True)


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    @functools.cache
    def floor(module: str, seen: frozenset[str] = frozenset()) -> int:
        below = [floor(t, seen | {module}) for t in graph[module] if t not in seen and t != module]
        return 1 + max(below) if below else 0

    return {module: floor(module) for module in graph}


def walk(recipe: str, src: Path, floor_of: dict[str, int], first: int = 400) -> dict[str, int]:
    """Trace ``bitsmith run recipe --smoke``: module-to-module calls, climbs (and those in the first ``first``
    calls), calls from other modules back into ``bitsmith.run``, and the most frequent climbs."""
    sys.path.insert(0, str(src))
    from collections import Counter

    from bitsmith.cli import main

    calls, climbs, early, into_run = 0, 0, 0, 0
    pairs: Counter[tuple[str, str]] = Counter()
    back: list[str] = []

    def profile(frame, event, arg):  # noqa: ANN001, ANN202
        nonlocal calls, climbs, early, into_run
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if callee == caller or callee not in floor_of or caller not in floor_of:
            return
        calls += 1
        if callee == "bitsmith.run":
            into_run += 1
            back.append(f"{caller.removeprefix('bitsmith.')}->{frame.f_code.co_name}")
        if floor_of[callee] > floor_of[caller]:
            climbs += 1
            early += calls <= first
            pairs[(caller, callee)] += 1

    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(profile)
        try:
            main(["run", recipe, "--out", out, "--smoke"])
        finally:
            sys.setprofile(None)
    top = ", ".join(
        f"{a.removeprefix('bitsmith.')}->{b.removeprefix('bitsmith.')} {n}" for (a, b), n in pairs.most_common(6)
    )
    return {"calls": calls, "climbs": climbs, f"climbs_in_first_{first}": early, "calls_back_into_run": into_run, "back_into_run": ", ".join(back),
            "top_climbs": top}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["recipes/cnn-ptq-w8a8.yaml"])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent / "src")
    args = parser.parse_args()
    floor_of = floors(import_graph(args.src))
    print(f"{len(floor_of)} modules, {max(floor_of.values()) + 1} floors; run.py on floor {floor_of['bitsmith.run']}")
    for recipe in args.recipes:
        print(recipe, walk(recipe, args.src, floor_of))


if __name__ == "__main__":
    main()
