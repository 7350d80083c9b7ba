"""The house's layers (docs/architecture.md): every import inside canvaslm goes down or stays on its floor, and no
two modules import each other, even through others (imports inside functions count: they run all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import canvaslm

PACKAGE = Path(canvaslm.__file__).parent
# bottom to top; a module may import modules of its own floor or of a lower one
FLOORS = [
    {"errors", "hardware", "knobs", "cli_args", "plotting"},
    {"models"},
    {"checkpoints", "diffusion"},
    {"engine"},
    {"loading", "canvas_view", ""},  # "" is the package face: canvaslm.load and LM
    {"server", "sudoku"},
    {"train"},
    {"bench"},
    {"cli"},
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """canvaslm module -> the canvaslm modules it imports (a name imported from a package counts as the module
    of that name when there is one, else as the package)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "canvaslm":
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    edges[module].add(name if name in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name.split(".")[0] == "canvaslm")
    return edges


def _floor(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    return next((i for i, floor in enumerate(FLOORS) if room in floor), len(FLOORS))  # no floor: see below


def test_every_import_goes_down_or_stays_on_its_floor():
    up = sorted(f"{a} -> {b}" for a, targets in _imports().items() for b in targets if _floor(b) > _floor(a))
    assert not up, "imports that run back up:\n" + "\n".join(up)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One path per back edge of a depth-first walk: each closes a circle of imports."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack = stack + [module]
        for target in sorted(edges.get(module, ())):
            if target == module or target not in edges:
                continue
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    return circles


def test_the_circle_finder_finds_circles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _circles(edges) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_imports_itself_through_others():
    circles = _circles(_imports())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_every_room_has_a_floor():
    rooms = {m.split(".")[1] if "." in m else "" for m in _imports()}
    assert rooms <= set().union(*FLOORS), f"rooms without a floor: {rooms - set().union(*FLOORS)}"
