"""The HTTP server, through a real socket with real clients: the seed's body and native streams on
/generate, the ``openai`` package on /v1, many concurrent streams sharing batches, disconnects,
API_KEY, limits, /metrics, and SIGTERM with requests in flight (in a process of its own)."""

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import ROOT, doc_blocks, free_port, job, running, seed_tasks, strictly, uncached
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llm_worker.doors import server as entry
from llm_worker.doors.app import create_app
from llm_worker.settings import ServerSettings

KEY = "sk-test-9f2c1e7d"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRANCE = "What is the capital of France?"
# The body the seed's post sends (tloen/alpaca-lora's generate.py settings), as is.
SEED_BODY = {
    "generation_config": {"temperature": 0.1, "top_p": 0.75, "top_k": 40, "num_beams": 1},
    "prompt_config": {"instruction": "Tell me about alpacas.", "input": ""},
}
# 400 tokens (20 s here), no stop string: running for as long as a test needs
LONG = {"prompt_config": {"instruction": "Once upon a time", "template": "none"}, "generation_config": {"max_new_tokens": 400, "min_new_tokens": 400}}


class Served:
    def __init__(self, url, door, key=None):
        self.url = url
        self.door = door
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)

    def openai(self, key="unused"):
        return openai.OpenAI(api_key=key, base_url=f"{self.url}/v1", max_retries=0, timeout=120)

    def metric(self, name, **labels):
        """A sample's value from /metrics (0 when absent)."""
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample.split("{")[0] == name and all(f'{key}="{val}"' in sample for key, val in labels.items()):
                return float(value)
        return 0.0

    def wait_for(self, name, value, seconds=10.0, **labels):
        deadline = time.monotonic() + seconds
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name} stayed at {self.metric(name, **labels)}, expected {value}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(fp32_worker):
    """The server over the session's fp32 worker."""
    app = create_app(fp32_worker, ServerSettings())
    with running(app) as url:
        yield Served(url, app.state.door)


@pytest.fixture(scope="module")
def keyed(fp32_worker):
    """The same, with API_KEY."""
    app = create_app(fp32_worker, ServerSettings(api_key=KEY))
    with running(app) as url:
        yield Served(url, app.state.door, key=KEY)


def test_a_worker_that_failed_to_start_is_unhealthy_and_says_why(monkeypatch):
    monkeypatch.setenv("DTYPE", "fp16")
    with running(create_app(config=ServerSettings())) as url:
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reason = "invalid configuration: DTYPE='fp16': use auto, float32, float16 or bfloat16"
        assert health.status_code == 503 and health.json() == {"status": "failed", "error": reason}
        native = httpx.post(f"{url}/generate", json=job(FRANCE))
        assert native.status_code == 503 and native.json() == {"error": reason}
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": FRANCE}]})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "worker_unavailable"
        assert chat.json()["error"]["message"] == reason
        assert httpx.get(f"{url}/").json() == "Alive"


def events(response: httpx.Response) -> list[dict]:
    """The JSON of each server-sent event of a streamed response, as they arrive."""
    return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]


def test_root_and_health_answer_without_a_key(served):
    assert httpx.get(f"{served.url}/").json() == "Alive"
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "SmolLM2-135M-Instruct"}


def test_the_seeds_body_answers_and_a_stream_joins_to_the_plain_answer(served, fp32_worker):
    answer = served.http.post("/generate", json=SEED_BODY)  # sampled (temperature 0.1): any answer
    assert answer.status_code == 200 and set(answer.json()) == {"output", "finish_reason", "usage", "model", "adapter"}
    assert answer.json()["output"].strip() and answer.json()["usage"]["completion_tokens"] <= 128
    seeded = {**SEED_BODY, "generation_config": {**SEED_BODY["generation_config"], "seed": 7, "max_new_tokens": 24}}
    assert uncached(served.http.post("/generate", json=seeded).json()) == uncached(fp32_worker.complete(seeded))

    body = {**job(FRANCE, max_new_tokens=24), "stream": True}
    with served.http.stream("POST", "/generate", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    plain = served.http.post("/generate", json={**body, "stream": False}).json()
    assert len(chunks) > 2 and "".join(chunk["delta"] for chunk in chunks) == plain["output"]
    assert uncached({key: chunks[-1][key] for key in ("finish_reason", "usage", "model")}) == uncached(
        {key: plain[key] for key in ("finish_reason", "usage", "model")}
    )


def test_every_native_field_works_over_http(served):
    two = served.http.post("/generate", json={**job(FRANCE, max_new_tokens=6, do_sample=True, seed=5, n=2, logprobs=2)}).json()
    assert [choice["index"] for choice in two["choices"]] == [0, 1] and len(two["choices"][0]["logprobs"]) <= 6
    assert served.http.post("/generate", json={"list_adapters": True}).json()["adapters"] is not None


def test_the_openai_client_chats_and_completes_plain_and_streaming(served):
    client = served.openai()
    messages = [{"role": "user", "content": FRANCE}]
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16, temperature=0)
    strictly(ChatCompletion, answer.model_dump())
    assert "Paris" in answer.choices[0].message.content

    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16, temperature=0, stream=True)
    chunks = [strictly(ChatCompletionChunk, chunk.model_dump()) for chunk in stream]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason

    text = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8, temperature=0)
    strictly(Completion, text.model_dump())
    streamed = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == text.choices[0].text
    assert [model.id for model in client.models.list()] == ["SmolLM2-135M-Instruct", "base"]


def test_a_stream_arrives_token_by_token(served):
    """The first token's chunk arrives long before the last: nothing buffers the stream."""
    client = served.openai()
    started, arrivals = time.monotonic(), []
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=48, temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) > 20
    first, last = arrivals[0], arrivals[-1]
    assert first < last / 4, f"first token after {first:.2f} s, last after {last:.2f} s"


def test_openai_errors_have_openais_status_and_shape(served):
    client = served.openai()
    messages = [{"role": "user", "content": FRANCE}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, frequency_penalty=3.0)
    assert refused.value.param == "frequency_penalty"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nobody", messages=messages)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": 5}])
    assert bad.value.param == "messages[0].content"
    bad_json = served.http.post("/v1/chat/completions", content=b"{nope")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["message"].startswith("body: not valid JSON")
    unknown = served.http.get("/v1/embeddings")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_bad_native_input_gets_400_413_or_422_naming_the_field(served):
    bad_json = served.http.post("/generate", content=b'{"prompt_config": ')
    assert bad_json.status_code == 400 and bad_json.json()["error"].startswith("body: not valid JSON")
    not_object = served.http.post("/generate", json=["hello"])
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]
    field = served.http.post("/generate", json=job(FRANCE, temperature=-1))
    assert field.status_code == 422 and field.json()["error"].startswith("generation_config.temperature: ")
    limit = served.door.worker.limits.max_input_bytes
    huge = job("x" * (limit + 1))
    for path in ("/generate", "/v1/completions"):
        too_big = served.http.post(path, json=huge)
        assert too_big.status_code == 413 and "MAX_INPUT_BYTES" in json.dumps(too_big.json())
    assert served.http.post("/generate", json=job(FRANCE, max_new_tokens=4)).status_code == 200  # still serving


