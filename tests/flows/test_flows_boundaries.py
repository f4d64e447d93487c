"""The pipeline's library modules stay plain: no model, no torch, no Prefect inside them.

Only the glue may reach out: the command line and the generation and scoring jobs to the model
runner (the jobs through the session and the runner's job cores only), and the flow module and
its link to the server (``prefect_link``) to Prefect. One exception, by design: the config
module imports ``yalm_runner.settings`` (and nothing else of the runner), because the YAML's
``generation:`` section is the runner's settings, defined once for both front ends; that module
is pure Python and pydantic (no torch, no model), and a test below keeps it so.
"""

from __future__ import annotations

import ast
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[2] / "flows"
FORBIDDEN = ("yalm_runner", "torch", "prefect")
GLUE = {
    # prefect.settings only: whether a Prefect server is configured (after the preflight)
    "commands/cli.py": {"yalm_runner", "prefect"},
    "commands/demo.py": {"yalm_runner"},
    "generation/forecasting.py": {"yalm_runner", "torch"},
    "generation/signals.py": {"yalm_runner"},
    "generation/model.py": {"yalm_runner"},
    "night/preflight.py": {"yalm_runner"},
    "night/steps.py": {"yalm_runner"},
    "pipeline.py": {"yalm_runner", "prefect"},
    # The flow's link to the server: its views (tags, progress) and going on without it
    "prefect_link.py": {"prefect"},
}
# Library modules that may import exactly these runner modules (not the whole runner).
RUNNER_MODULES = {"config.py": {"yalm_runner.settings"}}


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
        allowed = GLUE.get(str(path.relative_to(FLOWS)), set())
        light = RUNNER_MODULES.get(str(path.relative_to(FLOWS)), set())
        for name in imported_modules(path) - light:
            if name.split(".")[0] in FORBIDDEN and name.split(".")[0] not in allowed:
                offenders.append(f"{path.relative_to(FLOWS)} imports {name}")
    assert offenders == []


# The engine's own rooms: the pipeline opens a session (``yalm_runner.session``) and runs jobs
# (``yalm_runner.generation``, ``yalm_runner.scoring``) in it, and reaches nothing behind them.
ENGINE_INTERNALS = ("engine", "multigpu", "streaming", "kvcache", "model", "job", "runner",
                    "packing", "scorefile")  # fmt: skip


def test_flows_reach_the_engine_only_through_the_session_and_the_job():
    offenders = []
    for path in sorted(FLOWS.rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "yalm_runner" and len(parts) > 1 and parts[1] in ENGINE_INTERNALS:
                offenders.append(f"{path.relative_to(FLOWS)} imports {name}")
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(FLOWS)}: {word}" for word in (".snapshot(", ".engines")
                      if word in text]  # fmt: skip
    assert offenders == []


def test_every_module_opens_with_a_docstring():
    missing = [
        str(path.relative_to(FLOWS))
        for path in sorted(FLOWS.rglob("*.py"))
        if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None
    ]
    assert missing == []


def test_the_settings_module_the_config_imports_loads_no_torch_or_engine():
    import subprocess
    import sys

    probe = (
        "import sys, flows.config; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] in "
        "('torch', 'prefect') or name.startswith('yalm_runner.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['yalm_runner.errors', 'yalm_runner.settings']"
