"""The pipeline's library modules stay plain: no model, no torch, no Prefect inside them."""

from __future__ import annotations

import ast
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[2] / "flows"
# Only the command line glues the pipeline to the model runner.
GLUE = {"cli.py"}
FORBIDDEN = ("yalm_runner", "torch", "prefect")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_library_modules_import_no_model_torch_or_prefect():
    offenders = []
    for path in sorted(FLOWS.rglob("*.py")):
        if path.name in GLUE:
            continue
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.relative_to(FLOWS)} imports {name}")
    assert offenders == []


def test_every_module_opens_with_a_docstring():
    missing = [
        str(path.relative_to(FLOWS))
        for path in sorted(FLOWS.rglob("*.py"))
        if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None
    ]
    assert missing == []
