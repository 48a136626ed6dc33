"""Paged attention in Triton: each layer's queries attend to its keys and values where they lie
in the KV pool, through the block table, without copying them out first.

One kernel serves prefill chunks and decoding (vLLM's "unified" Triton attention): a program
takes one row, one key-value head and a tile of query positions (with every query head of that
group: GQA), walks the row's pages from the oldest its queries may see to its newest position,
and keeps an online softmax. A row's queries sit at consecutive positions ending at its newest
one (``positions[:, -1]``), as the engine lays every step out; left-padding columns attend as
the positions just before the chunk (clamped at 0), so they read only keys that are written.

Masks: causal, or causal within a sliding window of ``window`` tokens (0: none). These are the
only rules the kernel computes; ``attention.py`` gives it a layer only when the model's own mask
rule is exactly one of them, checked on a grid of positions, and keeps the gather + SDPA path
for the rest (and as the reference the tests hold the kernel to).

Decoding over long contexts splits a row's pages among several programs (FlashDecoding); each
writes its partial maximum, sum and output, and a second kernel combines them. The split count
is a function of the shapes alone, so a captured CUDA graph keeps it.

``paged_attention`` is registered as the torch custom op ``llm_worker::paged_attention``, so
CUDA graphs and ``torch.compile`` take it whole. On the CPU the kernels run only under Triton's
interpreter (``TRITON_INTERPRET=1`` before triton is imported): the tests' way, on tiny shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PAGE = 16  # tokens per pool block (kv_cache.BLOCK_SIZE)
KEYS_PER_STEP = 64  # keys per inner step of a program (four pages)
MAX_SPLITS = 16
PAGES_PER_SPLIT = 8  # fewest pages a split takes before another split is worth its reduction


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qr, stride_qh, stride_qw, stride_table, stride_pos, stride_or, stride_ow, stride_oh,
    width, heads, kv_heads, scale, window,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS

    m = tl.arange(0, BLOCK_M)
    column = tile * BLOCK_W + m // GROUP_P2
    group_head = m % GROUP_P2
    valid = (m < BLOCK_W * GROUP_P2) & (group_head < GROUP) & (column < width)
    head = kv_head * GROUP + group_head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    newest = tl.load(pos_ptr + row * stride_pos + width - 1)
    position = tl.maximum(newest - (width - 1) + column, 0)  # a padding column: just before the chunk
    q = tl.load(
        q_ptr + row * stride_qr + head[:, None] * stride_qh + column[:, None] * stride_qw + d[None, :],
        mask=valid[:, None] & d_ok[None, :], other=0.0,
    )

    first_column = tile * BLOCK_W
    last_column = tl.minimum(first_column + BLOCK_W, width) - 1
    lowest = tl.maximum(newest - (width - 1) + first_column, 0)
    highest = tl.maximum(newest - (width - 1) + last_column, 0)
    start = tl.where(window > 0, tl.maximum(lowest - window + 1, 0), 0)
    # this split's share of the keys [start, highest], in whole pages
    first_page = start // PAGE_SIZE
    pages = highest // PAGE_SIZE + 1 - first_page
    per_split = tl.cdiv(pages, SPLITS)
    begin = (first_page + split * per_split) * PAGE_SIZE
    end = tl.minimum((first_page + (split + 1) * per_split) * PAGE_SIZE, highest + 1)

    best = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    for key_start in range(begin, end, BLOCK_N):
        key_position = key_start + n
        in_range = (key_position < end) & (key_position >= start)
        block = tl.load(table_ptr + row * stride_table + key_position // PAGE_SIZE, mask=in_range, other=0)
        slot = block * PAGE_SIZE + key_position % PAGE_SIZE
        offsets = (slot[:, None] * kv_heads + kv_head) * HEAD_DIM + d[None, :]
        k = tl.load(k_ptr + offsets, mask=in_range[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + offsets, mask=in_range[:, None] & d_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = in_range[None, :] & (key_position[None, :] <= position[:, None])
        visible = visible & ((window == 0) | (key_position[None, :] > position[:, None] - window))
        scores = tl.where(visible, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        best = new_best

    if SPLITS == 1:
        out = acc / tl.maximum(total, 1.0e-30)[:, None]
        tl.store(
            out_ptr + row * stride_or + column[:, None] * stride_ow + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & d_ok[None, :],
        )
    else:  # decoding: one column; partials [rows, heads, SPLITS(, HEAD_DIM)]
        part = (row * heads + head) * SPLITS + split
        tl.store(part_m_ptr + part, best, mask=valid)
        tl.store(part_l_ptr + part, total, mask=valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=valid[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, stride_or, stride_oh, heads,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    part = (row * heads + head) * SPLITS + s
    best = tl.load(part_m_ptr + part)
    total = tl.load(part_l_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0)
    weight = tl.exp(best - tl.max(best, 0))
    out = tl.sum(acc * weight[:, None], 0) / tl.maximum(tl.sum(total * weight, 0), 1.0e-30)
    tl.store(out_ptr + row * stride_or + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def splits_for(rows: int, kv_heads: int, width: int, table_pages: int) -> int:
    """How many programs share one decoding row's pages: enough to give the GPU work when few
    rows run over long contexts, none for prefill. A function of shapes only (graph-safe)."""
    if width > 1:
        return 1
    by_pages = max(1, table_pages // PAGES_PER_SPLIT)
    by_occupancy = max(1, 128 // max(1, rows * kv_heads))
    return min(MAX_SPLITS, triton.next_power_of_2(min(by_pages, by_occupancy)))


@torch.library.custom_op("llm_worker::paged_attention", mutates_args=())
def paged_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
    positions: torch.Tensor, scale: float, window: int,
) -> torch.Tensor:
    """``query`` [rows, heads, width, head_dim] (transformers' layout) attends to one layer's
    ``keys``/``values`` [slots, kv_heads, head_dim] of the pool through ``block_table`` [rows,
    pages]; ``positions`` [rows, width]: the last column is each row's newest position. Returns
    [rows, width, heads, head_dim], as transformers' attention functions do."""
    rows, heads, width, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = torch.empty((rows, width, heads, head_dim), dtype=query.dtype, device=query.device)
    if query.stride(-1) != 1:
        query = query.contiguous()
    group_p2 = triton.next_power_of_2(group)
    block_w = max(1, min(triton.next_power_of_2(width), max(1, 64 // group_p2)))
    block_m = max(16, block_w * group_p2)
    block_d = max(16, triton.next_power_of_2(head_dim))
    splits = splits_for(rows, kv_heads, width, block_table.shape[1])
    partial = (rows, heads, splits)
    part_m = torch.empty(partial if splits > 1 else 0, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((*partial, head_dim) if splits > 1 else 0, dtype=torch.float32, device=query.device)
    precision = "ieee" if query.dtype == torch.float32 else None  # fp32 exactly, not as TF32
    grid = (rows, kv_heads, triton.cdiv(width, block_w) * splits)
    _attend_kernel[grid](
        query, keys, values, block_table, positions, out, part_m, part_l, part_acc,
        query.stride(0), query.stride(1), query.stride(2), block_table.stride(0), positions.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        width, heads, kv_heads, scale, window,
        GROUP=group, GROUP_P2=group_p2, BLOCK_W=block_w, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=KEYS_PER_STEP, PAGE_SIZE=PAGE, SPLITS=splits, PRECISION=precision,
    )
    if splits > 1:
        _combine_kernel[(rows, heads)](
            part_m, part_l, part_acc, out, out.stride(0), out.stride(2), heads,
            SPLITS=splits, HEAD_DIM=head_dim, BLOCK_D=block_d,
        )
    return out


@paged_attention.register_fake
def _(query, keys, values, block_table, positions, scale, window):
    rows, heads, width, head_dim = query.shape
    return query.new_empty((rows, width, heads, head_dim))


@triton.jit
def _write_kernel(
    k_ptr, v_ptr, new_k_ptr, new_v_ptr, index_ptr, stride_kr, stride_kh, stride_kw, stride_vr, stride_vh, stride_vw,
    width, kv_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)  # row * width + column
    head = tl.program_id(1)
    row = token // width
    column = token % width
    d = tl.arange(0, BLOCK_D)
    ok = d < HEAD_DIM
    slot = tl.load(index_ptr + token)
    k = tl.load(new_k_ptr + row * stride_kr + head * stride_kh + column * stride_kw + d, mask=ok)
    v = tl.load(new_v_ptr + row * stride_vr + head * stride_vh + column * stride_vw + d, mask=ok)
    tl.store(k_ptr + (slot * kv_heads + head) * HEAD_DIM + d, k, mask=ok)
    tl.store(v_ptr + (slot * kv_heads + head) * HEAD_DIM + d, v, mask=ok)


@torch.library.custom_op("llm_worker::write_kv", mutates_args=("keys", "values"))
def write_kv(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, index: torch.Tensor) -> None:
    """One launch writes a layer's new keys and values [rows, kv_heads, width, head_dim] into the
    pool at the flat slots ``index`` [rows * width] (two ``index_copy_`` calls otherwise)."""
    rows, kv_heads, width, head_dim = new_keys.shape
    if new_keys.stride(-1) != 1:
        new_keys = new_keys.contiguous()
    if new_values.stride(-1) != 1:
        new_values = new_values.contiguous()
    _write_kernel[(rows * width, kv_heads)](
        keys, values, new_keys, new_values, index,
        new_keys.stride(0), new_keys.stride(1), new_keys.stride(2),
        new_values.stride(0), new_values.stride(1), new_values.stride(2),
        width, kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )
