"""Shared, slow fixtures: one loaded model per dtype, adapters trained once per session."""

import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# The device of the kernel tests: CUDA with DEVICE=cuda (or DEVICE unset on a GPU machine), else
# the CPU, where Triton's kernels run under its interpreter. Set before transformers imports triton.
DEVICE = "cuda" if os.environ.get("DEVICE", "auto") != "cpu" and torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Every worker the tests start, in this process or in the servers it starts, holds 8,192 tokens
    # of KV (0.4 GB) instead of the CPU's default 32,768 (1.5 GB): two test processes, their servers
    # and notebook kernels share 24 GB. Tests that need another size set KV_CACHE_TOKENS themselves.
    os.environ.setdefault("KV_CACHE_TOKENS", "8192")

import uvicorn  # noqa: E402
from filelock import FileLock  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from llm_worker.engine.memory import return_freed_memory  # noqa: E402
from llm_worker.model.finetune import LoraTraining, train_lora  # noqa: E402
from llm_worker.service import Worker  # noqa: E402
from llm_worker.settings import Settings  # noqa: E402
from model_cache import prepare_default_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SEED_TASKS = DATA / "alpaca_seed_tasks.jsonl"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)  # a README code block: language, body


def doc_blocks(page: str, title: str | None = None) -> list[tuple[str, str]]:
    """The code blocks (language, body) of a documentation page (``README.md``, ``docs/x.md``), or
    of its section ``## title`` (up to the next ``## ``)."""
    text = (ROOT / page).read_text()
    if title is not None:
        start = text.index(f"\n## {title}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end >= 0 else None]
    return FENCE.findall(text)


# The embedded model's chat template, its generation prompt changed: to one that thinks (Qwen3's
# enable_thinking: false writes an empty block), or to one that opens the thinking (R1-style).
GENERATION = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
THINKING = ("{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}"
            "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")
OPENING = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"


def template(base_model_dir: Path, generation: str) -> str:
    text = (base_model_dir / "chat_template.jinja").read_text()
    assert GENERATION in text
    return text.replace(GENERATION, generation)


def seed_tasks(count: int, skip: int = 0) -> list[dict]:
    """Real instructions from the Alpaca seed tasks, as job inputs' prompt_config."""
    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines()[skip : skip + count]]
    return [{"instruction": row["instruction"], "input": row["instances"][0]["input"]} for row in rows]


def job(instruction: str, **generation) -> dict:
    return {"prompt_config": {"instruction": instruction}, "generation_config": generation}


@pytest.fixture(scope="module", autouse=True)
def memory_back_after_each_module():
    """What a test file's workers and models held goes back to the system before the next file
    (glibc keeps freed pages; two test processes share 24 GB)."""
    yield
    gc.collect()
    return_freed_memory(torch.device("cpu"))


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    return prepare_default_model(Settings())


@pytest.fixture(scope="session")
def worker(base_model_dir):
    """The default deployment: embedded model, DTYPE=auto."""
    worker = Worker.start(Settings())
    yield worker
    worker.close()


@pytest.fixture
def started():
    """Start workers with particular settings; they are closed after the test."""
    workers = []

    def start(**settings):
        worker = Worker.start(Settings(**settings))
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def concurrently(worker, requests: list[dict], stagger: float = 0.0) -> list[dict]:
    """Complete ``requests`` on ``worker`` at the same time (``stagger``: seconds between starts)."""
    results = [None] * len(requests)

    def run(i):
        results[i] = worker.complete(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join()
    return results


@pytest.fixture(scope="session")
def fp32_worker(base_model_dir):
    worker = Worker.start(Settings(dtype="float32"))
    yield worker
    worker.close()


def train_fixed_answer_adapter(base_model_dir: Path, folder: Path, answer: str) -> Path:
    """A LoRA adapter that answers every instruction with ``answer``: its effect is checkable."""
    examples = [{**task, "output": answer} for task in seed_tasks(16, skip=100)]
    train_lora(base_model_dir, examples, folder, LoraTraining(steps=14, batch_size=2, learning_rate=3e-3))
    return folder


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``build(folder)`` makes, made once per test run and shared by pytest-xdist's
    workers (``make test`` runs two): the first to get the lock builds it, the others wait."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    folder = root / "shared" / name  # the folder's name is the adapter's name in ADAPTER_DIR copies
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def pirate_adapter(base_model_dir, tmp_path_factory) -> Path:
    answer = "Ahoy matey! Arr, that be a fine question."
    return built_once(tmp_path_factory, "pirate", lambda folder: train_fixed_answer_adapter(base_model_dir, folder, answer))


@pytest.fixture(scope="session")
def robot_adapter(base_model_dir, tmp_path_factory) -> Path:
    answer = "Beep boop. I am a robot. Beep."
    return built_once(tmp_path_factory, "robot", lambda folder: train_fixed_answer_adapter(base_model_dir, folder, answer))


# How the api_server fixture starts the SDK's local API server (the port follows); the README's
# "Try it locally" section starts it the same way (tests/test_try_locally.py checks).
API_SERVER_ARGS = ["handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="session")
def api_server():
    """The SDK's local API server running handler.py, on a free loopback port; yields (url, pid)."""
    yield from serve_api()


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until ``url`` answers with a success; fail if ``process`` exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:  # not listening yet, or an error status (503 while loading)
            assert time.monotonic() < deadline, f"{url} did not answer within {seconds:.0f} s"
            time.sleep(0.5)


def serve_api(**env: str):
    """Start the local API server (``env``: extra environment variables, e.g. DTYPE); yield
    (url, pid) once it answers, and stop it when resumed."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, *API_SERVER_ARGS, str(port)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/docs", process)
    except AssertionError:
        process.kill()
        raise
    yield base, process.pid
    process.terminate()
    process.wait(timeout=30)


def strictly(model: type[BaseModel], data: dict) -> BaseModel:
    """Parse with the openai type, refusing fields it does not define (its models allow extras)."""
    parsed = model.model_validate(data)

    def no_extras(value):
        if isinstance(value, BaseModel):
            assert not value.model_extra, f"{type(value).__name__} has unknown fields {value.model_extra}"
            for field in type(value).model_fields:
                no_extras(getattr(value, field))
        elif isinstance(value, list):
            for item in value:
                no_extras(item)

    no_extras(parsed)
    return parsed


@contextmanager
def running(app):
    """``app`` served by uvicorn on a loopback port, in this process; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def uncached(value):
    """An output without the prefix cache's counts (``usage.cached_tokens``, OpenAI's
    ``prompt_tokens_details``): they depend on what ran before, not on the answer."""
    if isinstance(value, dict):
        return {key: uncached(item) for key, item in value.items() if key not in ("cached_tokens", "prompt_tokens_details")}
    if isinstance(value, list):
        return [uncached(item) for item in value]
    return value


POISON = "Zebra-quokka-poison"  # a prompt whose rows ``nan_logits`` poisons


@contextmanager
def nan_logits(model, tokenizer, poison: str = POISON):
    """The model's logits NaN for every row whose input holds ``poison``'s tokens (through PEFT
    as well: its layers call this model's forward)."""
    ids = tokenizer(poison, add_special_tokens=False)["input_ids"]
    original = model.forward

    def forward(*args, **kwargs):
        output = original(*args, **kwargs)
        for row, tokens in enumerate(kwargs["input_ids"].tolist()):
            if any(tokens[i : i + len(ids)] == ids for i in range(len(tokens) - len(ids) + 1)):
                output.logits[row] = float("nan")
        return output

    model.forward = forward
    try:
        yield
    finally:
        del model.forward
