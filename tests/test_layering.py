"""Imports run downward: tools/ → train/ → models/, pipelines/ → common/ (docs/architecture.md: layout). Read from
the source (every import statement, lazy ones too), so a new upward import fails here."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "pipelines", "models", "train", "tools")
MAY_IMPORT = {"common": {"common"}, "pipelines": {"common", "pipelines"}, "models": {"common", "models"},
              "train": {"common", "pipelines", "models", "train"}, "tools": set(PACKAGES)}


def our_imports(path: Path) -> set[str]:
    """The packages of this repository that a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_downward(package):
    upward = {str(path.relative_to(REPO)): sorted(our_imports(path) - MAY_IMPORT[package])
              for path in sorted((REPO / package).rglob("*.py"))}
    assert {path: names for path, names in upward.items() if names} == {}


# ---------------------------------------------------------------------------------------------
# No import cycle anywhere: every file's imports, lazy ones too, resolved to the files they load

def module_files() -> dict[str, Path]:
    """Module name → file, for every Python file of the project (tests by their bare names too:
    pytest puts tests/ on the path)."""
    modules = {}
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0] not in (*PACKAGES, "tests"):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
        if parts[0] == "tests" and len(parts) > 1:
            modules[".".join(parts[1:])] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports: `import a.b` loads a.b; `from a.b import c` loads a.b.c
    when c is a module, else a.b (package parents are not counted: they do not close a loop)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {name for name in found if name in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere():
    modules = module_files()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
