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
