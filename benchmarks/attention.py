"""One layer's attention over the KV pool: the paged Triton kernel against the gathered path.

    python -m benchmarks.attention [--rows 1 32 128] [--contexts 128 512 2048] [--tiny]

Decoding steps (one query per row) of a LLaMA-7B layer (32 heads, head size 128, bf16) on CUDA,
each row at the given context length with its blocks scattered over the pool, through the same
attention function the model calls: ``ATTENTION_BACKEND=gather`` copies each row's blocks out and
runs SDPA, ``triton`` reads the pool in place. Prints milliseconds per call and the ratio, and
checks that both give the same output. ``TRITON_INTERPRET=1 python -m benchmarks.attention --tiny``
(2 heads of 16, float32) tries it on the CPU under Triton's interpreter: for the script, not for
speed.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import torch
from transformers.masking_utils import causal_mask_function

from benchmarks.common import format_table, synchronize
from llm_worker.engine.attention import LayerContext, PoolView, pool_sdpa_attention
from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for
from llm_worker.engine.masks import LayerWindows, MaskRule


def one_layer(rows: int, context: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str):
    """A pool filled with random keys and values, ``rows`` rows at ``context`` tokens over blocks in
    random order, and a decoding query per row."""
    pages = blocks_for(context)
    pool = KVPool(KVShape(layers=1, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype), rows * pages + 2, torch.device(device))
    pool.keys[0].normal_()
    pool.values[0].normal_()
    order = torch.randperm(rows * pages) + 1
    table = order.view(rows, pages).to(device)
    positions = torch.full((rows, 1), context - 1, dtype=torch.long, device=device)
    query = torch.randn(rows, heads, 1, head_dim, dtype=dtype, device=device)
    write_index = table[:, (context - 1) // BLOCK_SIZE] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    return pool, table, positions, query, write_index


def attend(pool, table, positions, query, write_index, kernel: bool, horizon: int):
    view = PoolView(pool, write_index, table, positions, windows=LayerWindows(horizon, kernel=kernel))
    module = SimpleNamespace(num_key_value_groups=query.shape[1] // pool.shape.kv_heads, is_causal=True, training=False)
    rule = MaskRule({"mask_function": causal_mask_function})
    context = LayerContext(view, 0)

    def call() -> torch.Tensor:
        return pool_sdpa_attention(module, query, context, context, rule, scaling=query.shape[-1] ** -0.5)[0]

    return call


def milliseconds(call, device: str, repeats: int) -> float:
    call()  # warm-up: compiles the kernel, plans the gathered read
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize(device)
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--tiny", action="store_true", help="2 heads of 16 in float32 on the CPU (Triton's interpreter)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--tiny runs on the CPU under Triton's interpreter: set TRITON_INTERPRET=1 (before triton is imported)")
        device, dtype, heads, kv_heads, head_dim, repeats = "cpu", torch.float32, 2, 1, 16, 1
    else:
        device, dtype, heads, kv_heads, head_dim, repeats = "cuda", torch.bfloat16, 32, 32, 128, args.repeats
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton's interpreter"
    print(f"one decoding layer, {heads} heads ({kv_heads} for keys and values) of {head_dim}, {dtype}, on {name}")
    table_rows = []
    torch.manual_seed(0)
    for context in args.contexts:
        for rows in args.rows:
            layer = one_layer(rows, context, heads, kv_heads, head_dim, dtype, device)
            horizon = max(args.contexts) + BLOCK_SIZE
            gathered, kernel = attend(*layer, kernel=False, horizon=horizon), attend(*layer, kernel=True, horizon=horizon)
            torch.testing.assert_close(kernel(), gathered(), atol=2e-2 if dtype != torch.float32 else 2e-5, rtol=1e-2)
            gather_ms, kernel_ms = milliseconds(gathered, device, repeats), milliseconds(kernel, device, repeats)
            table_rows.append(
                {"rows": rows, "context": context, "gather_ms": round(gather_ms, 3), "triton_ms": round(kernel_ms, 3),
                 "speedup": round(gather_ms / kernel_ms, 2)}
            )
            print(format_table(table_rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(table_rows))


if __name__ == "__main__":
    main()
