"""Per-request LoRA adapters: mixed batches, LRU loading, the list route, every refusal."""

import shutil

import pytest
from conftest import concurrently, job, seed_tasks, uncached
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from llm_worker.service import Worker
from llm_worker.settings import Settings

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, pirate_adapter, robot_adapter):
    folder = tmp_path_factory.mktemp("adapter_dir")
    shutil.copytree(pirate_adapter, folder / "pirate")
    shutil.copytree(robot_adapter, folder / "robot")
    return folder


@pytest.fixture(scope="module")
def multi(adapter_dir):
    """fp32, so that batch composition cannot change a greedy answer through rounding."""
    worker = Worker.start(Settings(dtype="float32", adapter_dir=adapter_dir))
    yield worker
    worker.close()


def ask(worker, adapter=None, instruction=FRANCE, **generation):
    request = job(instruction, max_new_tokens=generation.pop("max_new_tokens", 24), **generation)
    if adapter is not None:
        request["adapter"] = adapter
    return worker.complete(request)


def test_each_adapter_changes_the_answer_in_its_own_way(multi):
    base, pirate, robot = ask(multi), ask(multi, "pirate"), ask(multi, "robot")
    assert "Paris" in base["output"] and base["adapter"] is None
    assert pirate["output"].startswith("Ahoy") and pirate["adapter"] == "pirate"
    assert robot["output"].startswith("Beep") and robot["adapter"] == "robot"
    assert uncached(ask(multi, "base")) == uncached(base)


def test_mixed_batch_answers_equal_solo_answers(multi):
    prompts = [FRANCE, *(task["instruction"] for task in seed_tasks(3))]
    requests = []
    for i, prompt in enumerate(prompts):
        for adapter in (None, "pirate", "robot"):
            request = job(prompt, max_new_tokens=8 + 4 * i)
            if adapter:
                request["adapter"] = adapter
            requests.append(request)
    solo = [multi.complete(r) for r in requests]
    together = concurrently(multi, requests)
    assert uncached(together) == uncached(solo)
    assert {r["adapter"] for r in together} == {None, "pirate", "robot"}


def test_list_adapters_route(multi):
    ask(multi, "pirate")
    listing = multi.complete({"list_adapters": True})
    names = {entry["name"]: entry for entry in listing["adapters"]}
    assert set(names) == {"pirate", "robot"}
    assert names["pirate"]["loaded"] is True and names["pirate"]["origin"] == "ADAPTER_DIR"
    assert "pirate" in listing["loaded"]
    assert listing["default"] == "base"


def test_list_adapters_refuses_extra_keys(multi):
    assert "prompt_config: Extra inputs" in multi.complete({"list_adapters": True, "prompt_config": {}})["error"]


def test_least_recently_used_adapter_is_unloaded(started, adapter_dir):
    worker = started(dtype="float32", adapter_dir=adapter_dir, max_loaded_adapters=1)
    assert ask(worker, "pirate")["output"].startswith("Ahoy")
    assert worker.complete({"list_adapters": True})["loaded"] == ["pirate"]
    assert ask(worker, "robot")["output"].startswith("Beep")
    assert worker.complete({"list_adapters": True})["loaded"] == ["robot"]
    assert ask(worker, "pirate")["output"].startswith("Ahoy")
    assert "Paris" in ask(worker)["output"]


def test_requests_for_two_adapters_with_one_slot_both_finish(started, adapter_dir):
    worker = started(dtype="float32", adapter_dir=adapter_dir, max_loaded_adapters=1)
    results = concurrently(worker, [{**job(FRANCE, max_new_tokens=16), "adapter": name} for name in ("pirate", "robot")])
    assert results[0]["output"].startswith("Ahoy") and results[1]["output"].startswith("Beep")


def test_loading_an_adapter_leaves_running_requests_correct(multi, adapter_dir, tmp_path):
    shutil.copytree(adapter_dir / "robot", adapter_dir / "robot2")
    try:
        long_base = job("Write a story about a lighthouse keeper.", max_new_tokens=60)
        alone = multi.complete(long_base)
        results = concurrently(multi, [long_base, {**job(FRANCE, max_new_tokens=12), "adapter": "robot2"}])
        assert uncached(results[0]) == uncached(alone)
        assert results[1]["output"].startswith("Beep")
    finally:
        shutil.rmtree(adapter_dir / "robot2")


def test_unknown_adapter_lists_the_available_names(multi):
    error = ask(multi, "wizard")["error"]
    assert error == "adapter: unknown adapter 'wizard'; available: base, pirate, robot"


@pytest.mark.parametrize("name", ["../pirate", "/etc/passwd", "pirate/../robot", ".hidden", "a" * 65])
def test_names_cannot_be_paths(multi, name):
    error = ask(multi, name)["error"]
    assert error.startswith("adapter: must be a name of 1-64 letters")