def test_api_key_is_required_except_for_root_and_health(keyed):
    served = keyed
    plain = job(FRANCE, max_new_tokens=4)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("POST", "/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
            refused = httpx.request(method, f"{served.url}{path}", json=plain, headers=headers)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["www-authenticate"] == "Bearer"
            error = refused.json()["error"]
            assert (error["code"] == "invalid_api_key") if path.startswith("/v1") else "API key" in error
    with pytest.raises(openai.AuthenticationError):
        served.openai(key="wrong").models.list()
    assert served.openai(key=KEY).models.list().data
    assert served.http.post("/generate", json=plain).json()["finish_reason"] == "length"
    assert httpx.get(f"{served.url}/health").status_code == 200 and httpx.get(f"{served.url}/").status_code == 200


def test_64_concurrent_streams_share_batches_and_each_equals_its_solo_answer(served):
    tasks = seed_tasks(8, skip=20)
    bodies = [{"prompt_config": task, "generation_config": {"max_new_tokens": 8}} for task in tasks]
    solo = [served.http.post("/generate", json=body).json() for body in bodies]
    before = served.metric("llm_worker_http_requests_total", route="/generate", outcome="success")
    tokens_before = served.metric("llm_worker_generation_tokens_total")

    async def stream(client, body):
        async with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            chunks = [json.loads(line.removeprefix("data: ")) async for line in response.aiter_lines() if line.startswith("data: ")]
        return {"output": "".join(chunk["delta"] for chunk in chunks), **{k: v for k, v in chunks[-1].items() if k != "delta"}}

    async def everyone():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(stream(client, bodies[i % 8]) for i in range(64)))

    running, done = [], threading.Event()

    def sample_running():
        while not done.wait(0.02):
            running.append(served.metric("llm_worker_requests_running"))

    sampler = threading.Thread(target=sample_running)
    sampler.start()
    try:
        answers = asyncio.run(everyone())
    finally:
        done.set()
        sampler.join()
    assert uncached(answers) == uncached([solo[i % 8] for i in range(64)])
    assert max(running) > 8, f"at most {max(running)} requests ran at once"
    assert served.metric("llm_worker_http_requests_total", route="/generate", outcome="success") == before + 64
    generated = sum(answer["usage"]["completion_tokens"] for answer in answers)
    assert served.metric("llm_worker_generation_tokens_total") == tokens_before + generated


def test_each_request_is_named_in_the_logs_by_the_id_its_client_gets(served, caplog):
    """/generate answers with an X-Request-Id, the OpenAI routes with their response id; the job's
    one INFO line names it, and a refused body is logged with the id and reason only."""
    caplog.set_level(logging.INFO, logger="llm_worker")
    plain = served.http.post("/generate", json=job(FRANCE, max_new_tokens=4))
    refused = served.http.post("/generate", json={"prompt": FRANCE})
    chat = served.openai().chat.completions.create(model=served.door.worker.loaded.name, messages=[{"role": "user", "content": FRANCE}], max_tokens=4)
    lines = [record.getMessage() for record in caplog.records if record.name == "llm_worker.jobs"]
    request_id = plain.headers["X-Request-Id"]
    assert request_id.startswith("gen-") and refused.headers["X-Request-Id"].startswith("gen-")
    assert [line for line in lines if line.startswith(f"Job {request_id} done: length, adapter -, ")]
    assert lines[1].startswith(f"Job {refused.headers['X-Request-Id']} refused: prompt_config: Field required; prompt: ")
    assert [line for line in lines if line.startswith(f"Job {chat.id} done: length, ")]
    assert len(lines) == 3 and not [record for record in caplog.records if FRANCE in record.getMessage()]


def test_a_client_that_disconnects_cancels_its_request(served, caplog):
    """Its batch row and KV blocks are freed, it counts as cancelled, nothing is logged as a failure,
    and the server keeps answering."""
    caplog.set_level(logging.WARNING)
    cancelled = served.metric("llm_worker_http_requests_total", route="/generate", outcome="cancelled")
    with httpx.Client(base_url=served.url, timeout=60) as client:
        with client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert served.metric("llm_worker_requests_running") == 1
    served.wait_for("llm_worker_requests_running", 0)
    served.wait_for("llm_worker_http_requests_total", cancelled + 1, route="/generate", outcome="cancelled")
    served.wait_for("llm_worker_kv_cache_blocks_used", 0)

    with pytest.raises(httpx.ReadTimeout):  # a plain request: the client gives up waiting
        httpx.post(f"{served.url}/generate", json=LONG, timeout=1.5)
    served.wait_for("llm_worker_requests_running", 0)
    served.wait_for("llm_worker_http_requests_total", cancelled + 2, route="/generate", outcome="cancelled")
    assert served.http.post("/generate", json=job(FRANCE, max_new_tokens=8)).json()["finish_reason"] == "length"
    assert not [record.getMessage() for record in caplog.records]


