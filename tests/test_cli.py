"""The ``llm-worker`` console command (``make install`` puts it in the environment): ``serve`` runs
the HTTP server with every setting as a flag beside its environment variable (a flag wins), its
``--help`` lists them all with their defaults, a wrong value is refused before anything loads,
and ``bench`` / ``conformance`` / ``finetune`` pass their options on."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import ROOT, free_port, wait_until_up

from llm_worker.settings import SECRETS, ServerSettings, Settings

COMMAND = Path(sys.executable).parent / "llm-worker"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMAND), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_serve_help_lists_every_setting_with_its_default_and_keeps_the_secrets_off_the_command_line():
    done = run("serve", "--help", COLUMNS="1000")  # argparse wraps its help to the terminal, at hyphens too
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for model in (Settings, ServerSettings):
        for name, field in model.model_fields.items():
            flag = f"--{name.replace('_', '-')}"
            if name in SECRETS or name == "base_model":
                assert flag not in text
                continue
            assert flag in text, flag
            default = "unset" if field.default is None else str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert f"Default: {default}." in text, (name, default)
    assert "BASE_MODEL: a Hub id or a local folder" in text


def test_a_wrong_value_or_command_is_refused_before_anything_loads():
    done = run("serve", "--dtype", "fp16", "--max-batch-size", "0")
    assert done.returncode == 2 and "DTYPE='fp16': use auto, float32, float16 or bfloat16" in done.stderr
    assert "MAX_BATCH_SIZE" in done.stderr
    done = run("servve")
    assert done.returncode == 2 and "invalid choice: 'servve'" in done.stderr and "serve" in done.stderr


def test_the_other_commands_pass_their_options_on():
    done = run("bench", "--help")  # each imports the model side: one is enough to show the passing on
    assert done.returncode == 0 and "--concurrency" in done.stdout and "--quantize" in done.stdout


def test_serve_runs_the_server_on_the_model_it_is_given_with_flags_over_the_environment(base_model_dir):
    port = free_port()
    process = subprocess.Popen(
        [str(COMMAND), "serve", str(base_model_dir), "--port", str(port), "--dtype", "float32", "--max-new-tokens-limit", "7",
         "--enable-prefix-cache"],
        cwd=ROOT, env={**os.environ, "MAX_NEW_TOKENS_LIMIT": "100", "ENABLE_PREFIX_CACHE": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", process, seconds=180)
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["model"] == str(base_model_dir)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400 and "at most 7 (MAX_NEW_TOKENS_LIMIT)" in refused.json()["error"]["message"]
        answer = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 7}, timeout=120).json()
        assert answer["usage"]["completion_tokens"] <= 7
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        log = process.stderr.read()
    assert code == 0, log[-2000:]
    assert "prefix caching on" in log  # --enable-prefix-cache alone: on, over ENABLE_PREFIX_CACHE=0
