"""Imports point downwards only: engine < resources < domain < assets < pipelines (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("dataworth", "resources", "domain", "assets", "pipelines")  # bottom to top
FORBIDDEN = {  # third-party packages a layer must not import
    "dataworth": {"dagster", "polars", "deltalake", "pandera", "mlflow", "domain", "resources"},
    "domain": {"dagster"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names that a module imports, at any depth of the module (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODULES = [(layer, path) for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))]


@pytest.mark.parametrize("layer, path", MODULES, ids=[str(p.relative_to(ROOT)) for _, p in MODULES])
def test_no_module_imports_a_layer_above_it(layer, path):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    imported = imported_packages(path)
    assert not imported & above, (
        f"{path.relative_to(ROOT)} ({layer}) imports {sorted(imported & above)} from a layer above"
    )
    assert not imported & FORBIDDEN.get(layer, set()), (
        f"{path.relative_to(ROOT)} imports {sorted(imported & FORBIDDEN[layer])}"
    )


def test_every_application_folder_is_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert packages == set(LAYERS)
