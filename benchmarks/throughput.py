"""Throughput of the engine against the seed's way, on the same model, in one run.

    python -m benchmarks.throughput [--requests 96] [--sequential-requests 16]
                                    [--max-new-tokens 128] [--concurrency 1 8 32]
                                    [--adapters 4] [--adapter-concurrency 32]

The mixed-adapter run sends the concurrent workload spread over --adapters LoRA adapters (rank 8,
q/v, random weights, made in a temporary ADAPTER_DIR) and compares it with the same workload on
the base model alone, at --adapter-concurrency.

Prints a table, then (last line) one JSON object with the figures.
"""

import argparse
import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path

from llm_worker.benchmark import (
    alpaca_workload,
    format_table,
    make_random_adapters,
    memory_bandwidth_gb_s,
    run_handler,
    run_seed_baseline,
    weight_bytes,
)
from llm_worker.settings import Settings
from model_cache import resolve_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrent run (c > 1)")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests for the seed baseline and c=1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters in the mixed run (0: skip it)")
    parser.add_argument("--adapter-concurrency", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    adapter_names = []
    if args.adapters:
        adapter_dir = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
        adapter_names = make_random_adapters(resolve_base_model(Settings()), adapter_dir, args.adapters)
        os.environ["ADAPTER_DIR"] = str(adapter_dir)

    import handler  # the real handler path: its worker loads the model as the deployment would

    worker = handler.worker
    if worker.load_error:
        raise SystemExit(worker.load_error)
    sequential = alpaca_workload(args.sequential_requests, args.max_new_tokens)
    concurrent = alpaca_workload(args.requests, args.max_new_tokens)

    baseline = run_seed_baseline(resolve_base_model(worker.settings), sequential)
    asyncio.run(run_handler(handler.handler, sequential[:2], 2, "warm-up"))
    runs = [
        asyncio.run(run_handler(handler.handler, sequential if c == 1 else concurrent, c, f"engine {worker.loaded.dtype}"))
        for c in args.concurrency
    ]
    if adapter_names:
        c = args.adapter_concurrency
        base = next((run for run in runs if run.concurrency == c), None) or asyncio.run(
            run_handler(handler.handler, concurrent, c, f"engine {worker.loaded.dtype}")
        )
        mixed_jobs = alpaca_workload(args.requests, args.max_new_tokens, adapters=adapter_names)
        mixed = asyncio.run(run_handler(handler.handler, mixed_jobs, c, f"{len(adapter_names)} LoRA adapters mixed"))
        runs.append(mixed)
    bandwidth = memory_bandwidth_gb_s()
    weights = weight_bytes(worker.loaded.model)

    print(format_table([baseline.row()] + [run.row() for run in runs]))
    figures = {
        "device": str(worker.loaded.device),
        "dtype": str(worker.loaded.dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "baseline_tok_s": round(baseline.tok_s, 1),
        "weights_mb": round(weights / 2**20, 1),
        "memory_bandwidth_gb_s": round(bandwidth, 1),
    }
    for run in runs[: len(args.concurrency)]:
        c = run.concurrency
        figures[f"engine_tok_s_c{c}"] = round(run.tok_s, 1)
        figures[f"ratio_c{c}"] = round(run.tok_s / baseline.tok_s, 2)
        figures[f"p50_ttft_s_c{c}"] = run.row()["p50_ttft_s"]
        figures[f"p95_ttft_s_c{c}"] = run.row()["p95_ttft_s"]
        figures[f"p95_latency_s_c{c}"] = run.row()["p95_latency_s"]
        if c == 1:
            figures["bandwidth_gb_s_c1"] = round(weights * run.tok_s / 1e9, 1)
    if adapter_names:
        figures[f"engine_tok_s_c{mixed.concurrency}_adapters{len(adapter_names)}"] = round(mixed.tok_s, 1)
        figures["ratio_adapters_vs_base"] = round(mixed.tok_s / base.tok_s, 2)
    print(
        f"\nc=1 reads the weights at {figures.get('bandwidth_gb_s_c1', 'n/a')} GB/s "
        f"of {figures['memory_bandwidth_gb_s']} GB/s measured ({weights / 1e6:.0f} MB of weights per token)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
