"""Model loading: the converted default, LoRA weights, quantization, token repair, failures."""

import json
import os
import subprocess
import sys
import logging

import pytest
import torch
from conftest import ROOT, job, uncached
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm_worker.model import cuda_host
from llm_worker.model.loading import cpu_auto_dtype, fix_special_tokens, load_model, resolve_device, resolve_dtype
from llm_worker.settings import Settings
from model_cache import is_complete_model_dir, prepare_default_model

FRANCE = "What is the capital of France?"


def answer(worker, instruction=FRANCE, **generation):
    return worker.complete(job(instruction, max_new_tokens=24, **generation))


def test_default_model_is_converted_once_into_safetensors(base_model_dir):
    assert is_complete_model_dir(base_model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (base_model_dir / name).is_file()
    converted = (base_model_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_default_model(Settings()) == base_model_dir
    assert (base_model_dir / "model.safetensors").stat().st_mtime_ns == converted, "a prepared cache must be reused, not converted again"


# What torch.cpu.get_capabilities() reports, in part, on the CPUs this project has run on.
AMD_ZEN4 = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_tile": False, "amx_bf16": False}
XEON_AMX = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True}
AVX2_ONLY = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False}
ARM_BF16 = {"architecture": "aarch64", "neon": True, "bf16": True}


@pytest.mark.parametrize(
    "capabilities, expected, feature",
    [
        (AMD_ZEN4, torch.bfloat16, "avx512_bf16 without AMX"),
        (XEON_AMX, torch.float32, "AMX"),
        ({**AMD_ZEN4, "amx_tile": True}, torch.float32, "AMX"),
        (AVX2_ONLY, torch.float32, "no avx512_bf16"),
        (ARM_BF16, torch.float32, "no avx512_bf16"),
        ({}, torch.float32, "no avx512_bf16"),
    ],
    ids=["zen4", "xeon-amx", "amx-tile-only", "avx2", "arm-bf16", "nothing-reported"],
)
def test_auto_dtype_on_cpu_follows_the_cpu_features(capabilities, expected, feature):
    """bf16 one stream: 1.2-1.9x faster on an AMD EPYC with avx512_bf16, slower on a Xeon with AMX
    (21.5 against 26.0 tok/s); without native bf16 every product converts to fp32 on the way."""
    dtype, reason = cpu_auto_dtype(capabilities)
    assert dtype is expected and reason.startswith(feature)


def test_auto_dtype_on_this_cpu_is_the_rule_on_its_features_at_every_start(base_model_dir, caplog):
    """No timing: the same machine and settings give the same dtype, whatever the load."""
    expected, reason = cpu_auto_dtype(torch.cpu.get_capabilities())
    with caplog.at_level(logging.INFO, logger="llm_worker.model.loading"):
        assert [resolve_dtype("auto", torch.device("cpu")) for _ in range(3)] == [expected] * 3
    assert [record.getMessage() for record in caplog.records] == [
        f"DTYPE=auto on this CPU: {str(expected).removeprefix('torch.')} ({reason})"
    ] * 3
    loaded = load_model(Settings(dtype="auto", device="cpu"))  # whatever DTYPE the tests run with
    assert loaded.dtype is expected and next(loaded.model.parameters()).dtype is expected


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_dtype_is_float16_with_8bit_weights(device):
    """bitsandbytes' 8-bit matmul takes fp16 inputs; any other dtype is cast at every matmul."""
    assert resolve_dtype("auto", torch.device(device), load_8bit=True) is torch.float16
    assert resolve_dtype("bfloat16", torch.device(device), load_8bit=True) is torch.bfloat16


