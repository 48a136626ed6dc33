"""The device side of one step, a pure function of tensors (gpt-fast's ``decode_one_token``):
positions, the pool slots to write and the block tables come in as tensors the host filled; the
model's own masks are evaluated at those positions on the device (``attention.py``); the logits
of each row's last column come out. Nothing in it reads a tensor back to the host, so it captures
as a CUDA graph (the layers' sliding windows, which set how many blocks a read copies, are learned
once, at the probe step of ``StepRunner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from llm_worker.engine.attention import PoolView, use_pool_attention
from llm_worker.engine.kv_cache import SCRATCH_BLOCK, KVPool, Segment, blocks_for
from llm_worker.engine.masks import LayerWindows


def forward_step(
    model: torch.nn.Module,
    pool: KVPool,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    write_index: torch.Tensor,
    block_table: torch.Tensor,
    segments: tuple[Segment, ...] | None = None,
    windows: LayerWindows | None = None,
    all_positions: bool = False,
    **model_kwargs,
) -> torch.Tensor:
    """One forward pass. ``input_ids``/``positions``: [rows, width] (left padding at position 0);
    ``write_index``: [rows * width] flat pool positions for the new keys/values; ``block_table``:
    [rows, blocks]; ``segments`` (host ints): rows that read fewer blocks than the table's width;
    ``windows``: the layers' sliding windows, learned once. No mask goes in: the model builds its
    own mask rules and the pool's attention evaluates them at these positions. Returns the
    logits of each row's last column, [rows, vocab]; ``all_positions``: of every column, [rows, width, vocab]."""
    view = PoolView(pool, write_index, block_table, positions, segments, windows)
    return run_view(model, input_ids, view, all_positions, **model_kwargs)


def run_view(model: torch.nn.Module, input_ids: torch.Tensor, view: PoolView, all_positions: bool = False, **model_kwargs) -> torch.Tensor:
    use_pool_attention(model)
    output = model(
        input_ids=input_ids,
        position_ids=view.positions,
        cache=view,
        use_cache=True,
        logits_to_keep=0 if all_positions else 1,
        **model_kwargs,
    )
    return output.logits if all_positions else output.logits[:, -1, :]


@dataclass
class StepInputs:
    """One forward pass as the host lays it out (lists of Python ints). Block tables may be of
    different lengths; a row reads the blocks its positions need. An input id ``-1 - k`` stands
    for ``carry[k]``: a token sampled by a step still in flight, which never came to the host
    (``with_carried``)."""

    input_ids: list[list[int]]
    positions: list[list[int]]
    write_index: list[int]
    block_table: list[list[int]]
    carry: torch.Tensor | None = None  # long [n], on the device: the tokens of steps in flight

    @cached_property
    def context_lengths(self) -> list[int]:
        return [max(positions) + 1 for positions in self.positions]

    def take(self, rows: list[int]) -> StepInputs:
        """These rows, in this order, each row's table cut to the blocks it reads."""
        width = len(self.input_ids[0])
        lengths = self.context_lengths
        return StepInputs(
            [self.input_ids[i] for i in rows],
            [self.positions[i] for i in rows],
            [index for i in rows for index in self.write_index[i * width : (i + 1) * width]],
            [self.block_table[i][: blocks_for(lengths[i])] for i in rows],
            self.carry,
        )


def with_carried(input_ids: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """``input_ids`` with each ``-1 - k`` replaced by ``carry[k]`` on the device (no transfer to the
    host). A carried ``BAD_ROW`` (-1: a row whose logits were not finite, failed when read back)
    feeds token 0: its step's token is dropped with it."""
    if carry is None:
        return input_ids
    taken = carry.clamp(min=0)[(-1 - input_ids).clamp(0, len(carry) - 1)]
    return torch.where(input_ids < 0, taken, input_ids)


def pad_tables(tables: list[list[int]], width: int | None = None) -> list[list[int]]:
    """Block tables padded with the scratch block to ``width`` (default: the longest)."""
    width = width or max(len(table) for table in tables)
    return [table + [SCRATCH_BLOCK] * (width - len(table)) for table in tables]
