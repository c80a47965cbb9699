"""The README's module map is true: it names every module of nas/ once, on one floor; no
module imports one on a higher floor; and no two modules import each other, directly or
around a loop. Imports inside functions and under TYPE_CHECKING count as well: a late
import is still a dependency. Reads source only, without torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = re.compile(r"^### (\d+)\. ", re.M)
ROW = re.compile(r"^\| `(nas/[^`]+\.py)` \|", re.M)


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floors_of_readme(text: str) -> dict[str, int]:
    """{module: floor} from the README's Layout section."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    headings = list(FLOOR.finditer(section))
    floors: dict[str, int] = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        end = following.start() if following else len(section)
        for path in ROW.findall(section, heading.end(), end):
            assert path not in floors, f"README's module map names {path} twice"
            floors[module_name(path)] = int(heading.group(1))
    return floors


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of nas that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & modules
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(str(p.relative_to(ROOT))): p for p in (ROOT / "nas").rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import loop once, as the path that closes it."""
    found, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                found.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_the_readme_names_every_module_on_one_floor():
    floors = floors_of_readme((ROOT / "README.md").read_text())
    modules = set(import_graph())
    assert sorted(modules - set(floors)) == [], "modules missing from README's Layout"
    assert sorted(set(floors) - modules) == [], "README's Layout names modules that do not exist"
    assert set(floors.values()) == set(range(1, max(floors.values()) + 1))


def test_no_module_imports_one_on_a_higher_floor():
    floors = floors_of_readme((ROOT / "README.md").read_text())
    upward = [
        f"{name} (floor {floors[name]}) imports {imported} (floor {floors[imported]})"
        for name, imported_set in import_graph().items()
        for imported in sorted(imported_set)
        if floors.get(imported, 0) > floors.get(name, 0)
    ]
    assert upward == []


def test_no_two_modules_import_each_other():
    assert loops(import_graph()) == []


def test_the_checks_see_a_late_import_and_a_loop(tmp_path):
    """The checks would fail on code that breaks the map: an import inside a function is
    found, and an import added back from below closes a loop."""
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from nas.record import TrialRecord\n    import nas.errors\n")
    assert imports_of(source, {"nas.record", "nas.errors", "nas.space"}) == {
        "nas.record",
        "nas.errors",
    }
    graph = import_graph()
    name, imported = next((n, sorted(i)[0]) for n, i in sorted(graph.items()) if i)
    graph[imported] = graph[imported] | {name}
    assert [imported, name, imported] in loops(graph) or [name, imported, name] in loops(graph)


def test_no_function_in_nas_is_longer_than_80_lines():
    """A function a reader can hold in view; longer ones are split into named steps."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for path in sorted((ROOT / "nas").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
