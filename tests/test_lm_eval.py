"""lm-evaluation-harness itself against the running server: its ``local-completions`` backend with
the client's defaults (prompts as token ids, the tokenizer read from the server's vLLM routes)
and its ``hf`` backend on the same model folder in fp32 give the same scores, sample by sample, on
three small tasks written here: a multiple-choice task scored by loglikelihood, a perplexity task
(rolling loglikelihood over Alpaca seed instructions) and a generate-until task."""

import json
import math

import lm_eval
import pytest
import torch
from conftest import SEED_TASKS, running
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_worker.doors.app import create_app
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

KEY = "sk-harness-77a1"
TOLERANCE = 1e-4  # fp32: a loglikelihood from the server against the model's own forward (measured: ~6e-6)

QUESTIONS = [  # question, choices, the index of the right one
    ("What is the capital of France?", ["Paris", "Madrid", "Tokyo"], 0),
    ("Which animal says moo?", ["a cat", "a cow", "a frog"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue"], 2),
    ("How many legs does a spider have?", ["eight", "six", "four"], 0),
    ("What do bees make?", ["milk", "honey", "silk"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth"], 2),
]
SUMS = [(2, 3), (10, 5), (7, 8), (20, 22)]


def tasks(folder):
    """Three task files and their data, as someone scoring their fine-tune would write them."""
    data = folder / "data"
    data.mkdir()
    rows = {
        "choice": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "sums": [{"question": f"{a} + {b} =", "answer": str(a + b)} for a, b in SUMS],
        "seed": [{"text": json.loads(line)["instruction"]} for line in SEED_TASKS.read_text().splitlines()[:5]],
    }
    for name, items in rows.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))

    def dataset(name):
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / name}.jsonl\n  cache_dir: {folder / 'cache'}\ntest_split: test\n"

    (folder / "choice.yaml").write_text(
        "task: worker_choice\noutput_type: multiple_choice\n" + dataset("choice")
        + 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "perplexity.yaml").write_text(
        "task: worker_perplexity\noutput_type: loglikelihood_rolling\n" + dataset("seed")
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "sums.yaml").write_text(
        "task: worker_sums\noutput_type: generate_until\n" + dataset("sums")
        + 'doc_to_text: "{{question}}"\ndoc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return TaskManager(include_path=str(folder))


def evaluate(model: str, model_args: dict, manager: TaskManager) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["worker_choice", "worker_perplexity", "worker_sums"],
        task_manager=manager,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


@pytest.fixture(scope="module")
def harness(base_model_dir, tmp_path_factory, monkeypatch_module):
    """Both backends' results: the server (fp32) behind API_KEY, and transformers on the same folder."""
    manager = tasks(tmp_path_factory.mktemp("lm_eval_tasks"))
    worker = Worker.start(Settings(dtype="float32"))
    try:
        app = create_app(worker, ServerSettings(api_key=KEY))
        with running(app) as url:
            monkeypatch_module.setenv("OPENAI_API_KEY", KEY)  # how local-completions sends the key
            served = evaluate(
                "local-completions",
                {"base_url": f"{url}/v1/completions", "model": worker.loaded.name, "auth_token": KEY, "max_length": 2048},
                manager,
            )
        counted = app.state.door.metrics.requests
        served["tokenizer_routes"] = {route: counted.labels(route, "success")._value.get() for route in ("/tokenizer_info", "/tokenize")}
    finally:
        worker.close()
    local = evaluate("hf", {"pretrained": str(base_model_dir), "dtype": "float32", "device": "cpu"}, manager)
    return served, local


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def test_the_harness_used_the_servers_tokenizer_routes(harness):
    served, _ = harness
    assert served["config"]["model"] == "local-completions"
    assert served["config"]["model_args"]["base_url"].endswith("/v1/completions")
    # the defaults: no model folder named, the tokenizer is the server's (/tokenizer_info, /tokenize)
    assert "tokenizer" not in served["config"]["model_args"] and "pretrained" not in served["config"]["model_args"]
    assert served["tokenizer_routes"]["/tokenizer_info"] >= 1 and served["tokenizer_routes"]["/tokenize"] >= 1


def test_multiple_choice_scores_equal_the_hf_backends(harness):
    served, local = harness
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["worker_choice"][metric] == local["results"]["worker_choice"][metric]
    for ours, theirs in zip(samples(served, "worker_choice"), samples(local, "worker_choice"), strict=True):
        assert ours["doc_id"] == theirs["doc_id"] and ours["target"] == theirs["target"]
        for (got, greedy), (want, want_greedy) in zip(
            [r[0] for r in ours["resps"]], [r[0] for r in theirs["resps"]], strict=True
        ):
            assert abs(float(got) - float(want)) < TOLERANCE and greedy == want_greedy
    assert served["results"]["worker_choice"]["acc,none"] > 1 / 3  # better than chance: the scores mean something


def test_perplexity_equals_the_hf_backends(harness):
    served, local = harness
    ours, theirs = served["results"]["worker_perplexity"], local["results"]["worker_perplexity"]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours[metric], theirs[metric], rel_tol=1e-4), metric
    for mine, other in zip(samples(served, "worker_perplexity"), samples(local, "worker_perplexity"), strict=True):
        assert abs(float(mine["resps"][0][0]) - float(other["resps"][0][0])) < 5 * TOLERANCE  # a sum over a whole instruction's tokens


def test_generate_until_answers_equal_the_hf_backends(harness):
    served, local = harness
    ours, theirs = samples(served, "worker_sums"), samples(local, "worker_sums")
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs]
    assert all(s["resps"][0][0] and "\n" not in s["resps"][0][0] for s in ours)  # cut at the stop sequence
    assert served["results"]["worker_sums"]["exact_match,none"] == local["results"]["worker_sums"]["exact_match,none"]


def test_the_per_token_logprobs_are_transformers_own(harness, base_model_dir):
    """The multiple-choice continuations' loglikelihoods, against a plain forward and log-softmax."""
    served, _ = harness
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    for sample in samples(served, "worker_choice"):
        for (context, continuation), ((got, _),) in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids, whole = tokenizer(context)["input_ids"], tokenizer(context + continuation)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
            want = logprobs[len(context_ids) - 1 :].gather(1, torch.tensor(whole[len(context_ids) :])[:, None]).sum()
            assert abs(float(got) - want.item()) < TOLERANCE
