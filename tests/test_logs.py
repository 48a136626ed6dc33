"""What the worker logs: a session of jobs through the RunPod SDK's real job loop, at the default
log levels, holds none of the prompts or answers; each finished job has one INFO line with its
RunPod job id, and a refused job is reported to RunPod as failed."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from conftest import ROOT, free_port, job

from llm_worker.engine import lifecycle as engine_module
from llm_worker.doors import jobs
from llm_worker.settings import Settings
from model_cache import ModelSourceError, resolve_adapter_source, resolve_base_model

KEY = "rp-test-key-7f3a9c"


class FakeRunPod:
    """RunPod's job API as the SDK's job loop calls it: jobs to take (``/job-take``, one or a batch,
    long-polled when there are none), streamed outputs and results posted back."""

    def __init__(self, jobs: list[dict]) -> None:
        self.pending = list(jobs)
        self.results: dict[str, dict] = {}
        self.streamed: dict[str, list] = {}
        self.lock = threading.Lock()
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urlparse(self.path).path
                batch = path.startswith("/job-take-batch/")
                if not (batch or path.startswith("/job-take/")):
                    return self.reply(204)
                with queue.lock:
                    taken, queue.pending = queue.pending[:8], queue.pending[8:]
                    if not batch:
                        queue.pending = taken[1:] + queue.pending
                        taken = taken[:1]
                if not taken:
                    time.sleep(0.5)  # RunPod long-polls
                    return self.reply(204)
                self.reply(200, taken if batch else taken[0])

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind, _, job_id = urlparse(self.path).path.strip("/").split("/")
                with queue.lock:
                    if kind == "job-done":
                        queue.results[job_id] = data
                    else:
                        queue.streamed.setdefault(job_id, []).append(data)
                self.reply(200, {})

            def reply(self, status, body=None):
                payload = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.port}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_POD_ID": "worker-under-test",
            "RUNPOD_AI_API_KEY": KEY,
        }


PROMPTS = {  # job id: a prompt no log line may hold
    "job-plain": "Name three colours that appear on the flag of France.",
    "job-stream": "Write one sentence about the ocean at night.",
    "job-chat": "Which planet is known as the red planet?",
    "job-completion": "The largest mammal on Earth is the",
    "job-refused": "My secret refused prompt about turquoise kangaroos",
}


def session_jobs() -> list[dict]:
    chat = {"messages": [{"role": "user", "content": PROMPTS["job-chat"]}], "max_tokens": 24, "temperature": 0}
    return [
        {"id": "job-plain", "input": job(PROMPTS["job-plain"], max_new_tokens=24)},
        {"id": "job-stream", "input": {**job(PROMPTS["job-stream"], max_new_tokens=24), "stream": True}},
        {"id": "job-chat", "input": {"openai_route": "/v1/chat/completions", "openai_input": chat}},
        {"id": "job-completion", "input": {"openai_route": "/v1/completions", "openai_input": {"prompt": PROMPTS["job-completion"], "max_tokens": 16}}},
        {"id": "job-refused", "input": {"prompt": PROMPTS["job-refused"]}},
        {"id": "job-not-an-object", "input": "hello"},
    ]


def answers(results: dict[str, dict]) -> list[str]:
    """The answers' texts, from each job's aggregated output."""
    texts = []
    for result in results.values():
        for output in result.get("output", []):
            if isinstance(output, dict):
                texts += [output.get("output"), output.get("delta")]
                texts += [choice.get("text") or (choice.get("message") or {}).get("content") for choice in output.get("choices", [])]
    return [text.strip() for text in texts if text and len(text.strip()) >= 4]


def run_session(tmp_path, jobs: list[dict], **env) -> tuple[FakeRunPod, str]:
    """``handler.py`` in RunPod's job loop, fed ``jobs`` until every result is back; returns the
    queue and everything the process printed."""
    queue = FakeRunPod(jobs)
    log_file = tmp_path / "worker.log"
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPOD_", "LOG_LEVEL"))}
    with open(log_file, "w") as out:
        process = subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env={**clean, **queue.env(), **env}, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 300
        while len(queue.results) < len(jobs):
            assert process.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, f"results: {sorted(queue.results)}\n{log_file.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    queue.server.shutdown()
    return queue, log_file.read_text()


@pytest.fixture(scope="module")
def default_session(tmp_path_factory, base_model_dir):
    return run_session(tmp_path_factory.mktemp("logs"), session_jobs())


def test_a_session_at_the_default_levels_logs_no_prompt_and_no_answer(default_session):
    queue, logged = default_session
    said = answers(queue.results)
    assert len(said) >= 4, queue.results  # the plain, streamed, chat and completion jobs answered
    for text in [*PROMPTS.values(), *said]:
        assert text not in logged, f"logged: {text!r}"
    assert KEY not in logged


def test_each_job_has_one_line_with_its_runpod_id_tokens_and_speed(default_session):
    queue, logged = default_session
    for job_id in ("job-plain", "job-stream", "job-chat", "job-completion"):
        (line,) = [line for line in logged.splitlines() if f"Job {job_id} done:" in line]
        assert " INFO llm_worker.jobs: " in line
        assert "adapter -, " in line and " prompt tokens, " in line and " completion tokens, " in line
        assert line.endswith(" tokens/s") and any(reason in line for reason in ("done: eos,", "done: stop,", "done: length,"))
    (refused,) = [line for line in logged.splitlines() if "Job job-refused refused: " in line]
    assert "did you mean prompt_config.instruction?" in refused


def test_the_start_log_says_how_long_each_part_of_the_start_took(default_session):
    _, logged = default_session
    assert re.search(r"INFO llm_worker\.engine\.loop: Engine ready in [\d.]+ s \(KV pool [\d.]+ s, probe step [\d.]+ s\)", logged), logged[:3000]
    assert re.search(r"INFO llm_worker\.service: Ready in [\d.]+ s \(model [\d.]+ s, engine and grammars [\d.]+ s\)", logged)


def test_a_refused_job_is_reported_to_runpod_as_failed(default_session):
    """The SDK turns a generator's ``{"error": ...}`` output into the job's error, which RunPod
    reports as status FAILED (the SDK's local API server does not: it answers COMPLETED)."""
    queue, _ = default_session
    for job_id in ("job-refused", "job-not-an-object"):
        assert set(queue.results[job_id]) == {"error"}, queue.results[job_id]
    assert "did you mean prompt_config.instruction?" in queue.results["job-refused"]["error"]
    assert queue.results["job-not-an-object"]["error"] == "input: must be a JSON object, got str"
    assert set(queue.results["job-plain"]) == {"output"} and "error" not in queue.results["job-plain"]["output"][0]


def test_the_sdks_debug_level_shows_the_outputs_only_when_the_operator_asks(tmp_path, default_session):
    """The same session with RUNPOD_LOG_LEVEL=DEBUG: the SDK prints each job's output (so the check
    above can fail); the worker never sets it."""
    queue, logged = run_session(tmp_path, session_jobs()[:2], RUNPOD_LOG_LEVEL="DEBUG")
    assert any(text in logged for text in answers(queue.results))


def test_progress_lines_name_the_job(worker, caplog, monkeypatch):
    monkeypatch.setattr(engine_module, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.DEBUG, logger="llm_worker"):
        result = jobs.complete(worker, job("Count from one to twenty.", max_new_tokens=12), "job-progress")
    assert "output" in result
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("job job-progress: ") and " of 12 tokens after " in line for line in lines), lines
    (done,) = [line for line in lines if line.startswith("Job job-progress done: ")]
    assert f"{result['usage']['completion_tokens']} completion tokens" in done


@pytest.mark.parametrize("source", ["./my-lora", "/nonexistent/adapter", "~/not-here", "models/mine/lora"])
def test_a_plainly_local_path_that_is_missing_is_refused_without_looking_on_the_hub(source, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelSourceError) as refused:
        resolve_adapter_source(source, Settings())
    assert "is a local path" in str(refused.value) and "does not exist" in str(refused.value)
    assert not [record for record in caplog.records if "Downloading" in record.getMessage()]
    with pytest.raises(ModelSourceError, match="BASE_MODEL"):
        resolve_base_model(Settings(base_model=source))
