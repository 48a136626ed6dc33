"""Throughput of the engine against the seed's way (and transformers' own batching), in one run.

    python -m benchmarks.throughput [--shape llama-7b|tiny] [--requests 96] [--sequential-requests 16]
                                    [--quantize FP8_DYNAMIC] [--max-new-tokens 128] [--concurrency 1 8 32 128]
                                    [--adapters 4] [--adapter-concurrency 32] [--peer | --no-peer]
                                    [--structured | --no-structured] [--prefix | --no-prefix]

Without --shape it serves the configured model (the embedded SmolLM2-135M by default) on the
worker's device. With --shape it builds a LLaMA-shaped model with random weights on the device
(CUDA when present), with the embedded tokenizer and no download, and every answer is exactly
--max-new-tokens long. The seed's way (one ``model.generate`` after another) runs in a child
process: on the CPU in fp32, its requests alternating with the engine's c=1 requests (a shared
CPU's speed drifts over minutes); on a GPU in the worker's dtype, first, so that its memory is
free before the worker sizes its KV cache. --peer adds transformers'
``generate_batch`` on the largest run's prompts (default: on with CUDA). The mixed-adapter run
spreads the workload over --adapters random LoRA adapters (0: skip it). The structured run (on by
default) gives every other job a JSON schema, at --adapter-concurrency, against the free run there.
The prefix runs (on by default), at --adapter-concurrency too, serve distinct questions after one
shared ~500-token system prompt, then the Alpaca workload, first with the prefix cache off, then on.

Prints a line as each phase ends, then a table, then (last line) one JSON object with the figures.
"""

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.baselines import SeedProcess, run_seed_baseline, run_transformers_batch
from benchmarks.common import (
    compressed_tensors_checkpoint,
    random_model_folder,
    format_table,
    make_random_adapters,
    matmul_ceiling_tok_s,
    median_and_quartiles,
    memory_bandwidth_gb_s,
    run_alternating,
    run_handler,
)
from benchmarks.workloads import ANSWER_SCHEMA, alpaca_workload, shared_prompt_workload
from llm_worker.engine.constraints import Grammars, grammar_vocab
from llm_worker.model.loading import weight_bytes
from llm_worker.settings import Settings
from model_cache import resolve_base_model

STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["llama-7b", "tiny"], help="random-weight LLaMA shape built on the device")
    parser.add_argument(
        "--quantize", choices=["FP8_DYNAMIC", "W4A16", "W8A16"],
        help="with --shape: serve the random model saved as a compressed-tensors checkpoint of this scheme (made on the device)",
    )
    parser.add_argument("--group-size", type=int, help="with --quantize: the weights' group size, where the scheme's own does not divide the shape")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrent run (at least 2x its concurrency)")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests for the seed baseline and c=1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, help="LoRA adapters in the mixed run (0: skip it; default 4, 0 with --shape)")
    parser.add_argument("--adapter-concurrency", type=int, default=32)
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None, help="run generate_batch too")
    parser.add_argument(
        "--structured", action=argparse.BooleanOptionalAction, default=True,
        help="a run at --adapter-concurrency where every other job answers in JSON under a schema",
    )
    parser.add_argument(
        "--prefix", action=argparse.BooleanOptionalAction, default=True,
        help="a shared ~500-token system prompt before distinct questions, and the Alpaca workload, with the prefix cache on and off",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("llm_worker").setLevel(logging.INFO)  # load time, KV capacity, graph capture
    logging.getLogger("llm_worker.jobs").setLevel(logging.WARNING)  # not a line per job: failures only

    device = "cuda" if torch.cuda.is_available() and os.environ.get("DEVICE", "auto") != "cpu" else "cpu"
    fixed_length = args.shape is not None
    if args.shape:
        folder, dtype, built = random_model_folder(args.shape, device)
        say(f"{'built' if built else 'reusing'} the random {args.shape} model in {folder} ({dtype}, {device})")
        if args.quantize:
            quantized = folder.with_name(f"{folder.name}-{args.quantize.lower()}")
            if not quantized.is_dir():
                compressed_tensors_checkpoint(folder, quantized, args.quantize, device, args.group_size)
            folder = quantized
            say(f"serving it as a compressed-tensors {args.quantize} checkpoint: {folder}")
        os.environ.update(BASE_MODEL=str(folder), DTYPE=dtype)
    os.environ.setdefault("MAX_BATCH_SIZE", str(max(args.concurrency + [args.adapter_concurrency])))
    model_dir = resolve_base_model(Settings())

    sequential = alpaca_workload(args.sequential_requests, args.max_new_tokens, fixed_length=fixed_length)
    concurrent = {
        c: alpaca_workload(max(args.requests, 2 * c), args.max_new_tokens, fixed_length=fixed_length)
        for c in args.concurrency if c > 1
    }
    worker_dtype = Settings().dtype
    baseline_dtype = "float32" if device == "cpu" else (worker_dtype if worker_dtype != "auto" else "bfloat16")
    alternating = device == "cpu" and 1 in args.concurrency
    if alternating:  # a CPU's speed drifts: the seed's requests alternate with the engine's c=1 ones
        seed = SeedProcess(model_dir, device, baseline_dtype)
    else:  # a GPU's memory must be free before the worker sizes its KV cache: the seed's way goes first
        baseline = run_seed_baseline(model_dir, sequential, device, baseline_dtype)
        say(f"{baseline.label}: {baseline.tok_s:.1f} tok/s")
    peer = None
    if args.peer or (args.peer is None and device == "cuda"):
        largest = concurrent[max(concurrent)] if concurrent else sequential
        peer = run_transformers_batch(model_dir, largest, device, baseline_dtype)
        say(f"{peer.label}, {peer.requests} requests: {peer.tok_s:.1f} tok/s")

    adapter_names = []
    if args.adapters is None:
        args.adapters = 0 if args.shape else 4
    if args.adapters:
        adapter_dir = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
        adapter_names = make_random_adapters(model_dir, adapter_dir, args.adapters)
        os.environ["ADAPTER_DIR"] = str(adapter_dir)

    started = time.perf_counter()
    from llm_worker.doors import jobs as runpod_door  # imported after the baselines: it loads torch's CUDA state
    from llm_worker.engine.memory import freeze_heap
    from llm_worker.service import Worker

    worker = Worker.start()  # as handler.py starts it: the deployment's settings, load and engine
    freeze_heap()  # as handler.py does once its worker has started

    def handle(job: dict):  # handler.py's handler: the RunPod door, without the SDK's job loop around it
        return runpod_door.handle(worker, job.get("input"), job.get("id"))

    if worker.load_error:
        raise SystemExit(worker.load_error)
    engine = worker.engine
    say(f"worker ready in {worker.ready_seconds:.1f} s (load {worker.loaded.load_seconds:.1f} s, "
        f"graph capture {engine.runner.capture_seconds:.1f} s; {time.perf_counter() - started:.1f} s with the imports); "
        f"KV cache {engine.capacity_tokens} tokens")

    asyncio.run(run_handler(handle, sequential[:2], 2, "warm-up"))
    runs, peaks, pairs = [], {}, []
    for c in args.concurrency:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if c == 1 and alternating:
            baseline, run, pairs = asyncio.run(run_alternating(handle, seed, sequential, f"engine {worker.loaded.dtype}"))
            seed.close()
            say(f"{baseline.label}, alternating with the engine's requests: {baseline.tok_s:.1f} tok/s")
        else:
            run = asyncio.run(run_handler(handle, sequential if c == 1 else concurrent[c], c, f"engine {worker.loaded.dtype}"))
        if device == "cuda":
            peaks[c] = torch.cuda.max_memory_allocated() / 2**30
        runs.append(run)
        say(f"{run.label}: {run.tok_s:.1f} tok/s, p95 TTFT {run.row()['p95_ttft_s']} s")
    if adapter_names:
        c = args.adapter_concurrency
        base = next((run for run in runs if run.concurrency == c), None) or asyncio.run(
            run_handler(handle, alpaca_workload(args.requests, args.max_new_tokens), c, f"engine {worker.loaded.dtype}")
        )
        mixed_jobs = alpaca_workload(args.requests, args.max_new_tokens, adapters=adapter_names, fixed_length=fixed_length)
        mixed = asyncio.run(run_handler(handle, mixed_jobs, c, f"{len(adapter_names)} LoRA adapters mixed"))
        runs.append(mixed)
        say(f"{mixed.label}: {mixed.tok_s:.1f} tok/s")
    if args.structured:
        c = args.adapter_concurrency
        free = next((run for run in runs if run.concurrency == c and "adapters" not in run.label), None) or asyncio.run(
            run_handler(handle, alpaca_workload(args.requests, args.max_new_tokens), c, f"engine {worker.loaded.dtype}")
        )
        jobs = alpaca_workload(args.requests, args.max_new_tokens, json_schema=ANSWER_SCHEMA)
        structured = asyncio.run(run_handler(handle, jobs, c, "half the jobs under a JSON schema"))
        runs.append(structured)
        fresh = Grammars(worker.loaded.tokenizer, grammar_vocab(engine.vocab, worker.loaded.tokenizer), engine.eos_ids)
        tokenizer_started = time.perf_counter()
        fresh.tokenizer
        compile_started = time.perf_counter()
        fresh.compile("json_schema", ANSWER_SCHEMA)
        compile_ms = (time.perf_counter() - compile_started) * 1000
        tokenizer_ms = (compile_started - tokenizer_started) * 1000
        say(f"{structured.label}: {structured.tok_s:.1f} tok/s ({structured.tok_s / free.tok_s:.2f}x the free run's "
            f"{free.tok_s:.1f}); the schema compiles in {compile_ms:.1f} ms (llguidance's tokenizer, once: {tokenizer_ms:.0f} ms)")
    prefix_runs = {}
    if args.prefix:
        c = args.adapter_concurrency
        shared = shared_prompt_workload(max(args.requests, 2 * c), 32, 500, worker.loaded.tokenizer)
        alpaca = alpaca_workload(max(args.requests, 2 * c), args.max_new_tokens, fixed_length=fixed_length)
        for cache in (False, True):  # the same process, the engine's switch turned; off first, so "on" starts cold
            engine.prefix_caching = cache
            for name, jobs in (("shared system prompt", shared), ("alpaca", alpaca)):
                label = f"{name}, prefix cache {'on' if cache else 'off'}"
                prefix_runs[name, cache] = run = asyncio.run(run_handler(handle, jobs, c, label))
                runs.append(run)
                say(f"{label}: {run.tok_s:.1f} tok/s, p50 TTFT {run.row()['p50_ttft_s']} s, p95 {run.row()['p95_ttft_s']} s")
        engine.prefix_caching = worker.settings.enable_prefix_cache
    bandwidth = memory_bandwidth_gb_s(device)
    weights = weight_bytes(worker.loaded.model)
    ceiling_rows = max(args.concurrency)
    ceilings = {1: matmul_ceiling_tok_s(worker.loaded.model, 1), ceiling_rows: matmul_ceiling_tok_s(worker.loaded.model, ceiling_rows)}

    print(format_table([baseline.row()] + ([peer.row()] if peer else []) + [run.row() for run in runs]))
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": args.shape or worker.loaded.name,
        "dtype": str(worker.loaded.dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "baseline_tok_s": round(baseline.tok_s, 1),
        "weights_mb": round(weights / 2**20, 1),
        "memory_bandwidth_gb_s": round(bandwidth, 1),
        "roofline_tok_s_c1": round(bandwidth * 1e9 / weights, 1),
        "matmul_ceiling_tok_s_c1": round(ceilings[1], 1),
        f"matmul_ceiling_tok_s_{ceiling_rows}rows": round(ceilings[ceiling_rows], 1),
        "kv_cache_tokens": engine.capacity_tokens,
        "graph_capture_s": round(engine.runner.capture_seconds, 1),
    }
    if peer:
        figures["transformers_generate_batch_tok_s"] = round(peer.tok_s, 1)
    for run in runs[: len(args.concurrency)]:
        c = run.concurrency
        figures[f"engine_tok_s_c{c}"] = round(run.tok_s, 1)
        figures[f"ratio_c{c}"] = round(run.tok_s / baseline.tok_s, 2)
        figures[f"p50_ttft_s_c{c}"] = run.row()["p50_ttft_s"]
        figures[f"p95_ttft_s_c{c}"] = run.row()["p95_ttft_s"]
        figures[f"p95_latency_s_c{c}"] = run.row()["p95_latency_s"]
        if c in peaks:
            figures[f"peak_memory_gib_c{c}"] = round(peaks[c], 1)
        if c == 1:
            figures["bandwidth_gb_s_c1"] = round(weights * run.tok_s / 1e9, 1)
        if c == 1 and pairs:  # alternating on a CPU: the median pair, robust to the machine's drift
            median, q1, q3 = median_and_quartiles([pair.ratio for pair in pairs])
            figures["ratio_c1_of_totals"] = figures["ratio_c1"]
            figures["ratio_c1"], figures["ratio_c1_quartiles"] = round(median, 2), [round(q1, 2), round(q3, 2)]
    if adapter_names:
        figures[f"engine_tok_s_c{mixed.concurrency}_adapters{len(adapter_names)}"] = round(mixed.tok_s, 1)
        figures["ratio_adapters_vs_base"] = round(mixed.tok_s / base.tok_s, 2)
    for (name, cache), run in prefix_runs.items():
        key = f"{'shared_prompt' if name.startswith('shared') else 'alpaca'}_cache_{'on' if cache else 'off'}"
        figures[f"{key}_tok_s"] = round(run.tok_s, 1)
        figures[f"{key}_p50_ttft_s"] = run.row()["p50_ttft_s"]
        figures[f"{key}_p95_ttft_s"] = run.row()["p95_ttft_s"]
    for name in ("shared system prompt", "alpaca") if prefix_runs else ():
        on, off = prefix_runs[name, True], prefix_runs[name, False]
        key = "shared_prompt" if name.startswith("shared") else "alpaca"
        figures[f"{key}_cache_ttft_p50_gain"] = round(off.row()["p50_ttft_s"] / max(on.row()["p50_ttft_s"], 1e-9), 2)
        figures[f"{key}_cache_throughput_gain"] = round(on.tok_s / off.tok_s, 2)
    if args.structured:
        figures[f"engine_tok_s_c{structured.concurrency}_half_json"] = round(structured.tok_s, 1)
        figures["ratio_half_json_vs_free"] = round(structured.tok_s / free.tok_s, 2)
        figures["json_schema_compile_ms"] = round(compile_ms, 2)
        figures["llguidance_tokenizer_ms"] = round(tokenizer_ms, 1)
    print(
        f"\nc=1 reads the weights at {figures.get('bandwidth_gb_s_c1', 'n/a')} GB/s "
        f"of {figures['memory_bandwidth_gb_s']} GB/s measured ({weights / 1e6:.0f} MB of weights per token)"
    )
    print(
        f"the model's matrix products alone, with this machine's torch kernels in {figures['dtype']}, allow "
        f"{ceilings[1]:.1f} tok/s for one stream ({ceilings[1] / baseline.tok_s:.2f}x the seed's way) and "
        f"{ceilings[ceiling_rows]:.1f} tok/s in steps of {ceiling_rows} rows ({ceilings[ceiling_rows] / baseline.tok_s:.2f}x)"
    )
    if pairs:
        print(
            f"one stream: the engine at {figures['ratio_c1']}x the seed's way, the median of {len(pairs)} pairs on the same "
            f"request (quartiles {figures['ratio_c1_quartiles'][0]}-{figures['ratio_c1_quartiles'][1]}; "
            f"{figures['ratio_c1_of_totals']}x of the totals)"
        )
    figures["ready_s"] = round(worker.ready_seconds, 1)
    print(format_goals(goals(figures, args.adapter_concurrency)))
    print(json.dumps(figures))
    worker.close()


def goals(figures: dict, adapter_concurrency: int) -> list[tuple[str, str, bool]]:
    """The GPU speed goals (issue #28, set for one H200) with this run's figures: (goal, figure,
    met), for those this run measured."""
    rows = []
    if "engine_tok_s_c1" in figures:
        share = figures["engine_tok_s_c1"] / figures["roofline_tok_s_c1"]
        rows.append(("one stream >= 65% of the roofline", f"{figures['engine_tok_s_c1']} tok/s, {share:.0%} of {figures['roofline_tok_s_c1']}", share >= 0.65))
    if "engine_tok_s_c32" in figures:
        tok_s, p95 = figures["engine_tok_s_c32"], figures["p95_ttft_s_c32"]
        rows.append(("32 concurrent >= 4,000 tok/s, p95 TTFT < 0.5 s", f"{tok_s} tok/s, p95 TTFT {p95} s", tok_s >= 4000 and p95 < 0.5))
    if "engine_tok_s_c128" in figures and "transformers_generate_batch_tok_s" in figures:
        times = figures["engine_tok_s_c128"] / figures["transformers_generate_batch_tok_s"]
        rows.append(("128 concurrent >= 3x generate_batch, nothing failed", f"{times:.2f}x, every request answered", times >= 3))
    if "ratio_adapters_vs_base" in figures:
        rows.append((f"{adapter_concurrency} concurrent over random LoRA adapters >= 0.8x the base model",
                     f"{figures['ratio_adapters_vs_base']}x", figures["ratio_adapters_vs_base"] >= 0.8))
    rows.append(("ready <= 10 s", f"{figures['ready_s']} s", figures["ready_s"] <= 10))
    return rows


def format_goals(rows: list[tuple[str, str, bool]]) -> str:
    lines = ["| goal (set for one H200) | measured | met |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {goal} | {figure} | {'yes' if met else 'no'} |" for goal, figure, met in rows])


if __name__ == "__main__":
    main()
