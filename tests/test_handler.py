"""The handler as RunPod runs it: the SDK's local API server, its client, and local test mode."""

import json
import os
import subprocess
import sys

import pytest
import runpod
from conftest import ROOT, post

FRANCE = {"prompt_config": {"instruction": "What is the capital of France?"}, "generation_config": {"max_new_tokens": 32}}


def test_runsync_over_http_answers(api_server):
    api_server, _ = api_server
    reply = post(f"{api_server}/runsync", {"input": FRANCE})
    assert reply["status"] == "COMPLETED"
    (result,) = reply["output"]
    assert "Paris" in result["output"] and "###" not in result["output"]
    assert result["finish_reason"] in ("eos", "stop")  # the alpaca answer ends at a new "### " section


def test_bad_input_gets_an_error_and_the_worker_keeps_serving(api_server):
    api_server, _ = api_server
    reply = post(f"{api_server}/runsync", {"input": {"prompt_config": {"instruction": 42}}})
    assert reply["output"] == [{"error": "prompt_config.instruction: Input should be a valid string"}]
    assert "Paris" in post(f"{api_server}/runsync", {"input": FRANCE})["output"][0]["output"]


def test_streamed_job_aggregates_to_the_whole_answer(api_server):
    api_server, _ = api_server
    plain = post(f"{api_server}/runsync", {"input": FRANCE})["output"][0]
    chunks = post(f"{api_server}/runsync", {"input": {**FRANCE, "stream": True}})["output"]
    assert "".join(chunk["delta"] for chunk in chunks) == plain["output"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"]


def test_runpod_client_gets_a_real_answer(api_server):
    api_server, _ = api_server
    runpod.endpoint_url_base = api_server
    output = runpod.Endpoint(".", api_key="local-test-key").run_sync(FRANCE, timeout=120)
    assert "Paris" in output[0]["output"]


@pytest.mark.parametrize("stream", [False, True])
def test_local_test_input_prints_the_full_answer(stream):
    event = json.dumps({"input": {**FRANCE, "stream": stream}})
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_WEBHOOK_GET_JOB"}
    done = subprocess.run(
        [sys.executable, "handler.py", "--test_input", event], cwd=ROOT, capture_output=True, text=True, env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result_line = next(line for line in done.stdout.splitlines() if "Job result:" in line)
    assert "Paris" in result_line and "###" not in result_line
    assert "'finish_reason': 'eos'" in result_line or "'finish_reason': 'stop'" in result_line
    assert "generator object" not in done.stdout


def test_handler_runs_test_input_json_by_default():
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_WEBHOOK_GET_JOB"}
    done = subprocess.run([sys.executable, "handler.py"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in next(line for line in done.stdout.splitlines() if "Job result:" in line)
