"""The package's layering, read from its imports: the engine knows nothing above it, ``Worker``
(service) imports no door, and no door imports another."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm_worker"
ENGINE = {"engine", "scheduler", "kv_cache", "runner", "sampling", "text", "beam_search", "attention", "constraints"}
DOORS = {"jobs", "server"}  # the RunPod job door, the HTTP door
SHAPING = {"openai_api"}  # OpenAI's objects, shared by the doors
ABOVE_WORKER = DOORS | SHAPING | {"metrics"}


def imports(module: str) -> set[str]:
    """The llm_worker modules ``module`` imports at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "llm_worker":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("llm_worker."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("llm_worker."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.mark.parametrize("module", sorted(ENGINE))
def test_the_engine_imports_nothing_above_it(module):
    assert not imports(module) & (ABOVE_WORKER | {"service"})


def test_the_worker_imports_no_door():
    assert not imports("service") & ABOVE_WORKER


def test_no_door_imports_another():
    for door in DOORS:
        assert not imports(door) & (DOORS - {door}), door
    assert not imports("openai_api") & (DOORS | {"service"})
