"""The commands shown for the SDK's local API server (README's "Try it locally", the deploy guide's
"The same routes locally") print the outputs shown under them (job ids aside), and the README's
RunPod call shows what the worker returns, for an answer and for a refused job."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import API_SERVER_ARGS, ROOT, doc_blocks, post, uncached

LOCAL = "http://localhost:8000"
SECTIONS = [("README.md", "Try it locally"), ("docs/deploy.md", "The same routes locally")]


def examples(page: str, title: str) -> list[tuple[str, str]]:
    """Each command of the section with the output shown after it (the README's first block, the
    server command, aside)."""
    blocks = doc_blocks(page, title)
    if page == "README.md":
        blocks = blocks[1:]
    assert [lang for lang, _ in blocks] == ["bash", "json"] * (len(blocks) // 2), (page, title)
    return [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]


COMMANDS = [(page, title, index) for page, title in SECTIONS for index in range(len(examples(page, title)))]


def without_ids(value):
    """The output with each job id replaced by its prefix (ids differ on every run)."""
    if isinstance(value, dict):
        return {key: item.split("-")[0] if key == "id" else without_ids(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_ids(item) for item in value]
    return value


def test_the_readme_starts_the_server_as_the_tests_do():
    (_, server), *_ = doc_blocks("README.md", "Try it locally")
    assert shlex.split(server.strip()) == [".venv/bin/python", *API_SERVER_ARGS, "8000"]


def test_the_sections_show_every_route():
    readme = " ".join(command for command, _ in examples("README.md", "Try it locally"))
    assert "/runsync" in readme and '"openai_route": "/v1/chat/completions"' in readme
    local = " ".join(command for command, _ in examples("docs/deploy.md", "The same routes locally"))
    assert all(route in local for route in ("/run ", "/status/$JOB", "/stream/$JOB", "runpod.Endpoint"))


@pytest.mark.skipif(shutil.which("curl") is None, reason="the commands use curl")
@pytest.mark.parametrize("page, title, index", COMMANDS)
def test_each_command_prints_the_output_shown(api_server, page, title, index):
    url, _ = api_server
    command, shown = examples(page, title)[index]
    script = command.replace(LOCAL, url).replace(".venv/bin/python", shlex.quote(sys.executable))
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    assert uncached(without_ids(printed)) == uncached(without_ids(json.loads(shown)))
    if isinstance(printed, dict) and "status" in printed:
        assert printed["id"].startswith("test-")


def test_the_runpod_examples_show_what_the_worker_returns(api_server):
    """The README's RunPod /runsync call, sent to the local server: the same job output; the same
    job with `max_tokens` gets the error the README shows as the FAILED job's."""
    url, _ = api_server
    (_, call), (_, shown), (_, failed) = doc_blocks("README.md", "Call it on RunPod")
    event = json.loads(re.search(r"-d '(.*?)'", call, re.DOTALL).group(1))
    assert uncached(post(f"{url}/runsync", event)["output"]) == uncached(json.loads(shown)["output"])
    event["input"]["generation_config"] = {"max_tokens": 32}
    (refused,) = post(f"{url}/runsync", event)["output"]  # the local server's COMPLETED list
    assert json.loads(failed) == {"id": "sync-…", "status": "FAILED", "error": refused["error"]}


def test_the_local_servers_differences_are_what_it_does(api_server):
    """What the README says the SDK's local server lacks and does differently."""
    url, _ = api_server
    text = (ROOT / "README.md").read_text()
    assert "It lacks** RunPod's `/openai/v1/...` paths" in text and "`/health`" in text and "`/cancel/<id>`" in text
    for missing in ("/openai/v1/models", "/health", "/cancel/test-1"):
        done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}{missing}"], capture_output=True, text=True)
        assert done.stdout == "404", missing
    for raw in ("hello", None):
        done = subprocess.run(
            ["curl", "-s", "-X", "POST", f"{url}/runsync", "-H", "Content-Type: application/json", "-d", json.dumps({"input": raw})],
            capture_output=True, text=True,
        )
        assert "detail" in json.loads(done.stdout), done.stdout


def test_the_docs_explain_none_with_what_the_default_model_does(worker):
    """The event page's `none` examples: a bare question gets an empty answer, a sentence to complete works."""
    text = (ROOT / "docs/events.md").read_text()
    assert "`What is the capital of France?` with an empty answer (1 token)" in text
    assert '`The capital of France is` (with `"stop": ["\\n"]`) as `Paris.`' in text

    def raw(instruction: str, **generation) -> dict:
        prompt = {"instruction": instruction, "template": "none"}
        return worker.complete({"prompt_config": prompt, "generation_config": {"max_new_tokens": 32, **generation}})

    question = raw("What is the capital of France?")
    assert question["output"] == "" and question["usage"]["completion_tokens"] == 1
    assert raw("The capital of France is", stop=["\n"])["output"] == "Paris."
