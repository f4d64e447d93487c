"""The arrows between modules point one way: the math knows nothing of files or streams."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "yalm_runner"

FORBIDDEN = {
    "model": {
        "checkpoint",
        "offload",
        "engine",
        "convert",
        "release",
        "tensorfile",
        "cli",
        "runner",
    },
    "engine": {"checkpoint", "convert", "release", "tensorfile", "cli", "runner"},
    "sampling": {"model", "checkpoint", "offload", "engine"},
    "checkpoint": {"offload", "engine", "cli", "runner", "convert"},
    "tensorfile": {"model", "checkpoint", "config", "offload", "engine"},
    # fetch: HTTP and files below, the release's layout beside, conversion above; only fetch
    # puts them together.
    "downloader": {"release", "checkpoint", "convert", "tensorfile", "model", "quant", "fetch"},
    "mirror": {"release", "checkpoint", "convert", "tensorfile", "model", "downloader", "fetch"},
    "release": {"downloader", "fetch", "mirror", "checkpoint", "convert"},
    "convert": {"downloader", "fetch", "mirror"},
    "fetch": {"mirror", "cli", "progress"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_import_what_it_must_not_know(module):
    imports = imported_modules(PACKAGE / f"{module}.py")
    bad = {name for name in FORBIDDEN[module] if f"yalm_runner.{name}" in imports}
    assert not bad, f"yalm_runner.{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", ["downloader", "mirror"])
def test_the_transport_knows_no_tensors(module):
    assert "torch" not in {
        name.split(".")[0] for name in imported_modules(PACKAGE / f"{module}.py")
    }


def test_the_runner_never_imports_the_pipeline():
    for path in PACKAGE.rglob("*.py"):
        imports = imported_modules(path)
        assert not {
            name for name in imports if name.split(".")[0] in {"flows", "prefect", "sqlalchemy"}
        }, path
