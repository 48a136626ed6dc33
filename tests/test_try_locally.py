"""The README's "Try it locally" section: every command runs against the SDK's local API server and
prints the output shown under it (job ids aside)."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import API_SERVER_ARGS, FENCE, ROOT, post, uncached

README = ROOT / "README.md"
LOCAL = "http://localhost:8000"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def examples() -> tuple[str, list[tuple[str, str]]]:
    """The section's server command, and each other command with the output shown after it."""
    blocks = FENCE.findall(section("Try it locally"))
    assert [lang for lang, _ in blocks] == ["bash"] + ["bash", "json"] * ((len(blocks) - 1) // 2)
    commands = [body for _, body in blocks[1::2]]
    outputs = [body for _, body in blocks[2::2]]
    return blocks[0][1].strip(), list(zip(commands, outputs))


def without_ids(value):
    """The output with each job id replaced by its prefix (ids differ on every run)."""
    if isinstance(value, dict):
        return {key: item.split("-")[0] if key == "id" else without_ids(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_ids(item) for item in value]
    return value


def test_the_readme_starts_the_server_as_the_tests_do():
    server, _ = examples()
    assert shlex.split(server) == [".venv/bin/python", *API_SERVER_ARGS, "8000"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's commands use curl")
@pytest.mark.parametrize("index", range(4))
def test_each_command_prints_the_output_shown(api_server, index):
    url, _ = api_server
    _, pairs = examples()
    assert len(pairs) == 4, "a /runsync, a /run + /status, a /stream and a Python client example"
    command, shown = pairs[index]
    script = command.replace(LOCAL, url).replace(".venv/bin/python", shlex.quote(sys.executable))
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    assert uncached(without_ids(printed)) == uncached(without_ids(json.loads(shown)))
    if isinstance(printed, dict):
        assert printed["id"].startswith("test-")


def test_the_runpod_runsync_example_shows_what_the_worker_returns(api_server):
    """The deploy section's /runsync call, sent to the local server: the same job output."""
    url, _ = api_server
    blocks = FENCE.findall(section("Deploy on RunPod serverless"))
    index = next(i for i, (lang, body) in enumerate(blocks) if lang == "bash" and "/runsync" in body)
    event = json.loads(re.search(r"-d '(.*?)'", blocks[index][1], re.DOTALL).group(1))
    lang, shown = blocks[index + 1]
    assert lang == "json"
    assert uncached(post(f"{url}/runsync", event)["output"]) == uncached(json.loads(shown)["output"])


def test_the_readme_explains_none_with_what_the_default_model_does(worker):
    """The README's `none` examples: a bare question gets an empty answer, a sentence to complete works."""
    text = section("The event and its output")
    assert "`What is the capital of France?` with an empty answer (1 token)" in text
    assert '`The capital of France is` (with `"stop": ["\\n"]`) as `Paris.`' in text

    def raw(instruction: str, **generation) -> dict:
        prompt = {"instruction": instruction, "template": "none"}
        return worker.complete({"prompt_config": prompt, "generation_config": {"max_new_tokens": 32, **generation}})

    question = raw("What is the capital of France?")
    assert question["output"] == "" and question["usage"]["completion_tokens"] == 1
    assert raw("The capital of France is", stop=["\n"])["output"] == "Paris."
