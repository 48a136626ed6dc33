"""The KV cache: a pool of fixed-size blocks, allocated once, and the host-side block allocator.

Each layer owns two tensors ``[blocks * BLOCK_SIZE, kv_heads, head_dim]`` (keys, values), sized
at start from the memory budget and never grown. A request owns a list of blocks (its block
table), reserved whole when it is admitted (prompt + ``max_new_tokens``), so a running request
can never run out of room and nothing is ever preempted; a request that does not fit waits.
Block 0 is scratch: padding rows and padding tokens write there and read from there.

Prefix caching: a prompt's full blocks, once computed, are registered under a hash of their
content (tokens, everything before them, the adapter). A request whose prompt begins with
registered blocks shares them (a reference each) and prefills only the rest. A block nobody uses
keeps its prefix cached until a reservation needs the room, least recently used first; it counts
as free room all along, so no request ever waits for a block that eviction could free.

How a forward writes to and reads from the pool is ``attention.PoolView``: each row's blocks
are copied into a ``[rows, kv_heads, blocks * BLOCK_SIZE, head_dim]`` buffer for the model's
own attention, masked by the model's own mask rule at each row's positions, which also hides
padding and unwritten positions.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16
SCRATCH_BLOCK = 0


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: torch.nn.Module, dtype: torch.dtype) -> KVShape:
        config = model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def prefix_hashes(token_ids: list[int], salt: str = "") -> list[bytes]:
    """The content hash of each full block of ``token_ids``: its tokens and everything before it,
    with ``salt`` (the adapter: it changes the keys and values), chained as vLLM's block hashes."""
    digest = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    hashes = []
    for start in range(0, len(token_ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        block = array("q", token_ids[start : start + BLOCK_SIZE]).tobytes()
        digest = hashlib.blake2b(digest + block, digest_size=16).digest()
        hashes.append(digest)
    return hashes


class BlockAllocator:
    """Blocks of the pool, on the host: all-or-nothing reservations, and the prefix cache.

    A block a request reserves is its own (one reference). A full prompt block whose keys and values
    are computed can be registered under its content hash; a later request whose prompt begins with
    the same blocks (same tokens, same adapter) takes a reference to them instead of computing them
    again. A block nobody references is free: if it holds a registered prefix it stays cached, and
    is evicted (least recently used first) only when a reservation needs the room."""

    def __init__(self, blocks: int) -> None:
        self.total = blocks - 1  # block 0 is scratch
        self._free = list(range(blocks - 1, SCRATCH_BLOCK, -1))  # blank blocks
        self._refs: dict[int, int] = {}  # block -> references, for blocks in use
        self._hash_of: dict[int, bytes] = {}  # registered blocks (in use or cached)
        self._block_of: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced registered blocks, oldest first

    @property
    def free(self) -> int:
        """Blocks a reservation may take: blank ones and cached ones nobody uses."""
        return len(self._free) + len(self._cached)

    @property
    def cached(self) -> int:
        return len(self._cached)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The registered blocks that hold the leading ``hashes``, in order, up to the first miss."""
        found = []
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def idle(self, blocks: list[int]) -> int:
        """How many of ``blocks`` nobody references (taking them uses up free room)."""
        return sum(block in self._cached for block in blocks)

    def share(self, blocks: list[int]) -> None:
        """Take a reference to registered blocks."""
        for block in blocks:
            self._cached.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1

    def reserve(self, count: int) -> list[int] | None:
        if count > self.free:
            return None
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)  # evict the least recently used
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            taken.append(block)
        return taken

    def register(self, block: int, digest: bytes) -> None:
        """Make a block in use findable by its content hash (once its keys and values are computed)."""
        if digest not in self._block_of and block not in self._hash_of:
            self._block_of[digest] = block
            self._hash_of[block] = digest

    def release(self, blocks: list[int]) -> None:
        """Drop a reference to each block; a prompt's later blocks are released first, so that
        they are evicted before the blocks every longer prefix starts with."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._cached[block] = None  # the most recently used go last
            else:
                self._free.append(block)


class KVPool:
    """Every layer's key and value storage, allocated once."""

    def __init__(self, shape: KVShape, blocks: int, device: torch.device) -> None:
        self.shape = shape
        self.blocks = blocks
        size = (blocks * BLOCK_SIZE, shape.kv_heads, shape.head_dim)
        # zeros, not empty: masked positions still enter attention as 0 * value, and garbage could be NaN
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]

    @property
    def capacity_tokens(self) -> int:
        return (self.blocks - 1) * BLOCK_SIZE

    @property
    def nbytes(self) -> int:
        return self.blocks * BLOCK_SIZE * self.shape.bytes_per_token


Segment = tuple[int, int, int]  # rows [start, end) of a forward that read `blocks` blocks of context each


def kv_budget_blocks(
    shape: KVShape,
    device: torch.device,
    *,
    kv_cache_tokens: int | None,
    gpu_memory_utilization: float,
    reserved_bytes: int = 0,
) -> int:
    """How many blocks the pool gets (scratch included).

    ``KV_CACHE_TOKENS`` wins when set. Otherwise on CUDA: what is left of
    ``GPU_MEMORY_UTILIZATION`` of the card once the weights are loaded and ``reserved_bytes``
    (the measured peak of a worst-case step) are set aside. On the CPU: a default of 32,768
    tokens, at most 4 GiB."""
    if kv_cache_tokens is not None:
        return blocks_for(kv_cache_tokens) + 1
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free  # weights, the CUDA context, other processes
        available = int(total * gpu_memory_utilization) - used_by_others - reserved_bytes
        if available < BLOCK_SIZE * shape.bytes_per_token * 2:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x GPU_MEMORY_UTILIZATION="
                f"{gpu_memory_utilization} leaves {available / 2**30:.2f} GiB after the weights "
                f"({used_by_others / 2**30:.1f} GiB in use) and {reserved_bytes / 2**30:.2f} GiB of activations"
            )
        return available // (BLOCK_SIZE * shape.bytes_per_token)
    tokens = min(32_768, 4 * 2**30 // shape.bytes_per_token)
    return blocks_for(tokens) + 1