def server_examples(page: str) -> tuple[str, list[tuple[str, str, str]]]:
    """A page's server command (its first block, or in the README the section "Run it as a
    server"), then each command with the output shown after it (kind: json or text): in
    docs/server.md, its first seven blocks."""
    blocks = doc_blocks(page, "Run it as a server" if page == "README.md" else None)
    if page == "README.md":
        assert [lang for lang, _ in blocks] == ["bash", "bash", "json"]
    else:
        blocks = blocks[:7]  # the page's first examples, each followed by what it prints
        assert [lang for lang, _ in blocks] == ["bash", "bash", "json", "bash", "text", "bash", "json"]
    return blocks[0][1].strip(), [(blocks[i][1], *blocks[i + 1]) for i in range(1, len(blocks), 2)]


PAGES = ("README.md", "docs/server.md")
SERVER_COMMANDS = [(page, index) for page in PAGES for index in range(len(server_examples(page)[1]))]


@pytest.mark.parametrize("page", PAGES)
def test_the_docs_start_the_server_as_make_serve_does(page):
    server, _ = server_examples(page)
    assert server == ".venv/bin/python -m llm_worker.doors.server --host 127.0.0.1 --port 8000"
    assert "$(PY) -m llm_worker.doors.server --host $(HOST) --port $(PORT)" in (ROOT / "Makefile").read_text()


@pytest.mark.skipif(shutil.which("curl") is None, reason="the commands use curl")
@pytest.mark.parametrize("page, index", SERVER_COMMANDS)
def test_the_docs_server_commands_print_what_they_show(served, page, index):
    command, kind, shown = server_examples(page)[1][index]
    script = command.replace("http://localhost:8000", served.url).replace(".venv/bin/python", shlex.quote(sys.executable))
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if kind == "json":
        assert uncached(json.loads(done.stdout)) == uncached(json.loads(shown))
    else:
        assert done.stdout.strip() == shown.strip()


