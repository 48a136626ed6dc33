"""The package's layering, read from its imports, and the map of the code in docs/development.md.

The tree reads engine / model / doors: the engine (``llm_worker/engine/``) knows nothing above it,
the model side (``llm_worker/model/``) knows no engine, ``Worker`` (``service.py``) imports no
door and no OpenAI shape, the OpenAI and Anthropic shapes (``llm_worker/openai/``,
``llm_worker/anthropic/``) are shared by the doors and import none, no door (``llm_worker/doors/``)
imports another, and no module imports one that imports it back."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_worker"
MODULES = sorted(
    path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__") for path in PACKAGE.rglob("*.py")
)
BASE = {"llm_worker", "llm_worker.errors", "llm_worker.settings", "llm_worker.logs", "llm_worker.schema"}
DOORS = {"llm_worker.doors.jobs", "llm_worker.doors.server", "llm_worker.doors.app", "llm_worker.doors.http", "llm_worker.doors.metrics"}
# the HTTP server's own parts: its process (server), its routes (app), what they share (http), its metrics
HTTP_SERVER = {
    "llm_worker.doors.server": {"llm_worker.doors.app", "llm_worker.doors.http"},
    "llm_worker.doors.app": {"llm_worker.doors.http", "llm_worker.doors.metrics"},
    "llm_worker.doors.http": {"llm_worker.doors.metrics"},
}
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def source(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> set[str]:
    """The project modules ``module`` imports at run time (``if TYPE_CHECKING:`` blocks excluded),
    as dotted names: ``from llm_worker.engine import Engine`` is ``llm_worker.engine``."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source(module).read_text()))
    return {name for name in found if name.split(".")[0] in ("llm_worker", "benchmarks")}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def in_package(package: str) -> list[str]:
    return [m for m in MODULES if within(m, package)]


@pytest.mark.parametrize("module", in_package("llm_worker.engine"))
def test_the_engine_imports_only_itself_the_model_side_and_the_base(module):
    above = {m for m in imports(module) if not (within(m, "llm_worker.engine") or within(m, "llm_worker.model") or m in BASE)}
    assert not above, f"{module} imports {above}"


@pytest.mark.parametrize("module", in_package("llm_worker.model"))
def test_the_model_side_imports_no_engine_worker_or_door(module):
    above = {m for m in imports(module) if not (within(m, "llm_worker.model") or m in BASE)}
    assert not above, f"{module} imports {above}"


def test_the_worker_imports_no_door_and_no_openai_shape():
    above = {m for m in imports("llm_worker.service") if within(m, "llm_worker.doors") or within(m, "llm_worker.openai")}
    assert not above


@pytest.mark.parametrize("module", in_package("llm_worker.openai") + in_package("llm_worker.anthropic"))
def test_the_openai_and_anthropic_shapes_import_no_door_and_need_no_worker_at_run_time(module):
    assert not {m for m in imports(module) if within(m, "llm_worker.doors") or m == "llm_worker.service"}


@pytest.mark.parametrize("door", sorted(DOORS))
def test_no_door_imports_another(door):
    others = DOORS - {door} - HTTP_SERVER.get(door, set())
    assert not imports(door) & others, door


def module_level_imports(module: str) -> set[str]:
    """The project modules ``module`` imports when it is imported: its top-level imports, those
    under ``if TYPE_CHECKING:`` too (a circle a type checker walks), and the packages around them."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If | ast.Try):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)

    visit(ast.parse(source(module).read_text()).body)
    parents = {".".join(name.split(".")[:i]) for name in found for i in range(2, name.count(".") + 1)}
    return {name for name in found | parents if name in MODULES and name != module and not within(module, name)}


def test_no_module_imports_one_that_imports_it_back():
    """No import circle in the package (``server`` -> ``app`` -> ``http`` -> ``server`` was one)."""
    graph = {module: module_level_imports(module) for module in MODULES}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return False

    circles = sorted((module, other) for module in MODULES for other in graph[module] if reaches(other, module))
    assert circles == []


@pytest.mark.parametrize("module", MODULES)
def test_the_serving_package_imports_no_benchmark_helper(module):
    assert not {m for m in imports(module) if within(m, "benchmarks")}


@pytest.mark.parametrize("module", MODULES)
def test_modules_and_classes_stay_small_enough_to_hold_in_mind(module):
    text = source(module).read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{module}.{node.name}: {length} lines"


def test_the_development_guide_maps_every_module_of_the_tree():
    guide = (ROOT / "docs" / "development.md").read_text()
    table = guide[guide.index("## What's where") : guide.index("\n## ", guide.index("## What's where") + 1)]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE):
        paths = re.findall(r"`([^`]+)`", cell)
        folder = paths[0].rpartition("/")[0] if paths else ""
        named.update(path if list(ROOT.glob(path)) else f"{folder}/{path}" for path in paths)  # `a/b.py`, `c.py`: a/c.py
    for path in named:
        assert list(ROOT.glob(path)), f"docs/development.md names {path}, which is not in the tree"
    files = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    covered = {file for file in files if any(ROOT.joinpath(file) in ROOT.glob(path) for path in named)}
    assert files == covered, f"modules missing from docs/development.md's map: {sorted(files - covered)}"


def test_the_server_entry_imports_neither_torch_nor_the_web_framework():
    """``python -m llm_worker.doors.server`` opens its port before the heavy imports: importing the
    entry module (a fresh interpreter) must not pull torch, transformers or FastAPI in."""
    probe = "import sys, llm_worker.doors.server; print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'peft') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
