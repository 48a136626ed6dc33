"""The throughput benchmark's CPU protocol (the seed's way alternating with the engine) and its
matrix-product ceiling."""

import asyncio
import importlib.util
import json
import math
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import DEVICE, ROOT

from benchmarks import attention as attention_benchmark
from benchmarks import device_check, simulated_gpu, step_profile, throughput
from benchmarks.baselines import SeedProcess
from benchmarks.common import build_random_llama, matmul_ceiling_tok_s, median_and_quartiles, random_llama, run_alternating
from benchmarks.throughput import format_goals, goals
from benchmarks.workloads import alpaca_workload
from llm_worker.engine.kv_cache import KVPool, KVShape
from llm_worker.engine.runner import StepRunner


def test_the_seed_and_the_engine_alternate_request_by_request_and_both_are_counted(started, base_model_dir, tmp_path):
    folder = build_random_llama("tiny", base_model_dir, tmp_path / "tiny", "cpu", "float32")
    worker = started(base_model=str(folder), dtype="float32")
    jobs = alpaca_workload(3, 5, fixed_length=True)
    seed = SeedProcess(folder)
    try:
        baseline, engine, pairs = asyncio.run(run_alternating(lambda job: worker.handle(job["input"]), seed, jobs, "engine"))
    finally:
        seed.close()
    assert (baseline.requests, baseline.tokens, len(baseline.latency)) == (3, 15, 3)
    assert (engine.requests, engine.tokens, len(engine.latency), len(engine.ttft)) == (3, 15, 3, 3)
    assert engine.label == "engine c=1" and baseline.label == "seed: sequential model.generate, float32"
    assert baseline.seconds == sum(baseline.latency) and engine.seconds > 0
    # one pair per request, the seed first, then the engine first, then the seed first again
    assert [pair.seed_started < pair.engine_started for pair in pairs] == [True, False, True]
    assert [round(pair.seed_tok_s, 6) for pair in pairs] == [round(5 / t, 6) for t in baseline.latency]
    assert all(pair.ratio == pair.engine_tok_s / pair.seed_tok_s > 0 for pair in pairs)


def test_the_one_stream_ratio_is_the_median_pair_and_its_quartiles():
    assert median_and_quartiles([1.0, 0.5, 2.0, 1.1, 0.9]) == (1.0, 0.9, 1.1)
    assert median_and_quartiles([0.8]) == (0.8, 0.8, 0.8)


def test_the_goals_are_printed_with_the_figures_of_the_first_gpu_run():
    """The figures of the first H200 run (docs/performance.md) give the table written there."""
    figures = {
        "engine_tok_s_c1": 115.3, "roofline_tok_s_c1": 294.0, "engine_tok_s_c32": 989.9, "p95_ttft_s_c32": 1.221,
        "engine_tok_s_c128": 1549.5, "transformers_generate_batch_tok_s": 1612.2, "ready_s": 16.0,
    }
    rows = goals(figures, 32)
    assert [(goal.split(" ")[0], met) for goal, _, met in rows] == [("one", False), ("32", False), ("128", False), ("ready", False)]
    assert rows[0][1] == "115.3 tok/s, 39% of 294.0" and rows[2][1].startswith("0.96x")
    met = goals({**figures, "engine_tok_s_c1": 200.0, "p95_ttft_s_c32": 0.4, "engine_tok_s_c32": 4100, "ready_s": 9.5,
                 "ratio_adapters_vs_base": 0.85}, 32)
    assert [m for _, _, m in met] == [True, True, False, True, True]
    assert "| 32 concurrent over random LoRA adapters >= 0.8x the base model | 0.85x | yes |" in format_goals(met)


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


