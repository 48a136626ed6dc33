"""Where a decoding step's time goes: the model's whole step, run as the engine runs it (a replayed
CUDA graph on a GPU), timed and profiled kernel by kernel.

    python -m benchmarks.step_profile [--shape llama-7b|tiny] [--rows 1 32 128] [--context 512] [--top 10]

For each attention path (``gather``; ``triton`` where it can run: CUDA, or Triton's interpreter)
and each number of rows, every row at ``--context`` tokens: the step's milliseconds (the median of
20), how many kernels one step launches, and the kernels that take the most time, by name, from
``torch.profiler``. On a GPU this is what the issue's "many small kernels per layer" needs in
figures; on the CPU (``--shape tiny``) the step runs eagerly and the profile lists operators.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import format_table, random_llama, synchronize
from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for
from llm_worker.engine.runner import StepInputs, StepRunner

EMBEDDED_VOCAB = 49152  # the embedded tokenizer's: the benchmarks' random models use it


def decode_inputs(rows: int, context: int) -> StepInputs:
    """One decoding step of ``rows`` rows at ``context`` tokens, each over its own blocks."""
    pages = blocks_for(context)
    tables = [list(range(1 + row * pages, 1 + (row + 1) * pages)) for row in range(rows)]
    position = context - 1
    return StepInputs(
        [[1]] * rows, [[position]] * rows,
        [table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE for table in tables], tables,
    )


def profile(runner: StepRunner, inputs: StepInputs, device: str, top: int) -> dict:
    adapters = [None] * len(inputs.input_ids)
    with torch.inference_mode():
        for _ in range(3):  # the first captures its graph (and compiles, where asked)
            runner.run(inputs, adapters)
        synchronize(device)
        times = []
        for _ in range(20):
            started = time.perf_counter()
            runner.run(inputs, adapters)
            synchronize(device)
            times.append(time.perf_counter() - started)
        cuda = device.startswith("cuda")
        activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
        steps = 5
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                runner.run(inputs, adapters)
            synchronize(device)
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    spent = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in events if spent(e) > 0]
    total = sum(spent(e) for e in events) or 1.0
    ranked = sorted(events, key=spent, reverse=True)[:top]
    return {
        "ms": statistics.median(times) * 1000,
        "kernels": sum(e.count for e in events) / steps,
        "top": [(e.key[:60], e.count // steps, spent(e) / steps / 1000, spent(e) / total) for e in ranked],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["llama-7b", "tiny"], default=None, help="default: llama-7b with CUDA, tiny without")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and os.environ.get("DEVICE", "auto") != "cpu" else "cpu"
    shape = args.shape or ("llama-7b" if device == "cuda" else "tiny")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_llama(shape, EMBEDDED_VOCAB, device, dtype).eval()
    max_rows, pages = max(args.rows), blocks_for(args.context)
    pool = KVPool(KVShape.of(model, dtype), max_rows * pages + 2, torch.device(device))
    paths = ["gather"] + (["triton"] if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else [])
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"a decoding step of a random {shape} model ({dtype}) on {name}, every row at {args.context} tokens")
    summary = []
    for path in paths:
        runner = StepRunner(model, pool, torch.device(device), max_rows, pages, cuda_graphs=True, attention_kernel=path == "triton")
        for rows in args.rows:
            found = profile(runner, decode_inputs(rows, args.context), device, args.top)
            summary.append({"path": path, "rows": rows, "ms_per_step": round(found["ms"], 3),
                            "tok_s": round(rows / found["ms"] * 1000, 1), "kernels_per_step": round(found["kernels"])})
            print(f"\n{path}, {rows} rows: {found['ms']:.3f} ms a step, {found['kernels']:.0f} {'kernels' if device == 'cuda' else 'operators'} a step")
            print(format_table([
                {"name": key, "per step": count, "ms per step": round(ms, 3), "share": f"{share:.0%}"}
                for key, count, ms, share in found["top"]
            ]), flush=True)
    print()
    print(format_table(summary))


if __name__ == "__main__":
    main()
