"""The notebooks run top to bottom (with small parameters) and are committed without outputs, and
the headless commands of notebooks/README.md work.

Each notebook runs in a fresh kernel on this interpreter (the project's venv), from notebooks/,
with its ``parameters`` cell overridden; a probe cell appended at the end prints the notebook's
results as JSON, and the tests check those and the outputs a reader sees.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from llm_worker.model.prompts import template_names

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "llm-worker-tests"
PROBE = "PROBE "


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernel spec that runs this interpreter, found first on JUPYTER_PATH; yields a setter for
    the kernel's environment (a kernel inherits the environment it is started in)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        patch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # a debugger warning on stderr, nothing else
        yield patch


def run_notebook(name: str, parameters: dict, probe: str) -> tuple[nbformat.NotebookNode, dict]:
    """Execute a notebook with ``parameters`` set after its ``parameters`` cell's own; return the
    executed notebook and the value of ``probe`` (an expression, JSON-encoded in the kernel)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = parameters_cell(nb)
    cell.source += "\n\n# set by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json, sys as _sys\nprint({PROBE!r} + _json.dumps({probe}))"))
    NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    found = text_of(nb.cells[-1]).split(PROBE, 1)[1]
    return nb, json.loads(found)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [cell for cell in nb.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    assert cells[0] is next(cell for cell in nb.cells if cell.cell_type == "code"), "parameters come first"
    return cells[0]


def text_of(cell: nbformat.NotebookNode) -> str:
    """What a reader sees of a cell's outputs: printed text and displayed Markdown/plain text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/markdown") or output.data.get("text/plain", ""))
    return "".join(parts)


def all_text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(text_of(cell) for cell in nb.cells if cell.cell_type == "code")


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def test_playground(kernel_env):
    nb, found = run_notebook(
        "01_playground.ipynb",
        {"MAX_NEW_TOKENS": 12, "TEMPERATURES": [0.0, 0.7], "TOP_PS": [0.9], "NUM_BEAMS": [1]},
        '{"executable": _sys.executable, "templates": [j["prompt_config"]["template"] for j in template_jobs],'
        ' "answers": [answer_text(r) for r in template_results], "grid": len(grid),'
        ' "sample_event": sample_event, "sample_answer": sample_answer,'
        ' "stream_event": stream_event, "streamed_answer": streamed_answer,'
        ' "dtype": str(loaded.dtype), "grid_answer": grid_answer}',
    )
    assert found["executable"] == sys.executable
    text = all_text(nb)
    # one question per template, in a table; the capital question is answered
    assert found["templates"] == template_names()
    assert "Paris" in found["answers"][0] and "| alpaca " in text
    assert sum("Paris" in answer for answer in found["answers"]) >= 3
    # "none" continues the text it is given: a sentence to complete, not a bare question
    assert "Paris" in found["answers"][found["templates"].index("none")]
    assert "`none` sends the text exactly as given" in "".join(cell.source for cell in nb.cells)
    # the 2x1x1 grid: greedy and seeded sampling
    assert found["grid"] == 2 and "num_beams=1" in text
    # the printed events parse back to what produced the answers (the notebook re-ran them)
    for event, answer in [(found["sample_event"], found["sample_answer"]), (found["stream_event"], found["streamed_answer"])]:
        printed = json.dumps(event, indent=2)
        assert printed in text and json.loads(printed) == event
        assert f"answer: {answer}" in text
        assert set(event) == {"input"} and event["input"]["generation_config"]["max_new_tokens"] == 12
    assert found["sample_event"]["input"]["generation_config"]["seed"] >= 0
    assert found["stream_event"]["input"]["stream"] is True and found["streamed_answer"] in text
    assert "curl -s -X POST" in text and "both events reproduce their answers" in text
    # the printed answer is the event's own, sent alone; only in fp32 is a batch sure not to change it
    # (the kernel inherits this process's DTYPE, so the dtype is whatever the tests run with)
    if found["dtype"] == "torch.float32":
        assert found["grid_answer"] == found["sample_answer"]
        assert "and in float32 the grid's answer, computed in a batch, is the same" in text


def test_finetune_lora(kernel_env, tmp_path):
    kernel_env.setenv("ADAPTER_DIR", str(tmp_path / "adapters"))
    nb, found = run_notebook(
        "02_finetune_lora.ipynb",
        # Two examples in batches of two: every step sees the same batch, so the loss must fall.
        {"TRAIN_EXAMPLES": 2, "BATCH_SIZE": 2, "STEPS": 6, "LEARNING_RATE": 3e-3, "EVAL_EXAMPLES": 3, "MAX_NEW_TOKENS": 16},
        '{"losses": losses, "adapter_path": str(adapter_path), "expected": expected, "train": train,'
        ' "held_out": held_out, "adapters": [r["adapter"] for r in results],'
        ' "accuracy": [base_accuracy, adapter_accuracy]}',
    )
    losses = found["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0] and min(losses[3:]) < min(losses[:3])
    adapter = Path(found["adapter_path"])
    assert adapter == tmp_path / "adapters" / "gsm8k" and (adapter / "adapter_config.json").is_file()
    assert not any(problem in found["train"] for problem in found["held_out"])
    assert len(found["expected"]) == 3 and all(number for number in found["expected"])
    assert found["adapters"] == [None] * 3 + ["gsm8k"] * 3
    assert images(nb) == 1  # the loss curve
    text = all_text(nb)
    assert "correct? (base / adapter)" in text and "base accuracy:" in text and "adapter accuracy:" in text


def test_throughput(kernel_env):
    nb, found = run_notebook(
        "03_throughput.ipynb",
        {"REQUESTS": 6, "SEQUENTIAL_REQUESTS": 2, "MAX_NEW_TOKENS": 16, "CONCURRENCY": [1, 4]},
        "rows",
    )
    assert [row["concurrency"] for row in found] == [1, 1, 4]
    assert found[0]["run"].startswith("seed") and [row["requests"] for row in found] == [2, 2, 6]
    assert all(row["tok_s"] > 0 for row in found)
    text = all_text(nb)
    assert all(f"| {row['run']} " in text for row in found)  # the table a reader sees
    assert images(nb) == 1  # throughput and latency, two subplots in one figure


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    parameters_cell(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} has outputs: clear them before committing "
                f"(jupyter nbconvert --clear-output --inplace {path.name})"
            )


def test_every_notebook_is_executed():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == [
        "01_playground.ipynb",
        "02_finetune_lora.ipynb",
        "03_throughput.ipynb",
    ]


# ---------------------------------------------------------------------------- notebooks/README.md
VENV_JUPYTER = ROOT / ".venv" / "bin" / "jupyter"
PROBE_CELL = """import sys
from pathlib import Path

Path("kernel.txt").write_text(sys.prefix)
print("ran")"""


def readme_command(start: str) -> str:
    """The command in notebooks/README.md (an indented line) that starts with ``start``."""
    lines = (NOTEBOOKS / "README.md").read_text().splitlines()
    (command,) = [line.strip() for line in lines if line.startswith("    " + start)]
    return command


@pytest.fixture
def probe_notebook(tmp_path) -> Path:
    """A one-cell notebook for the "llm-worker" kernel, as the real ones, that records the kernel's sys.prefix."""
    nb = nbformat.read(NOTEBOOKS / "01_playground.ipynb", as_version=4)
    nb.cells = [nbformat.v4.new_code_cell(PROBE_CELL)]
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    return path


def run_readme_command(command: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "JUPYTER_PATH"}  # only what make installed
    return subprocess.run(shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


needs_venv = pytest.mark.skipif(
    not VENV_JUPYTER.exists() or Path(sys.prefix) != ROOT / ".venv", reason="runs in the project's .venv (make test)"
)


@needs_venv
def test_jupyter_execute_runs_a_notebook_on_the_project_kernel_out_of_the_box(probe_notebook):
    command = readme_command(".venv/bin/jupyter execute").replace("notebooks/01_playground.ipynb", str(probe_notebook))
    done = run_readme_command(command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path((probe_notebook.parent / "kernel.txt").read_text()).resolve() == Path(sys.prefix).resolve()
    assert nbformat.read(probe_notebook, as_version=4).cells[0].outputs == []  # it saved nothing


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@needs_venv
def test_make_notebook_writes_an_executed_copy_and_the_clear_command_empties_it(probe_notebook, tmp_path):
    out = tmp_path / "executed"
    command = readme_command("make notebook NB=").replace("notebooks/01_playground.ipynb", str(probe_notebook))
    done = run_readme_command(f"{command} OUT={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    executed = out / probe_notebook.name
    assert "ran" in text_of(nbformat.read(executed, as_version=4).cells[0])
    assert nbformat.read(probe_notebook, as_version=4).cells[0].outputs == []

    clear = readme_command(".venv/bin/jupyter nbconvert --clear-output")
    done = run_readme_command(clear.replace("notebooks/*.ipynb", str(executed)))
    assert done.returncode == 0, done.stderr[-2000:]
    cell = nbformat.read(executed, as_version=4).cells[0]
    assert cell.outputs == [] and cell.execution_count is None
