"""The running batch's KV cache: one row (slot) per request, each with its own length.

Why not transformers' ``DynamicCache``: its ``update`` concatenates every step, copying the whole
cache and allocating a fresh multi-megabyte tensor per layer; with rows joining and leaving, a
left-padded cache also has to be rebuilt whole at every join and every leave. Measured on the
project's CPU at 32 concurrent requests, those copies and the page faults of the allocations
made 32 concurrent requests slower than 8.

Here each layer owns a buffer ``[slots, kv_heads, capacity, head_dim]``. A row's tokens sit at
positions ``0..length-1``; a decoding step writes each row's new key/value at its own length (one
small scatter) and hands attention a view up to the longest row, with a mask for the shorter
ones. A joining request copies only its own prompt's keys/values into a free slot; a leaving
request's slot is filled by moving the last row into it. Buffers grow rarely, with headroom.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

POSITION_HEADROOM = 128
SLOT_GRANULE = 8


class SlotLayer(DynamicLayer):
    """One layer's storage; the positions to write come from the owning ``SlotCache``."""

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner
        self.store_keys: torch.Tensor | None = None
        self.store_values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        rows = torch.arange(owner.rows, device=key_states.device)
        self.store_keys[rows, :, owner.lengths] = key_states[:, :, 0]
        self.store_values[rows, :, owner.lengths] = value_states[:, :, 0]
        self.keys = self.store_keys[: owner.rows, :, : owner.view_length]
        self.values = self.store_values[: owner.rows, :, : owner.view_length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.view_length - 1

    def grow(self, slots: int, positions: int, like: torch.Tensor, used_rows: int, used_positions: int) -> None:
        keys = like.new_zeros((slots, like.shape[1], positions, like.shape[3]))
        values = like.new_zeros((slots, like.shape[1], positions, like.shape[3]))
        if self.store_keys is not None and used_rows:
            keys[:used_rows, :, :used_positions] = self.store_keys[:used_rows, :, :used_positions]
            values[:used_rows, :, :used_positions] = self.store_values[:used_rows, :, :used_positions]
        self.store_keys, self.store_values = keys, values
        self.is_initialized = True
        self.device = keys.device


class SlotCache(DynamicCache):
    """A ``DynamicCache`` whose rows are requests that join and leave independently."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        super().__init__()
        self.layers = [SlotLayer(self) for _ in range(num_layers)]
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def view_length(self) -> int:
        """Positions attention sees during the next step: the longest row plus its new token."""
        return int(self.lengths.max()) + 1 if self.rows else 0

    def attention_mask(self) -> torch.Tensor:
        """[rows, view_length]: 1 where a row has a token (its new one included)."""
        positions = torch.arange(self.view_length, device=self.lengths.device)
        return (positions[None, :] <= self.lengths[:, None]).long()

    def prepare_step(self) -> None:
        """Make room for one more token in every row."""
        self._ensure(self.rows, self.view_length)

    def advance(self) -> None:
        self.lengths += 1

    def add_rows(self, prefilled: DynamicCache, prompt_lengths: list[int]) -> None:
        """Copy the rows of a left-padded prefill cache into new slots."""
        start = self.rows
        self._ensure(start + len(prompt_lengths), max(prompt_lengths), like=prefilled.layers[0].keys)
        for layer, source in zip(self.layers, prefilled.layers):
            for offset, length in enumerate(prompt_lengths):
                layer.store_keys[start + offset, :, :length] = source.keys[offset, :, -length:]
                layer.store_values[start + offset, :, :length] = source.values[offset, :, -length:]
        added = torch.tensor(prompt_lengths, dtype=torch.long, device=self.lengths.device)
        self.lengths = torch.cat([self.lengths, added])

    def remove_row(self, row: int) -> int:
        """Free ``row`` by moving the last row into it; returns the index of the row that moved."""
        last = self.rows - 1
        if row != last:
            length = int(self.lengths[last])
            for layer in self.layers:
                layer.store_keys[row, :, :length] = layer.store_keys[last, :, :length]
                layer.store_values[row, :, :length] = layer.store_values[last, :, :length]
            self.lengths[row] = self.lengths[last]
        self.lengths = self.lengths[:last]
        if not self.rows:
            self._release()
        return last

    def _release(self) -> None:
        """Drop the buffers when the batch empties: one long prompt grows them for everyone
        (32 slots x 1,500 positions is a gigabyte), and the next burst should start small."""
        for layer in self.layers:
            layer.store_keys = layer.store_values = layer.keys = layer.values = None
        return_freed_memory()

    def _ensure(self, rows: int, positions: int, like: torch.Tensor | None = None) -> None:
        store = self.layers[0].store_keys
        if store is not None and rows <= store.shape[0] and positions <= store.shape[2]:
            return
        slots = max(rows, store.shape[0] if store is not None else 0)
        slots = -(-slots // SLOT_GRANULE) * SLOT_GRANULE
        capacity = max(positions + POSITION_HEADROOM, store.shape[2] if store is not None else 0)
        used_positions = int(self.lengths.max()) if self.rows else 0
        for layer in self.layers:
            template = like if layer.store_keys is None else layer.store_keys
            layer.grow(slots, capacity, template, self.rows, used_positions)


def return_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse; an idle worker should give a burst's buffers back
    (measured: 0.76 GB before a 200-job burst, 2.06 GB after, without this)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.util.find_library("c")
        if libc:
            ctypes.CDLL(libc).malloc_trim(0)
