"""The HTTP server in front of users, through a real socket: the API key decided before routing,
429 with Retry-After past MAX_WAITING_REQUESTS, every request counted by route and outcome, and
browsers' CORS preflights with CORS_ORIGINS. (Start-up and SIGTERM: tests/test_server.py, in a
process of its own.)"""

import asyncio
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import ROOT, free_port, job, running

from llm_worker.doors.app import create_app
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

KEY = "sk-front-5e0a"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://playground.example"
# runs until the test ends it: 400 tokens with no end
LONG = {"prompt_config": {"instruction": "Once upon a time", "template": "none"}, "generation_config": {"max_new_tokens": 400, "min_new_tokens": 400}}


@pytest.fixture(scope="module")
def narrow(base_model_dir):
    """One request decodes at a time, so the second one waits."""
    worker = Worker.start(Settings(dtype="float32", max_batch_size=1))
    yield worker
    worker.close()


def until(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the engine did not get there"
        time.sleep(0.02)


def counts(url: str) -> dict[tuple[str, str], float]:
    """``llm_worker_http_requests_total`` by (route, outcome), scraped."""
    found = {}
    for line in httpx.get(f"{url}/metrics", headers=AUTH).text.splitlines():
        if line.startswith("llm_worker_http_requests_total{"):
            labels, value = line.removeprefix("llm_worker_http_requests_total{").split("} ")
            pairs = dict(part.split("=", 1) for part in labels.split(","))
            found[pairs["route"].strip('"'), pairs["outcome"].strip('"')] = float(value)
    return found


class Held:
    """A streamed /generate request kept open on a thread until ``release``."""

    def __init__(self, url: str) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        with httpx.stream("POST", f"{url}/generate", json={**LONG, "stream": True}, headers=AUTH, timeout=120) as response:
            for _ in response.iter_lines():
                if self.done.is_set():
                    return

    def release(self) -> None:
        self.done.set()
        self.thread.join(timeout=60)


def test_past_the_waiting_limit_requests_get_429_with_retry_after(narrow):
    app = create_app(narrow, ServerSettings(api_key=KEY, max_waiting_requests=1))
    engine = narrow.engine
    with running(app) as url:
        first = Held(url)
        until(lambda: engine.stats().running == 1)
        second = Held(url)
        until(lambda: engine.stats().waiting == 1)
        try:
            chat = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 429 and chat.headers["retry-after"] == "1"
            error = chat.json()["error"]
            assert error["code"] == "too_many_waiting_requests" and "MAX_WAITING_REQUESTS=1" in error["message"]
            message = httpx.post(f"{url}/v1/messages", headers={"x-api-key": KEY},
                                 json={"model": narrow.loaded.name, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert message.status_code == 429 and message.headers["retry-after"] == "1"
            assert message.json()["error"]["type"] == "rate_limit_error" and "MAX_WAITING_REQUESTS=1" in message.json()["error"]["message"]
            native = httpx.post(f"{url}/generate", headers=AUTH, json=job("Hi", max_new_tokens=4))
            assert native.status_code == 429 and "MAX_WAITING_REQUESTS=1" in native.json()["error"]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=narrow.loaded.name, prompt="Hi", max_tokens=4)
            assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200  # only generation is bounded
        finally:
            first.release()
            second.release()
        until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
        assert httpx.post(f"{url}/generate", headers=AUTH, json=job("Hi", max_new_tokens=4)).status_code == 200
        seen = counts(url)
    assert seen["/v1/chat/completions", "overloaded"] == seen["/generate", "overloaded"] == seen["/v1/completions", "overloaded"] == 1


def test_every_request_is_counted_by_route_and_outcome_and_the_key_comes_before_routing(narrow):
    app = create_app(narrow, ServerSettings(api_key=KEY))
    with running(app) as url:
        keyed = httpx.Client(base_url=url, headers=AUTH, timeout=120)
        assert keyed.get("/v1/models").status_code == keyed.get("/v1/models").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # an unknown path without the key is refused as any other: the routes are not listed to strangers
        unknown = httpx.get(f"{url}/v1/embeddings")
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
        assert unknown.headers["www-authenticate"] == "Bearer"
        listed = keyed.get("/v1/embeddings")
        assert listed.status_code == 404 and "POST /v1/chat/completions" in listed.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/").status_code == 200
        assert keyed.get("/metrics").status_code == 200
        assert keyed.post("/generate", json=job("Hi", max_new_tokens=4)).status_code == 200
        assert keyed.post("/generate", json={"generation_config": {"max_new_tokens": "many"}}).status_code == 422
        assert keyed.post("/tokenize", json={"prompt": "Hi"}).status_code == 200
        with keyed.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True}) as response:
            assert response.status_code == 200 and list(response.iter_lines())[-2] == "data: [DONE]"
        assert keyed.get("/generate").status_code == 405
        seen = counts(url)
    assert seen == {
        ("/v1/models", "success"): 2,
        ("/v1/models", "client_error"): 1,
        ("unmatched", "client_error"): 2,
        ("/health", "success"): 1,
        ("/", "success"): 1,
        ("/metrics", "success"): 1,  # the scrape that reads these counts is counted once it is answered
        ("/generate", "success"): 1,
        ("/generate", "client_error"): 2,
        ("/tokenize", "success"): 1,
        ("/v1/completions", "success"): 1,
    }


