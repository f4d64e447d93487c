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
    "engine": {
        "checkpoint",
        "convert",
        "release",
        "tensorfile",
        "cli",
        "runner",
        "job",
        "generation",
        "session",
    },
    # The job core: the loop and its sinks' interface, nothing of where results are kept
    # (files are the runner's and resume's, the database the pipeline's).
    "generation": {
        "checkpoint",
        "convert",
        "release",
        "tensorfile",
        "cli",
        "runner",
        "resume",
        "fsutil",
        "streaming",
        "offload",
        "planning",
        "multigpu",
        "kvcache",
        "model",
    },
    # What every job shares (signals, saving on the way out): nothing of engines or tokens.
    "job": {
        "model",
        "engine",
        "checkpoint",
        "offload",
        "streaming",
        "session",
        "multigpu",
        "tokenizer",
        "generation",
        "runner",
        "resume",
        "fsutil",
        "cli",
        "kvcache",
    },
    "sampling": {"model", "checkpoint", "offload", "engine"},
    "checkpoint": {"offload", "engine", "cli", "runner", "convert"},
    "tensorfile": {"model", "checkpoint", "config", "offload", "engine"},
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


def test_the_runner_never_imports_the_pipeline():
    for path in PACKAGE.rglob("*.py"):
        imports = imported_modules(path)
        assert not {
            name for name in imports if name.split(".")[0] in {"flows", "prefect", "sqlalchemy"}
        }, path


FILE_AND_DATABASE_MODULES = {"os", "io", "json", "pathlib", "shutil", "sqlite3", "tempfile"}


@pytest.mark.parametrize("module", ["generation", "job"])
def test_the_job_core_touches_files_only_through_its_sinks(module):
    imports = imported_modules(PACKAGE / f"{module}.py")
    assert not {name.split(".")[0] for name in imports} & FILE_AND_DATABASE_MODULES