def test_symlink_out_of_the_adapter_dir_is_refused(multi, adapter_dir, tmp_path, pirate_adapter):
    outside = tmp_path / "outside"
    shutil.copytree(pirate_adapter, outside)
    (adapter_dir / "sneaky").symlink_to(outside)
    try:
        assert ask(multi, "sneaky")["error"] == "adapter: 'sneaky' links outside ADAPTER_DIR; refused"
        assert "sneaky" not in {a["name"] for a in multi.complete({"list_adapters": True})["adapters"]}
    finally:
        (adapter_dir / "sneaky").unlink()


def test_adapter_for_another_base_model_is_refused_at_load(multi, adapter_dir):
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter_dir / "alien")
    try:
        error = ask(multi, "alien")["error"]
        assert error.startswith("adapter 'alien' was trained for another base model")
        assert "needs 576" in error
        assert "Paris" in ask(multi)["output"], "the refusal must leave the model untouched"
    finally:
        shutil.rmtree(adapter_dir / "alien")


def test_adapter_above_the_rank_limit_is_refused(started, adapter_dir):
    worker = started(dtype="float32", adapter_dir=adapter_dir, max_lora_rank=4)
    assert ask(worker, "pirate")["error"] == "adapter 'pirate': rank 8 exceeds MAX_LORA_RANK=4"


def test_hub_adapters_need_allow_hub_adapters(started, adapter_dir):
    worker = started(adapter_dir=adapter_dir, lora_adapters="hubby=someone/some-lora")
    error = ask(worker, "hubby")["error"]
    assert "Hub adapters are disabled" in error and "ALLOW_HUB_ADAPTERS=1" in error


def test_lora_adapters_variable_names_adapters_anywhere(started, tmp_path, pirate_adapter):
    worker = started(dtype="float32", adapter_dir=tmp_path / "empty", lora_adapters=f"arr={pirate_adapter}")
    result = ask(worker, "arr")
    assert result["output"].startswith("Ahoy") and result["adapter"] == "arr"


def test_lora_weights_is_the_default_adapter_and_base_still_reachable(started, adapter_dir, pirate_adapter):
    worker = started(dtype="float32", adapter_dir=adapter_dir, lora_weights=str(pirate_adapter))
    assert ask(worker)["output"].startswith("Ahoy")
    assert "Paris" in ask(worker, "base")["output"]
    assert ask(worker, "robot")["output"].startswith("Beep")
    assert worker.complete({"list_adapters": True})["default"] == "pirate"


def test_merged_lora_serves_only_the_merged_adapter(started, pirate_adapter):
    worker = started(dtype="float32", lora_weights=str(pirate_adapter), merge_lora=True)
    assert ask(worker)["output"].startswith("Ahoy")
    assert "MERGE_LORA=1 merged 'pirate'" in ask(worker, "base")["error"]


def test_malformed_lora_adapters_setting_is_refused():
    with pytest.raises(ValueError, match="not name=path_or_hub_id"):
        Settings(lora_adapters="just-a-path")


# ---------------------------------------------------------------- adapters the worker cannot answer as PEFT would
@pytest.fixture(scope="module")
def tiny_llama_and_tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer))
    return LlamaForCausalLM(config).eval(), tokenizer


def test_an_adapter_trained_with_a_resized_vocabulary_is_refused_naming_both_sizes(tiny_llama_and_tokenizer, tmp_path):
    from copy import deepcopy

    from llm_worker.model.adapters import AdapterError, check_compatible

    model, tokenizer = tiny_llama_and_tokenizer
    grown = deepcopy(model)
    grown.resize_token_embeddings(len(tokenizer) + 2)
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    get_peft_model(grown, config).save_pretrained(tmp_path / "grown")
    with pytest.raises(AdapterError, match=rf"resized vocabulary \({len(tokenizer) + 2} tokens .* has {len(tokenizer)}\)"):
        check_compatible(model, tmp_path / "grown", "grown", 64, tokenizer)


def test_an_adapter_whose_tokenizer_adds_tokens_is_refused_and_one_with_the_base_tokenizer_is_not(tiny_llama_and_tokenizer, tmp_path):
    from copy import deepcopy

    from llm_worker.model.adapters import AdapterError, check_compatible

    model, tokenizer = tiny_llama_and_tokenizer
    get_peft_model(deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    check_compatible(model, tmp_path / "plain", "plain", 64, tokenizer)  # the base's own tokenizer: served

    shutil.copytree(tmp_path / "plain", tmp_path / "added")
    extended = deepcopy(tokenizer)
    extended.add_tokens(["<|tool_call|>"])
    extended.save_pretrained(tmp_path / "added")
    with pytest.raises(AdapterError, match=r"1 token\(s\) the base model's tokenizer lacks \(e.g. \['<\|tool_call\|>'\]\)"):
        check_compatible(model, tmp_path / "added", "added", 64, tokenizer)