def test_the_device_check_runs_what_exists_with_arguments_its_scripts_accept():
    """The GPU session's phases name test files that exist, modules that import, and throughput
    options its parser accepts (a renamed test or option would cost a device session)."""
    for cpu, shape in ((False, "llama-7b"), (True, "tiny")):
        planned = device_check.phases(shape, cpu)
        assert [name for name, *_ in planned] == [
            "environment", "stand-in", "kernel-tests", "attention", "step-profile", "throughput-default",
            "throughput-kernels", "simulated-gpu", "throughput-attention-kernel", "throughput-compile", "throughput-nf4",
            "throughput-fp8",
        ]
        assert device_check.ON_REQUEST == {"throughput-attention-kernel", "throughput-compile", "throughput-nf4", "throughput-fp8"}
        for name, command, env, limit in planned:
            assert command[0] == sys.executable and 0 < limit <= 300
            if command[1] == "-m":
                assert importlib.util.find_spec(command[2]) is not None, command
            tests = [arg for arg in command if arg.startswith("tests/")]
            assert all((ROOT / test).is_file() for test in tests)
            if name.startswith("throughput"):
                args = throughput.arguments(command[3:])
                assert args.shape == shape and not args.structured and not args.prefix
                assert args.concurrency == ([1, 8] if cpu else [1, 8, 32, 128])
            if name == "simulated-gpu":
                args = simulated_gpu.arguments(command[3:])
                assert (args.real, args.shape) == ((False, None) if cpu else (True, shape))
        kernels = planned[6][2]
        assert planned[8][2]["ATTENTION_BACKEND"] == "triton" and planned[9][2]["DECODE_COMPILE"] == "inductor"
        assert planned[10][2]["LOAD_4BIT"] == "1"
        assert throughput.arguments(planned[11][1][3:]).quantize == ("W8A16" if cpu else "FP8_DYNAMIC")
        assert kernels["ATTENTION_BACKEND"] == "triton" and kernels["DECODE_COMPILE"] == "inductor"
        assert (planned[2][2]["DEVICE"], "TRITON_INTERPRET" in planned[2][2]) == (("cpu", True) if cpu else ("cuda", False))


def test_the_step_profile_times_a_whole_step_and_ranks_what_it_runs():
    """On the CPU the step runs eagerly and the profile ranks operators: the model's matrix
    products lead, once per linear layer (4 layers x 7, and the output head)."""
    model = random_llama("tiny", 512, "cpu", torch.float32).eval()
    pool = KVPool(KVShape.of(model, torch.float32), 4 * 4 + 2, torch.device("cpu"))
    runner = StepRunner(model, pool, torch.device("cpu"), 4, 4, cuda_graphs=True)
    inputs = step_profile.decode_inputs(4, 60)
    assert inputs.block_table == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert inputs.write_index == [4 * 16 + 11, 8 * 16 + 11, 12 * 16 + 11, 16 * 16 + 11]
    found = step_profile.profile(runner, inputs, "cpu", top=3)
    assert found["ms"] > 0 and found["kernels"] > 29
    names = {name: count for name, count, _, _ in found["top"]}
    assert names.get("aten::mm") == 29, found["top"]


def test_the_simulated_gpu_benchmark_runs_both_ways_and_ends_with_its_figures(capsys):
    """Steps one after the other, then overlapped, through the RunPod door on the simulated GPU:
    a line and a table row for each, every answer the same both ways (the stand-in is greedy and
    fp32), the host's parts per step, and the JSON figures last."""
    simulated_gpu.main(["--concurrency", "1", "3", "--requests", "3", "--max-new-tokens", "6"])
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    for c in (1, 3):
        for mode in ("", "_sequential"):
            assert 0 < figures[f"share_c{c}{mode}"] <= 1.01 and figures[f"tok_s_c{c}{mode}"] > 0
    rows = [line for line in lines if line.startswith("| overlapping")]
    assert len(rows) == 2 and all("| 3/3 " in row for row in rows)
    header = next(line for line in lines if line.startswith("| run"))
    assert all(f"{part}_ms" in header for part in ("schedule", "layout", "launch", "sampling", "wait", "accept", "text"))
