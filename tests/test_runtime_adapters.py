"""Adapters added to and removed from a running server (vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, with ``ALLOW_RUNTIME_ADAPTERS=1``): an adapter loaded at run time
answers as the same adapter configured at start, a removed one is gone, and a new adapter under a
removed one's name never reuses the old one's cached prompt blocks or weights."""

import concurrent.futures
import shutil
import time

import httpx
import pytest
import torch
from conftest import running
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llm_worker.doors import jobs
from llm_worker.doors.app import create_app
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

# long enough to fill prompt blocks the prefix cache shares (16-token chunks below)
PROMPT = "Below is an instruction. Write a response.\n\nInstruction: Name three rivers of Europe and one fact about each.\n\nResponse:"


TEMPLATE = "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n{% endfor %}### assistant:\n"


def random_adapter(base_model_dir, folder, seed: int):
    """A LoRA adapter with random weights: it changes every answer, in its own way per seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(base_model_dir, tmp_path_factory):
    """Two adapters in ADAPTER_DIR, and a link in it to a copy outside it."""
    root = tmp_path_factory.mktemp("runtime")
    made = {name: random_adapter(base_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}
    shutil.copytree(made["a"], root / "templated")  # an adapter that ships the chat template it was trained with
    (root / "templated" / "chat_template.jinja").write_text(TEMPLATE)
    outside = tmp_path_factory.mktemp("outside") / "a"
    shutil.copytree(made["a"], outside)
    (root / "escape").symlink_to(outside)
    return made


@pytest.fixture(scope="module")
def served(folders):
    settings = Settings(dtype="float32", lora_adapters=f"same={folders['a']},bref={folders['b']}", allow_runtime_adapters=True,
                        adapter_dir=folders["a"].parent, max_prefill_tokens=16)
    worker = Worker.start(settings)
    with running(create_app(worker, ServerSettings())) as url:
        client = httpx.Client(base_url=url, timeout=120)
        client.worker = worker  # for the tests that start another server over it
        yield client
    worker.close()


def answer(http, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    response = http.post("/v1/completions", json=body).json()
    return response["choices"][0]["text"]


def test_an_adapter_loaded_at_run_time_answers_as_the_same_adapter_configured_at_start(served, folders):
    response = served.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "a"})  # relative to ADAPTER_DIR
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'fresh' added successfully."
    assert "fresh" in [model["id"] for model in served.get("/v1/models").json()["data"]]
    assert answer(served, "fresh") == answer(served, "same") != answer(served, "SmolLM2-135M-Instruct")
    response = served.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'fresh' removed successfully."
    gone = served.post("/v1/completions", json={"model": "fresh", "prompt": "hi", "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_a_new_adapter_under_a_removed_ones_name_shares_nothing_with_it(served, folders):
    served.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(folders["a"])}).raise_for_status()
    first = answer(served, "v")
    assert first == answer(served, "same")
    served.post("/v1/unload_lora_adapter", json={"lora_name": "v"}).raise_for_status()
    served.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(folders["b"])}).raise_for_status()
    body = {"model": "v", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    again = served.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == answer(served, "bref") != first
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the old v's blocks are not its own


@pytest.mark.parametrize(
    ("route", "body", "words"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "same", "lora_path": "/tmp"}, "already served"),
        ("/v1/load_lora_adapter", {"lora_name": "../up", "lora_path": "/tmp"}, "lora_name: must be a name"),
        ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/tmp"}, "lora_path: '/tmp' is not a folder inside ADAPTER_DIR"),
        ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "../a"}, "is not a folder inside ADAPTER_DIR"),
        ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "escape"}, "is not a folder inside ADAPTER_DIR"),
        ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "missing"}, "lora_path: 'missing' has no adapter_config.json"),
        ("/v1/load_lora_adapter", {"lora_name": "new"}, "lora_path: Field required"),
        ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/tmp", "zebra": 1}, "zebra"),
        ("/v1/unload_lora_adapter", {"lora_name": "same"}, "it comes from LORA_ADAPTERS"),
        ("/v1/unload_lora_adapter", {"lora_name": "nobody"}, "no such adapter"),
    ],
)
def test_bad_loads_and_unloads_are_refused_naming_the_field(served, route, body, words):
    response = served.post(route, json=body)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


def test_runtime_adapters_without_an_api_key_are_warned_about(served, folders, caplog):
    worker = served.worker
    with caplog.at_level("WARNING"), running(create_app(worker, ServerSettings())):
        pass
    assert "ALLOW_RUNTIME_ADAPTERS=1 without API_KEY" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), running(create_app(worker, ServerSettings(api_key="sk-x"))):
        pass
    assert "ALLOW_RUNTIME_ADAPTERS" not in caplog.text


def test_runtime_adapters_are_off_unless_the_operator_allows_them(fp32_worker, folders):
    with running(create_app(fp32_worker, ServerSettings())) as url:
        response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(folders["a"])})
    assert response.status_code == 403 and "ALLOW_RUNTIME_ADAPTERS=1" in response.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_a_runpod_job_cannot_load_adapters_and_is_told_what_to_do_instead(served, folders, route):
    """Each worker of a serverless endpoint is its own process: a load would reach one of them."""
    body = {"lora_name": "fresh", "lora_path": "a"}
    error = jobs.complete(served.worker, {"openai_route": route, "openai_input": body})["error"]
    assert error["param"] == "openai_route" and "ADAPTER_DIR on the endpoint's network volume" in error["message"]
    assert "fresh" not in served.worker.adapters.known()


def test_an_adapter_that_ships_a_chat_template_gets_it_for_chat(served, folders):
    messages = [{"role": "user", "content": "Name a river."}]
    tokenizer = served.worker.loaded.tokenizer
    expected = tokenizer(tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False), add_special_tokens=False)["input_ids"]
    counted = served.post("/tokenize", json={"model": "templated", "messages": messages}).json()
    assert counted["tokens"] == expected
    assert served.post("/tokenize", json={"model": "a", "messages": messages}).json()["tokens"] != expected  # the model's own
    chat = served.post("/v1/chat/completions", json={"model": "templated", "messages": messages, "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == len(expected)


def test_requests_in_flight_are_not_harmed_by_loads_and_unloads(served):
    body = {"model": "same", "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    alone = served.post("/v1/completions", json=body).json()["choices"][0]["text"]
    served.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "b"}).raise_for_status()
    busy_alone = served.post("/v1/completions", json={**body, "model": "busy"}).json()["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(served.post, "/v1/completions", json=b) for b in (body, {**body, "model": "busy"})]
        while served.worker.engine.running < 2 and not all(future.done() for future in running):  # both admitted: in use
            time.sleep(0.02)
        served.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "a"}).raise_for_status()
        served.post("/v1/unload_lora_adapter", json={"lora_name": "busy"}).raise_for_status()
        answers = [future.result().json()["choices"][0]["text"] for future in running]
    assert answers == [alone, busy_alone]
    assert served.post("/v1/completions", json={**body, "model": "busy"}).status_code == 404
    assert served.post("/v1/completions", json={**body, "model": "late"}).json()["choices"][0]["text"] == alone  # late is a's copy
