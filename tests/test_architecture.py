"""The arrows between modules point one way: the math knows nothing of files or streams, no
module of a package reaches back to one that imports it, and measurement sits beside the engine,
never under it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "yalm_runner"
# Packages whose runtime imports must form no cycle.
ACYCLIC_PACKAGES = ["yalm_runner", "flows"]
BENCHMARKS = "yalm_runner.bench"
# The command line glues the parts together, ``yalm-runner bench`` included.
MAY_IMPORT_BENCHMARKS = {"yalm_runner.cli"}

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
        "kvstate",
        "fsutil",
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
        "kvstate",
    },
    # The second job on the core: the same rooms as generation's, and nothing of files.
    "scoring": {
        "checkpoint",
        "convert",
        "release",
        "tensorfile",
        "cli",
        "runner",
        "scorefile",
        "resume",
        "fsutil",
        "streaming",
        "offload",
        "multigpu",
        "kvcache",
        "model",
        "generation",
    },
    # The scoring pass the engine inherits: the model and the packing, nothing of files, jobs,
    # decoding or KV caches.
    "scorepass": {
        "engine",
        "checkpoint",
        "convert",
        "release",
        "tensorfile",
        "cli",
        "runner",
        "job",
        "generation",
        "scoring",
        "scorefile",
        "session",
        "kvcache",
        "kvstate",
        "sampling",
    },
    # How candidates are packed into rows: tensors only, nothing of weights or text.
    "packing": {"model", "engine", "checkpoint", "offload", "streaming", "session", "tokenizer"},
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
    # What a job records of its batches: nothing of files, engines or sinks.
    "batchplan": {"engine", "kvcache", "kvstate", "fsutil", "runner", "resume", "session"},
    # A batch in flight as data: nothing of files, caches or jobs.
    "batchstate": {"engine", "kvcache", "kvstate", "fsutil", "generation", "runner", "resume"},
    # Exact resume's files: the records of batchstate, nothing of the engine, caches or jobs.
    "kvstate": {"engine", "kvcache", "model", "generation", "runner", "session", "multigpu"},
    "checkpoint": {"offload", "engine", "cli", "runner", "convert"},
    "tensorfile": {"model", "checkpoint", "config", "offload", "engine"},
    # The compressed format of one matrix; stores and weight sources build on it.
    "quant": {"checkpoint", "offload", "streaming", "engine"},
    # The KV record format and its sizes; the caches that move records build on it, and the
    # planner and ``quality`` need only the format.
    "kvformat": {"kvcache", "pinned", "engine"},
    "planning": {"kvcache", "engine"},
    # Fused kernels: tensors in, tensors out; nothing of the formats' owners that call them.
    "kernels": {"kvformat", "kvcache", "quant", "engine", "model", "checkpoint", "offload"},
    # The step-time model counts and applies rates: nothing of devices, caches or the planner.
    "steptime": {"kvcache", "engine", "streaming", "offload", "planning", "pinned", "directio"},
    "quality": {"kvcache"},
    # The shipped tokenizer file and its checksum: no encoding, no stores.
    "vocab": {"tokenizer", "checkpoint", "model", "engine", "release", "convert", "cli"},
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


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every name ``path`` imports when it runs: at module level and inside functions, less the
    ``if TYPE_CHECKING:`` blocks (their ``else`` branches do run). ``from a import b`` gives
    ``a`` and ``a.b``; relative imports are resolved against the module's package."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports at run time."""
    paths = {module_name(path, root): path for path in (root / package).rglob("*.py")}
    return {
        module: {name for name in runtime_imports(path, root) if name in paths and name != module}
        for module, path in paths.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None (a depth-first walk;
    ``path`` is the walk's current chain of imports)."""
    done: set[str] = set()
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = walk(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for root in sorted(graph):
        cycle = walk(root)
        if cycle:
            return cycle
    return None


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_import_what_it_must_not_know(module):
    path = PACKAGE / f"{module}.py"
    imports = imported_modules(path if path.exists() else PACKAGE / module / "__init__.py")
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


@pytest.mark.parametrize("package", ACYCLIC_PACKAGES)
def test_no_module_of_the_package_imports_itself_back(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from loop.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from loop import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from loop.b import thing\n"  # not run: no edge
        "from . import a\n"
    )
    graph = import_graph("loop", tmp_path)
    assert graph["loop.c"] == {"loop", "loop.a"}
    assert find_cycle(graph) == ["loop.a", "loop.b", "loop.c", "loop.a"]
    (package / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import loop.a\n")
    assert find_cycle(import_graph("loop", tmp_path)) is None


def test_no_engine_module_imports_a_benchmark():
    engine = [
        path
        for path in [*PACKAGE.rglob("*.py"), *(ROOT / "flows").rglob("*.py")]
        if module_name(path).split(".")[:2] != BENCHMARKS.split(".")
        and module_name(path) not in MAY_IMPORT_BENCHMARKS
    ]
    bad = {
        module_name(path): sorted(
            name for name in runtime_imports(path) if name.split(".")[:2] == BENCHMARKS.split(".")
        )
        for path in engine
    }
    assert not {module: names for module, names in bad.items() if names}


FILE_AND_DATABASE_MODULES = {"os", "io", "json", "pathlib", "shutil", "sqlite3", "tempfile"}


@pytest.mark.parametrize("module", ["generation", "job"])
def test_the_job_core_touches_files_only_through_its_sinks(module):
    imports = imported_modules(PACKAGE / f"{module}.py")
    assert not {name.split(".")[0] for name in imports} & FILE_AND_DATABASE_MODULES
