"""Tensor parallel against one device, in one run: the same Alpaca workload through the RunPod
door on TENSOR_PARALLEL_SIZE=1, then on --size ranks, at each concurrency.

    python -m benchmarks.tensor_parallel [--size 3] [--concurrency 1 8] [--requests 16] [--max-new-tokens 64]

On the CPU (gloo) the ranks share the cores and every layer ends in two all-reduces between
processes, so no speed-up is expected: the ratio shows what the collectives cost. On GPUs (NCCL)
it is the figure to look at. It also says whether the greedy answers were the same. Prints a line
per run, then (last line) one JSON object with the figures.
"""

import argparse
import asyncio
import json
import logging
import os
import time

from benchmarks.common import run_handler
from benchmarks.workloads import alpaca_workload

STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=3, help="ranks to compare with one device (the embedded model: 3 or 9)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per run (at least the concurrency)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser.parse_args(argv)


def measure(size: int, args: argparse.Namespace) -> dict:
    """Tok/s at each concurrency on ``size`` ranks, and the answers."""
    from llm_worker.doors import jobs as runpod_door
    from llm_worker.service import Worker
    from llm_worker.settings import Settings

    worker = Worker.start(Settings(tensor_parallel_size=size))
    if worker.load_error:
        raise SystemExit(worker.load_error)
    try:
        def handle(job: dict):
            return runpod_door.handle(worker, job.get("input"), job.get("id"))

        asyncio.run(run_handler(handle, alpaca_workload(2, 8), 2, "warm-up"))
        figures = {}
        for c in args.concurrency:
            run = asyncio.run(run_handler(handle, alpaca_workload(max(args.requests, c), args.max_new_tokens), c, f"TP={size}"))
            figures[c] = run
            say(f"TENSOR_PARALLEL_SIZE={size}, {c} at once: {run.tok_s:.1f} tok/s, p50 TTFT {run.row()['p50_ttft_s']} s")
        return figures
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DTYPE", "float32")  # a batch changes no answer in fp32: the answers compare
    os.environ.setdefault("KV_CACHE_TOKENS", "8192")
    one, split = measure(1, args), measure(args.size, args)
    result = {"size": args.size}
    for c in args.concurrency:
        ratio = split[c].tok_s / one[c].tok_s
        same = sum(a == b for a, b in zip(split[c].outputs, one[c].outputs))
        say(f"{c} at once: TENSOR_PARALLEL_SIZE={args.size} makes {split[c].tok_s:.1f} tok/s, {ratio:.2f}x one device's "
            f"{one[c].tok_s:.1f}; {same} of {len(one[c].outputs)} answers the same")
        result.update({f"tok_s_c{c}_tp1": round(one[c].tok_s, 2), f"tok_s_c{c}_tp{args.size}": round(split[c].tok_s, 2),
                       f"ratio_c{c}": round(ratio, 3), f"same_c{c}": same, f"answers_c{c}": len(one[c].outputs)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