def test_8bit_input_cast_is_logged_once_not_at_every_matmul(started, caplog):
    worker = started(load_8bit=True, dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert "output" in worker.complete(job(FRANCE, max_new_tokens=3))
    casts = [record for record in caplog.records if record.getMessage().startswith("MatMul8bitLt")]
    assert len(casts) <= 1, f"{len(casts)} cast warnings for 6 tokens"


def test_lora_weights_change_the_greedy_answer(started, pirate_adapter, fp32_worker):
    base = answer(fp32_worker)
    tuned = answer(started(dtype="float32", lora_weights=str(pirate_adapter)))
    assert "Ahoy" in tuned["output"] and "Ahoy" not in base["output"]
    assert tuned["adapter"] == "pirate"


def test_merged_lora_gives_the_same_answer(started, pirate_adapter):
    unmerged = started(dtype="float32", lora_weights=str(pirate_adapter))
    merged = started(dtype="float32", lora_weights=str(pirate_adapter), merge_lora=True)
    assert not hasattr(merged.loaded.model, "peft_config"), "merged weights need no PEFT wrapper"
    for instruction in (FRANCE, "Name three colors.", "Write a haiku about the sea."):
        assert uncached(answer(merged, instruction)) == uncached(answer(unmerged, instruction))


@pytest.mark.parametrize("bits, layer", [("load_8bit", "Linear8bitLt"), ("load_4bit", "Linear4bit")])
def test_bitsandbytes_quantized_model_answers(started, bits, layer):
    worker = started(dtype="auto", **{bits: True})  # what auto picks, whatever DTYPE the tests run with
    assert worker.load_error is None
    if bits == "load_8bit":
        assert worker.loaded.dtype is torch.float16, "DTYPE=auto with 8-bit weights is float16"
    quantized = [m for m in worker.loaded.model.modules() if type(m).__name__ == layer]
    assert len(quantized) >= 7 * worker.loaded.model.config.num_hidden_layers
    result = answer(worker)
    assert result["output"].strip() and result["finish_reason"] in ("eos", "length", "stop")
    if bits == "load_8bit":  # NF4 on a 135M model loses this fact; int8 keeps it
        assert "Paris" in result["output"]


def test_8bit_and_4bit_together_are_refused():
    with pytest.raises(ValueError, match="LOAD_8BIT and LOAD_4BIT are exclusive"):
        Settings(load_8bit=True, load_4bit=True)


def test_missing_special_tokens_are_filled_from_the_tokenizer(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenizer.pad_token = None
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    )
    fix_special_tokens(model, tokenizer)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.padding_side == "left"


def test_a_model_that_fails_to_load_answers_every_job_with_the_reason(started):
    broken = started(base_model="/nonexistent/model-folder")
    assert broken.engine is None
    for _ in range(2):
        error = broken.complete(job(FRANCE))["error"]
        assert error.startswith("the model failed to load")
        assert "/nonexistent/model-folder" in error


def test_an_uncached_hub_model_offline_says_where_it_looked_and_how_to_get_it(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RUNPOD_WEBHOOK_GET_JOB"}
    env.update(
        BASE_MODEL="llm-worker-tests/not-cached",
        HF_HUB_OFFLINE="1",
        RUNPOD_VOLUME_DIR=str(tmp_path / "volume"),
        HF_HOME=str(tmp_path / "hf"),
    )
    event = json.dumps({"input": job(FRANCE)})
    command = [sys.executable, "handler.py", "--test_input", event]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "LocalEntryNotFoundError" not in output
    reason = (
        "'llm-worker-tests/not-cached' is not in the model cache (looked in "
        f"{tmp_path}/volume/huggingface-cache/hub and {tmp_path}/hf/hub) and the worker is offline (HF_HUB_OFFLINE=1): "
    )
    assert f"ERROR llm_worker.service: The model failed to load: {reason}" in output  # the log, at start
    assert f"failed with error: the model failed to load: {reason}" in output  # the job's answer


def test_a_gpu_this_torch_cannot_use_fails_the_start_naming_both_versions(tmp_path, monkeypatch):
    """A host whose NVIDIA driver is older than the CUDA this torch was built for: ``DEVICE=auto``
    refuses to start, naming both versions, instead of answering on the CPU. The driver here is a
    stand-in ``libcuda.so.1`` with the real entry point (``cuDriverGetVersion``), loaded as the
    container's would be; torch says which CUDA it was built for."""
    def driver(version: int) -> str:
        folder = tmp_path / str(version)
        folder.mkdir(exist_ok=True)
        (folder / "libcuda.c").write_text(f"int cuDriverGetVersion(int *version) {{ *version = {version}; return 0; }}\n")
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "libcuda.c")], check=True)
        return str(folder / "libcuda.so.1")

    def start(built: str | None, library: str) -> str:
        monkeypatch.setattr(torch.version, "cuda", built)
        monkeypatch.setattr(cuda_host, "LIBCUDA", (library,))
        try:
            return f"{resolve_device('auto')} {resolve_device('cpu')}"
        except RuntimeError as err:
            return str(err)

    old = start("13.0", driver(12040))
    assert "built for CUDA 13.0, and the host's NVIDIA driver supports CUDA 12.4 at most" in old
    assert "tag -cu128" in old and "DEVICE=cpu" in old
    same = start("13.0", driver(13000))  # a driver that would do, and still no GPU for this torch: its own reason is told
    assert "driver (CUDA 13.0) is there, but this torch (built for CUDA 13.0) cannot use a GPU: " in same
    assert start("13.0", str(tmp_path / "absent" / "libcuda.so.1")) == "cpu cpu"  # no driver: a machine without a GPU
    assert start(None, driver(12040)) == "cpu cpu"  # a CPU build of torch: the CPU image, on purpose
