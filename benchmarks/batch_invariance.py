"""How often a greedy answer in a batch equals the same job's answer alone, per dtype, through Worker.

    python -m benchmarks.batch_invariance [--prompts 50] [--max-new-tokens 64] [--dtypes bfloat16 float32]

For each dtype, a fresh worker answers every Alpaca seed prompt alone, one after another, then
all of them at once: with the default MAX_BATCH_SIZE of 32 they queue, join and leave the batch
at different steps, as real traffic does. fp32 is the control, where the engine promises the
same answer. For an answer that changed, it prints how far into the solo answer the two agree.

Prints a line per dtype, then (last line) one JSON object with the figures.
"""

import argparse
import json
import logging
import statistics
from concurrent.futures import ThreadPoolExecutor
from os.path import commonprefix

from benchmarks.workloads import alpaca_workload
from llm_worker.service import Worker
from llm_worker.settings import Settings


def compare(dtype: str, jobs: list[dict]) -> dict:
    worker = Worker.start(Settings(dtype=dtype))
    try:
        alone = [worker.complete(job) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(worker.complete, jobs))
    finally:
        worker.close()
    failed = [result["error"] for result in alone + together if "error" in result]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0]}")
    changed = [(a["output"], b["output"]) for a, b in zip(alone, together) if a["output"] != b["output"]]
    agreed = [len(commonprefix(pair)) / max(len(pair[0]), 1) for pair in changed]
    return {
        "dtype": dtype,
        "prompts": len(jobs),
        "identical": len(jobs) - len(changed),
        "median_agreed_share_of_changed": round(statistics.median(agreed), 2) if agreed else None,
        "completion_tokens": sum(result["usage"]["completion_tokens"] for result in alone),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    jobs = [
        {key: value for key, value in job.items() if key != "stream"}
        for job in alpaca_workload(args.prompts, args.max_new_tokens)
    ]
    figures = []
    for dtype in args.dtypes:
        result = compare(dtype, jobs)
        figures.append(result)
        line = f"{dtype}: {result['identical']}/{result['prompts']} batched answers equal their solo answers"
        if result["median_agreed_share_of_changed"] is not None:
            share = result["median_agreed_share_of_changed"]
            line += f"; a changed one agrees with its solo answer for the first {share:.0%} of its text (median)"
        print(line, flush=True)
    print(json.dumps({"max_new_tokens": args.max_new_tokens, "results": figures}))


if __name__ == "__main__":
    main()
