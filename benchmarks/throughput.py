"""Throughput of the engine against the seed's way, on the same model, in one run.

    python -m benchmarks.throughput [--requests 96] [--sequential-requests 16]
                                    [--max-new-tokens 128] [--concurrency 1 8 32]

Prints a table, then (last line) one JSON object with the figures.
"""

import argparse
import asyncio
import json
import logging

from llm_worker.benchmark import (
    alpaca_workload,
    format_table,
    memory_bandwidth_gb_s,
    run_handler,
    run_seed_baseline,
    weight_bytes,
)
from model_cache import resolve_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrent run (c > 1)")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests for the seed baseline and c=1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

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
    for run in runs:
        c = run.concurrency
        figures[f"engine_tok_s_c{c}"] = round(run.tok_s, 1)
        figures[f"ratio_c{c}"] = round(run.tok_s / baseline.tok_s, 2)
        figures[f"p50_ttft_s_c{c}"] = run.row()["p50_ttft_s"]
        figures[f"p95_ttft_s_c{c}"] = run.row()["p95_ttft_s"]
        figures[f"p95_latency_s_c{c}"] = run.row()["p95_latency_s"]
        if c == 1:
            figures["bandwidth_gb_s_c1"] = round(weights * run.tok_s / 1e9, 1)
    print(
        f"\nc=1 reads the weights at {figures.get('bandwidth_gb_s_c1', 'n/a')} GB/s "
        f"of {figures['memory_bandwidth_gb_s']} GB/s measured ({weights / 1e6:.0f} MB of weights per token)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