# ---------------------------------------------------------------------- its own process
def test_sigterm_lets_requests_finish_or_fail_and_exits_0(tmp_path):
    """``python -m llm_worker.doors.server`` with the default grace: the port answers (``loading``,
    and 401 without the key) before the model is loaded; on SIGTERM with requests in flight,
    /health says ``shutting_down`` while the port stays open, a new request gets 503, each running
    request gets its answer or an error, and the process exits 0 within the deadlines the server
    sets itself after the grace (no wall-clock figure of this machine's). Nothing it logged (at
    DEBUG) holds the API key."""
    port = free_port()
    log_file = tmp_path / "server.log"
    env = {**os.environ, "DTYPE": "float32", "API_KEY": KEY, "LOG_LEVEL": "DEBUG"}
    env.pop("SHUTDOWN_GRACE_SECONDS", None)
    grace = ServerSettings.model_fields["shutdown_grace_seconds"].default
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_worker.doors.server", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    states, early = [], {}
    deadline = time.monotonic() + 120
    while not states or states[-1] != "ok":
        assert time.monotonic() < deadline and process.poll() is None, log_file.read_text()[-3000:]
        try:
            states.append(httpx.get(f"{url}/health", timeout=5).json()["status"])
            if states[-1] == "loading" and not early:
                early = {"stranger": httpx.get(f"{url}/v1/models").status_code, "keyed": httpx.get(f"{url}/v1/models", headers=AUTH)}
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    assert states[0] == "loading", states
    assert early["stranger"] == 401 and early["keyed"].status_code in (503, 200)  # 200: loaded in between
    if early["keyed"].status_code == 503:
        assert early["keyed"].json()["error"]["code"] == "worker_unavailable"

    results, ended = {}, {}

    def call(name, body, stream=False, path="/generate"):
        try:
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
                if stream:
                    with client.stream("POST", path, json={**body, "stream": True}) as response:
                        results[name] = ("stream", response.status_code, [line for line in response.iter_lines() if line])
                else:
                    response = client.post(path, json=body)
                    results[name] = ("plain", response.status_code, response.json())
        except httpx.HTTPError as err:
            results[name] = ("transport", None, repr(err))
        ended[name] = time.monotonic()

    story = {"prompt": "Once upon a time", "max_tokens": 400}
    calls = {
        "short": (job(FRANCE, max_new_tokens=8),),
        "long_plain": (LONG,),
        "long_stream": (LONG, True),
        "openai_stream": (story, True, "/v1/completions"),
    }
    threads = [threading.Thread(target=call, args=(name, *args)) for name, args in calls.items()]
    for thread in threads:
        thread.start()
    # SIGTERM once the short one is answered and the three long ones are running (the sampled one
    # may have ended on its own), however long that takes on this machine.
    watcher, deadline = Served(url, None, key=KEY), time.monotonic() + 120
    while not ("short" in results and watcher.metric("llm_worker_requests_running") + ("openai_stream" in results) >= 3):
        assert time.monotonic() < deadline and process.poll() is None, (results, log_file.read_text()[-3000:])
        time.sleep(0.05)
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    probes = []  # (when, what /health said, or "refused" once the port is closed)

    def probe():
        while process.poll() is None:
            try:
                probes.append((time.monotonic(), httpx.get(f"{url}/health", timeout=5).json()["status"]))
            except httpx.TransportError:
                probes.append((time.monotonic(), "refused"))
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    prober.start()
    until = time.monotonic() + 30
    while not any(state == "shutting_down" for _, state in probes):
        assert time.monotonic() < until, probes[-5:]
        time.sleep(0.02)
    late = httpx.post(f"{url}/generate", headers=AUTH, json=job(FRANCE, max_new_tokens=8))
    assert late.status_code == 503 and "shutting down; retry" in late.json()["error"]
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a request hung"
    assert process.wait(timeout=60) == 0
    exited = time.monotonic()
    prober.join(timeout=10)
    # the port closes by grace + OVERDUE_SECONDS, its connections get CLOSE_SECONDS, and 1 s more for a
    # last engine step and the exit (measured here: 0.4 s after the grace in all)
    limit = grace + entry.OVERDUE_SECONDS + entry.CLOSE_SECONDS + 1
    assert exited - signalled < limit, f"exited {exited - signalled:.1f} s after SIGTERM"
    said = [state for _, state in probes]
    first_refused = said.index("refused") if "refused" in said else len(said)
    assert set(said[:first_refused]) == {"shutting_down"} and set(said[first_refused:]) <= {"refused"}, said
    # the load balancer heard it while the long requests were still running
    assert probes[0][0] < min(ended["long_plain"], ended["long_stream"])
    logged = log_file.read_text()
    assert KEY not in logged and "Shutdown grace period over" in logged

    kind, status, short = results["short"]
    assert status == 200 and short["finish_reason"] == "length"
    kind, status, body = results["long_plain"]
    assert status == 503 and "shutting down" in body["error"]
    kind, status, lines = results["long_stream"]
    assert status == 200 and "shutting down" in json.loads(lines[-1].removeprefix("data: "))["error"]
    kind, status, lines = results["openai_stream"]  # sampled: it may have ended on its own before the grace was over
    assert status == 200 and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last.get("error", {}).get("type") == "server_error" or last["choices"][0]["finish_reason"] == "stop"
    assert re.search(r"POST /generate HTTP/1.1\" 503", logged)


def test_the_openai_pages_client_example_runs_as_written(served):
    """docs/openai.md's first example, against a local server: chat, a stream, the Responses API."""
    (language, code), *_ = doc_blocks("docs/openai.md")
    assert language == "python" and "http://localhost:8000/v1" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in this process, as a script
        exec(compile(code.replace("http://localhost:8000", served.url), "docs/openai.md", "exec"), {"__name__": "__main__"})
    lines = printed.getvalue().strip().splitlines()
    assert "Paris" in lines[0] and lines[-1].split(" ", 1)[0] in ("completed", "incomplete") and len(lines[-1].split(" ", 1)) == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="the commands use curl")
@pytest.mark.parametrize("index", [0, 1])
def test_the_openai_pages_tokenizer_commands_print_what_they_show(served, index):
    blocks = doc_blocks("docs/openai.md", "The tokenizer routes")
    assert [language for language, _ in blocks] == ["bash", "json"] * 2
    command, shown = blocks[2 * index][1], blocks[2 * index + 1][1]
    done = subprocess.run(["bash", "-c", command.replace("http://localhost:8000", served.url)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout) == json.loads(shown), done.stdout
