"""Quantized checkpoints: a folder whose config carries a ``quantization_config`` is served through
transformers' own quantizer, with the tokens of transformers' ``generate`` on the same checkpoint,
with an adapter on top (QLoRA-style); a method that cannot run here is refused by name.

The checkpoint is made here with its method's own library: the embedded model quantized to NF4
by bitsandbytes, saved.
"""

import asyncio
import json
import logging
import shutil

import pytest
import torch
from conftest import seed_tasks
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from llm_worker.model.loading import keep_4bit_weights_unpacked
from llm_worker.service import Worker
from llm_worker.settings import Settings


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory, base_model_dir):
    folder = tmp_path_factory.mktemp("nf4") / "smollm2-nf4"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32, quantization_config=config, device_map={"": "cpu"})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nf4_worker(nf4_checkpoint, pirate_adapter, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("nf4-adapters")
    shutil.copytree(pirate_adapter, adapters / "pirate")
    worker = Worker.start(Settings(base_model=str(nf4_checkpoint), dtype="float32", adapter_dir=adapters, kv_cache_tokens=4096))
    assert worker.load_error is None, worker.load_error
    yield worker
    worker.close()


def greedy(worker, instruction: str, adapter: str | None = None) -> tuple[list[int], list[int]]:
    job = {"prompt_config": {"instruction": instruction}, "generation_config": {"max_new_tokens": 16}}
    _, request = worker.prepare({**job, "adapter": adapter} if adapter else job)

    async def run():
        async for event in worker.engine.stream(request):
            if hasattr(event, "token_ids"):
                return event.token_ids

    return request.prompt_ids, asyncio.run(run())


def reference(model, ids: list[int], count: int) -> list[int]:
    """transformers' greedy tokens, its 4-bit layers in the format the worker keeps them in
    (``keep_4bit_weights_unpacked``: bitsandbytes' CPU repacking computes in bf16)."""
    keep_4bit_weights_unpacked(model)
    with torch.inference_mode():
        return model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()[:count]


def test_a_bitsandbytes_checkpoint_answers_as_transformers_generate_does_on_it(nf4_worker, nf4_checkpoint):
    layers = [m for m in nf4_worker.loaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) >= 7 * nf4_worker.loaded.model.config.num_hidden_layers, "served quantized, as saved"
    model = AutoModelForCausalLM.from_pretrained(nf4_checkpoint, dtype=torch.float32, device_map={"": "cpu"})
    for task in seed_tasks(3, skip=170):
        ids, tokens = greedy(nf4_worker, task["instruction"])
        assert tokens and tokens == reference(model, ids, len(tokens))


def test_an_adapter_on_a_quantized_checkpoint_answers_as_peft_does(nf4_worker, nf4_checkpoint, pirate_adapter):
    """The adapter is loaded after the engine has run (its probe step), as any adapter is."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(nf4_checkpoint, dtype=torch.float32, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, pirate_adapter).eval()
    instruction = seed_tasks(1, skip=173)[0]["instruction"]
    ids, tokens = greedy(nf4_worker, instruction, adapter="pirate")
    assert tokens == reference(model, ids, len(tokens))
    assert tokens != greedy(nf4_worker, instruction)[1], "the adapter changes the answer"


def test_the_start_log_names_the_method_and_the_weights_bytes(nf4_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="llm_worker"):
        worker = Worker.start(Settings(base_model=str(nf4_checkpoint), dtype="float32", kv_cache_tokens=1024))
    worker.close()
    text = caplog.text
    assert "a quantized checkpoint: bitsandbytes, int4 weights" in text
    assert "Quantized weights (bitsandbytes, int4 weights):" in text and "GiB on cpu" in text
    assert "KV cache: 1024 tokens" in text


def test_load_4bit_on_a_checkpoint_already_quantized_is_refused(nf4_checkpoint):
    worker = Worker.start(Settings(base_model=str(nf4_checkpoint), load_4bit=True))
    assert "the checkpoint is already quantized (bitsandbytes, int4 weights): unset LOAD_4BIT" in worker.load_error


def quantized_folder(base_model_dir, tmp_path, quantization: dict):
    """The embedded model's files with a ``quantization_config`` written into its config: what a
    refusal reads before any weight is loaded."""
    folder = tmp_path / quantization["quant_method"]
    shutil.copytree(base_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return folder


FP8_BLOCKS = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_COMPRESSED = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
}


@pytest.mark.parametrize("quantization", [FP8_BLOCKS, FP8_COMPRESSED], ids=["fp8", "compressed-tensors fp8"])
def test_fp8_weights_on_the_cpu_are_refused_instead_of_silently_dequantized(quantization, base_model_dir, tmp_path):
    worker = Worker.start(Settings(base_model=str(quantized_folder(base_model_dir, tmp_path, quantization))))
    assert worker.engine is None
    assert "FP8 weights need a GPU of compute capability 8.9 or newer" in worker.load_error
    assert "this worker runs on the cpu, where transformers would silently dequantize them to bf16" in worker.load_error


def test_a_gptq_checkpoint_without_its_library_is_refused_naming_the_package(base_model_dir, tmp_path):
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    worker = Worker.start(Settings(base_model=str(quantized_folder(base_model_dir, tmp_path, gptq))))
    assert "gptq, int4 weights: loading it needs the gptqmodel package, which this image lacks (pip install gptqmodel)" in worker.load_error
