"""compressed-tensors checkpoints (the format llm-compressor publishes), made here with
compressed-tensors' own library: W4A16 served with the tokens of transformers' ``generate`` on the
same checkpoint, an adapter on top as PEFT answers, and the start log saying what it takes in
memory; FP8 (what ``device_check`` serves on a GPU) refused on the CPU."""

import logging
import shutil

import pytest
import torch
from conftest import seed_tasks
from test_quantized import greedy
from transformers import AutoModelForCausalLM

from benchmarks.common import compressed_tensors_checkpoint
from llm_worker.model import quantization
from llm_worker.service import Worker
from llm_worker.settings import Settings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, base_model_dir):
    # round to nearest in groups of 64 (W4A16's own 128 does not divide the embedded model's 576)
    return compressed_tensors_checkpoint(base_model_dir, tmp_path_factory.mktemp("w4a16") / "smollm2-w4a16", "W4A16", group_size=64)


@pytest.fixture(scope="module")
def started(checkpoint, pirate_adapter, tmp_path_factory):
    """(the worker, its start log)."""
    adapters = tmp_path_factory.mktemp("w4a16-adapters")
    shutil.copytree(pirate_adapter, adapters / "pirate")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("llm_worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        worker = Worker.start(Settings(base_model=str(checkpoint), dtype="float32", adapter_dir=adapters, kv_cache_tokens=2048))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert worker.load_error is None, worker.load_error
    yield worker, "\n".join(record.getMessage() for record in records)
    worker.close()


def transformers_model(checkpoint, adapter=None):
    """The checkpoint as transformers loads it; its first forward decompresses the weights (its own
    route), before PEFT wraps them."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        model(torch.tensor([[1]]))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def generate(model, ids: list[int], count: int) -> list[int]:
    with torch.inference_mode():
        return model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()[:count]


def test_a_w4a16_checkpoint_answers_as_transformers_generate_does_on_it(started, checkpoint, base_model_dir):
    worker, _ = started
    model = transformers_model(checkpoint)
    plain = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    differs = False
    for task in seed_tasks(3, skip=165):
        ids, tokens = greedy(worker, task["instruction"])
        assert tokens and tokens == generate(model, ids, len(tokens))
        differs |= tokens != generate(plain, ids, len(tokens))
    assert differs, "the 4-bit weights are served, not the model they were made from"


def test_an_adapter_on_a_w4a16_checkpoint_answers_as_peft_does(started, checkpoint, pirate_adapter):
    worker, _ = started
    instruction = seed_tasks(1, skip=172)[0]["instruction"]
    ids, tokens = greedy(worker, instruction, adapter="pirate")
    assert tokens == generate(transformers_model(checkpoint, pirate_adapter), ids, len(tokens))
    assert tokens != greedy(worker, instruction)[1], "the adapter changes the answer"


def test_the_start_log_says_the_weights_are_decompressed_and_what_they_take(started):
    worker, text = started
    assert "Loading" in text and "(a quantized checkpoint: compressed-tensors, int4 weights)" in text
    assert "Quantized weights (compressed-tensors, int4 weights): " in text
    assert "decompressed to float32 at load: transformers has no integer kernels for compressed-tensors" in text
    assert "KV cache: 2048 tokens" in text
    layer = worker.loaded.model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.float32 and not hasattr(layer, "weight_packed")


def test_an_fp8_checkpoint_is_refused_on_the_cpu_and_would_keep_its_fp8_weights_on_a_gpu(tmp_path, base_model_dir):
    folder = compressed_tensors_checkpoint(base_model_dir, tmp_path / "fp8", "FP8_DYNAMIC")
    read = quantization.read(folder)
    assert read.describe() == "compressed-tensors, float8 weights"
    assert quantization.loading_config(read).use_optimized_inference
    worker = Worker.start(Settings(base_model=str(folder)))
    assert worker.engine is None and "FP8 weights need a GPU of compute capability 8.9 or newer" in worker.load_error
    # the checkpoint is what it says: its weights dequantized are the model's, within FP8's precision
    served = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        served(torch.tensor([[1]]))  # transformers decompresses at the first forward
    original = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    mine, theirs = served.model.layers[3].mlp.up_proj.weight, original.model.layers[3].mlp.up_proj.weight
    assert mine.dtype == torch.float32 and not torch.equal(mine, theirs)
    assert torch.allclose(mine, theirs, rtol=0.07, atol=theirs.abs().max().item() / 400)
