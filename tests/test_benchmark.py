"""The throughput benchmark's CPU protocol (the seed's way alternating with the engine) and its
matrix-product ceiling."""

import asyncio
import math
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import DEVICE

from benchmarks import attention as attention_benchmark
from benchmarks.baselines import SeedProcess
from benchmarks.common import build_random_llama, matmul_ceiling_tok_s, run_alternating
from benchmarks.workloads import alpaca_workload


def test_the_seed_and_the_engine_alternate_request_by_request_and_both_are_counted(started, base_model_dir, tmp_path):
    folder = build_random_llama("tiny", base_model_dir, tmp_path / "tiny", "cpu", "float32")
    worker = started(base_model=str(folder), dtype="float32")
    jobs = alpaca_workload(3, 5, fixed_length=True)
    seed = SeedProcess(folder)
    try:
        baseline, engine = asyncio.run(run_alternating(lambda job: worker.handle(job["input"]), seed, jobs, "engine"))
    finally:
        seed.close()
    assert (baseline.requests, baseline.tokens, len(baseline.latency)) == (3, 15, 3)
    assert (engine.requests, engine.tokens, len(engine.latency), len(engine.ttft)) == (3, 15, 3, 3)
    assert engine.label == "engine c=1" and baseline.label == "seed: sequential model.generate, float32"
    assert baseline.seconds == sum(baseline.latency) and engine.seconds > 0


def test_the_matmul_ceiling_is_measured_on_a_bf16_model_with_fp32_lora_weights():
    """PEFT loads LoRA weights in fp32 beside a bf16 base: linears of one width in two dtypes
    (`make bench` crashed at its end in bf16 with adapters)."""
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
    )
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if "lora_" in name} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if "lora_" not in name} == {torch.bfloat16}
    for rows in (1, 4):
        ceiling = matmul_ceiling_tok_s(model, rows, repeats=2)
        assert math.isfinite(ceiling) and ceiling > 0


def test_the_attention_benchmark_compares_both_paths_and_prints_its_table(monkeypatch, capsys):
    """The device run's attention micro-benchmark works before a GPU is spent on it: on the CPU
    with tiny shapes under Triton's interpreter, on a GPU with the real ones, briefly. It also
    asserts that both paths give the same output."""
    context = 40 if DEVICE == "cpu" else 128
    shapes = ["--rows", "1", "2", "--contexts", str(context)]
    monkeypatch.setattr(sys, "argv", ["benchmarks.attention", *shapes, *(["--tiny"] if DEVICE == "cpu" else ["--repeats", "2"])])
    attention_benchmark.main()
    table = capsys.readouterr().out.splitlines()[-4:]
    assert table[0] == "| rows | context | gather_ms | triton_ms | speedup |"
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [(int(row[0]), int(row[1])) for row in cells] == [(1, context), (2, context)]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in cells)