@pytest.fixture(scope="module")
def browsable(narrow):
    app = create_app(narrow, ServerSettings(api_key=KEY, cors_origins=f"{ORIGIN}, http://localhost:5173"))
    with running(app) as url:
        yield url


def test_a_browsers_preflight_is_answered_for_the_origins_allowed(browsable):
    asked = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    preflight = httpx.options(f"{browsable}/v1/chat/completions", headers=asked)  # no key: browsers send none here
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert {"authorization", "content-type", "x-stainless-os"} <= set(preflight.headers["access-control-allow-headers"].lower().split(", "))
    stranger = httpx.options(f"{browsable}/v1/chat/completions", headers={**asked, "Origin": "https://elsewhere.example"})
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    # the request itself: its answer names the origin and lets the page read the request id
    answered = httpx.post(f"{browsable}/generate", headers={**AUTH, "Origin": ORIGIN}, json=job("Hi", max_new_tokens=4))
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()
    refused = httpx.post(f"{browsable}/generate", headers={"Origin": ORIGIN}, json=job("Hi"))  # no key: a readable 401
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_without_cors_origins_no_cors_headers_are_sent(narrow):
    with running(create_app(narrow, ServerSettings())) as url:
        asked = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        preflight = httpx.options(f"{url}/v1/chat/completions", headers=asked)
        assert preflight.status_code == 405 and not any(name.startswith("access-control-") for name in preflight.headers)
        answered = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN})
        assert answered.status_code == 200 and "access-control-allow-origin" not in answered.headers


def test_listening_on_every_interface_without_a_key_is_warned_about_at_once(tmp_path):
    """The warning comes before the heavy imports, and the port answers ``loading`` meanwhile."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "API_KEY"}
    log_file = tmp_path / "server.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_worker.doors.server", "--host", "0.0.0.0", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )
    try:
        deadline = time.monotonic() + 120
        while "without API_KEY" not in log_file.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log_file.read_text()[-2000:]
            time.sleep(0.05)
        assert "WARNING llm_worker.doors.server: Listening on 0.0.0.0 without API_KEY: anyone who reaches this port" in log_file.read_text()
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_answers_while_the_model_loads_are_counted_unavailable_not_server_errors():
    """Every start answers /health with 503 ``loading`` until the model is ready: an alert on
    server errors must not fire on each restart."""
    app = create_app(None, ServerSettings())  # its lifespan does not run here: the model never starts loading

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://door") as client:
            health, models = await client.get("/health"), await client.get("/v1/models")
            return health, models, (await client.get("/metrics")).text

    health, models, metrics = asyncio.run(calls())
    assert health.status_code == models.status_code == 503 and health.json()["status"] == "loading"
    assert 'llm_worker_http_requests_total{outcome="unavailable",route="/health"} 1.0' in metrics
    assert 'llm_worker_http_requests_total{outcome="unavailable",route="/v1/models"} 1.0' in metrics
    assert 'outcome="server_error"' not in metrics
