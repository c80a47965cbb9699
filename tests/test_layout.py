"""The README's map is true. nas/ is in packages by pipeline step, stacked on floors: the
README's Layout gives each package a floor and names every module of it once, in its own
package's section; no module imports a module of a package on a higher floor; no two modules
import each other, directly or around a loop; every package says in its docstring what it
holds and what it may import. Imports inside functions and under TYPE_CHECKING count as well:
a late import is still a dependency. Reads source only, without torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = re.compile(r"^### (\d+)\. `(nas/(?:[a-z_]+/)?)`", re.M)
ROW = re.compile(r"^\| `(nas/[^`]+\.py)` \|", re.M)


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The package a module belongs to for the floors: `nas.search` for nas.search.trial and
    nas.search.schedule.policy, `nas` for the top-level shims."""
    parts = module.split(".")
    return (
        ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and _is_package(parts)) else "nas"
    )


def _is_package(parts: list[str]) -> bool:
    return (ROOT.joinpath(*parts) / "__init__.py").is_file()


def floors_of_readme(text: str) -> dict[str, int]:
    """{module: floor} from the README's Layout section: each module on its package's floor."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    headings = list(FLOOR.finditer(section))
    floors: dict[str, int] = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        end = following.start() if following else len(section)
        package = heading.group(2).rstrip("/").replace("/", ".")
        for path in ROW.findall(section, heading.end(), end):
            name = module_name(path)
            assert name not in floors, f"README's module map names {path} twice"
            assert package_of(name) == package, f"{path} is listed under {package}"
            floors[name] = int(heading.group(1))
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
    source.write_text(
        "def f():\n    from nas.search.record import TrialRecord\n    import nas.core.errors\n"
    )
    assert imports_of(source, {"nas.search.record", "nas.core.errors", "nas.search.space"}) == {
        "nas.search.record",
        "nas.core.errors",
    }
    graph = import_graph()
    name, imported = next((n, sorted(i)[0]) for n, i in sorted(graph.items()) if i)
    graph[imported] = graph[imported] | {name}
    assert [imported, name, imported] in loops(graph) or [name, imported, name] in loops(graph)


def test_every_package_says_what_it_holds_and_may_import():
    packages = sorted(p for p in (ROOT / "nas").rglob("__init__.py") if p.parent != ROOT / "nas")
    silent = [
        str(p.relative_to(ROOT))
        for p in packages
        if not re.search(
            r"\b(may import|imports nothing|no training)",
            ast.get_docstring(ast.parse(p.read_text())) or "",
            re.I,
        )
    ]
    assert packages and silent == []


def test_a_package_stays_on_its_floor():
    """Every module of a package has the package's floor; the floors rise from nas.core."""
    floors = floors_of_readme((ROOT / "README.md").read_text())
    by_package: dict[str, set[int]] = {}
    for name, floor in floors.items():
        by_package.setdefault(package_of(name), set()).add(floor)
    assert all(len(f) == 1 for f in by_package.values()), by_package
    assert min(floors, key=floors.get).startswith("nas.core")


def test_no_function_in_nas_is_longer_than_60_lines():
    """A function a reader can hold in view; longer ones are split into named steps."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for path in sorted((ROOT / "nas").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_no_module_in_nas_is_longer_than_400_lines():
    """A module with one job fits a sitting; a longer one holds several jobs to part."""
    long = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in sorted((ROOT / "nas").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > 400
    ]
    assert long == []


def test_the_tests_mirror_the_packages():
    """tests/ has a folder per package of nas/ (and one for the commands), each holding only
    test modules, so a package's tests are found beside its name; only the tests of the
    repository itself (this map, CI) stay at the top."""
    packages = {p.parent.name for p in (ROOT / "nas").glob("*/__init__.py")}
    folders = {p.parent.name for p in (ROOT / "tests").glob("*/__init__.py")}
    assert packages <= folders, f"packages without a tests/ folder: {sorted(packages - folders)}"
    assert folders - packages == set(), "tests/ folders that mirror no package"
    top = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert top == ["test_ci.py", "test_layout.py"]
    for folder in folders:
        assert list((ROOT / "tests" / folder).glob("test_*.py")), f"tests/{folder}/ is empty"
