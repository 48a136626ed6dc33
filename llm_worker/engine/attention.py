"""Attention over the KV pool, exactly as the model's own code asks for it.

The engine runs the model's own transformers (or PEFT) forward; only two things are its own:

- **the cache** (``PoolView``): each attention layer's ``update`` writes the new keys and values
  into the pool and hands back a ``LayerContext``, a promise of that layer's context;
- **the attention function** (registered with transformers as ``llm_worker_pool``, or
  ``llm_worker_pool_eager``): it reads the context and attends with the model's own kernel.

Masks are the model's own. The engine passes no mask; the model builds one per layer type with
transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask`` / ..., and the mask
interface registered here keeps the *rule* (``MaskRule``: transformers' mask function, e.g.
causal and-ed with a sliding window) instead of a tensor. The attention function evaluates the
rule at each row's own query and key positions (rows of a batch sit at different positions), so
sliding windows, chunked attention or anything else the model's masks encode apply exactly,
per layer. Where a layer's rule is a sliding window shorter than a sequence can be, the read is
cut to the blocks inside the window: keys older than the window are neither copied nor attended.

Kernels: transformers' SDPA where the model supports it; otherwise the model's own eager
attention function (Gemma 2's logit soft-capping, attention sinks), with the same mask as an
additive float mask. ``check_model`` runs one probe step at start and refuses a model whose
layers do not all read their context through this path (its own cache kinds, masks built its own
way), naming the reason.

Outside the pool (``generate``, e.g. beam search) the same functions materialise the rule as
transformers' own SDPA or eager mask and call the same kernel.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, Segment, blocks_for
from llm_worker.engine.masks import LayerWindows, MaskRule, pool_mask

POOL_SDPA = "llm_worker_pool"
POOL_EAGER = "llm_worker_pool_eager"


class UnsupportedModel(RuntimeError):
    """The engine cannot compute this model's attention exactly as its own code does."""


class PoolView:
    """What the model's layers see as their cache for one forward pass.

    ``update`` (called by every attention layer with the new keys/values ``[rows, kv_heads,
    width, head_dim]``) writes them at ``write_index`` (flat pool positions, ``rows * width``) and
    returns the layer's ``LayerContext``. ``positions`` [rows, width] are the rows' query
    positions (left padding at 0); ``block_table`` [rows, blocks] their blocks; ``segments``
    (rows sorted by context length): rows that read fewer blocks than the table's width.

    A read copies each row's blocks whole, 16 tokens at a time, into two buffers made once per
    forward and shared by every layer (each layer's attention is done with them before the next
    layer writes): copying blocks rather than tokens, into memory not allocated again per layer,
    keeps the copy near memory speed on a CPU."""

    def __init__(
        self,
        pool: KVPool,
        write_index: torch.Tensor,
        block_table: torch.Tensor,
        positions: torch.Tensor,
        segments: tuple[Segment, ...] | None = None,
        windows: LayerWindows | None = None,
    ) -> None:
        self.pool = pool
        self.write_index = write_index
        self.block_table = block_table
        self.positions = positions
        rows, width = block_table.shape
        self.segments = segments or ((0, rows, width),)
        self.windows = windows or LayerWindows(width * BLOCK_SIZE)
        self.written: set[int] = set()  # layers that wrote, for check_probe
        self.read_by: set[int] = set()  # layers that read through the pool's attention
        self.blocks_read: dict[int, int] = {}  # layer -> blocks its read copied (host ints: shapes)
        self._reads: dict[tuple, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers of the gathered reads, made at the first such read."""
        if self._buffers is None:
            shape = self.pool.shape
            width = self.positions.shape[1]
            windows_in_use = set(self.windows.by_layer.values()) or {None}  # before the probe: every layer reads all
            most = max(
                sum((end - start) * _read_blocks(blocks, window, width) for start, end, blocks in self.segments)
                for window in windows_in_use
            )
            size = (most, BLOCK_SIZE * shape.kv_heads * shape.head_dim)
            device = self.pool.keys[0].device
            self._buffers = torch.empty(size, dtype=shape.dtype, device=device), torch.empty(size, dtype=shape.dtype, device=device)
        return self._buffers

    # transformers' mask helpers ask the cache for these; the pool's masks ignore them
    def get_query_offset(self, layer_idx: int) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        heads, dim = keys.shape[1], keys.shape[2]
        if self.windows.kernel:
            _kernels().write_kv(keys, values, key_states, value_states, self.write_index)
        else:
            keys.index_copy_(0, self.write_index, key_states.transpose(1, 2).reshape(-1, heads, dim))
            values.index_copy_(0, self.write_index, value_states.transpose(1, 2).reshape(-1, heads, dim))
        self.written.add(layer_idx)
        context = LayerContext(self, layer_idx)
        return context, context

    def plan(
        self, rule: MaskRule, window: int | None, additive: torch.dtype | None = None
    ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """For each segment: its rows, the blocks each row reads ([rows, n]) and their mask
        [rows, 1, width, n * BLOCK_SIZE], boolean or (``additive``: a dtype) as eager attention
        adds it. Made once per forward for each mask rule, window and form, shared by the layers
        that have them."""
        key = (id(rule), window, additive)
        if key not in self._reads:
            width = self.positions.shape[1]
            plans = []
            for start, end, blocks in self.segments:
                positions = self.positions[start:end]
                count = _read_blocks(blocks, window, width)
                offsets = torch.arange(count, device=positions.device)
                if count == blocks:
                    first = torch.zeros_like(positions[:, -1])
                else:  # the first block that a real query's window reaches (rows' newest position is last)
                    oldest_needed = (positions[:, -1] - (width - 1) - (window - 1)).clamp(min=0)
                    first = (oldest_needed // BLOCK_SIZE).clamp(max=blocks - count)
                table = self.block_table[start:end, :blocks].gather(1, first[:, None] + offsets)
                key_positions = first[:, None] * BLOCK_SIZE + torch.arange(count * BLOCK_SIZE, device=positions.device)
                # a padding query (position 0) before the read range sees its first key, never nothing
                queries = torch.maximum(positions, first[:, None] * BLOCK_SIZE)
                visible = rule.visible(queries, key_positions)
                plans.append((start, end, table, additive_mask(visible, additive) if additive else visible))
            self._reads[key] = plans
        return self._reads[key]


def _read_blocks(blocks: int, window: int | None, width: int) -> int:
    """How many blocks a row reads of a table of ``blocks``: all, or those that queries at
    ``width`` consecutive positions can see through a window (one more: it need not be aligned)."""
    return blocks if window is None else min(blocks, blocks_for(window + width - 1) + 1)


class LayerContext:
    """One layer's keys and values in the pool, read when its attention runs (it knows the mask)."""

    def __init__(self, view: PoolView, layer: int) -> None:
        self.view = view
        self.layer = layer

    def attend(self, query: torch.Tensor, window: int, scaling: float | None) -> torch.Tensor:
        """The paged kernel over the pool in place: [rows, width, heads, head_dim]."""
        view = self.view
        view.read_by.add(self.layer)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        keys, values = view.pool.keys[self.layer], view.pool.values[self.layer]
        return _kernels().paged_attention(query, keys, values, view.block_table, view.positions, float(scale), window)

    def read(
        self, rule: MaskRule, additive: torch.dtype | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per segment: its rows [start, end), their keys and values [rows, kv_heads, keys,
        head_dim] and mask [rows, 1, width, keys] (see ``PoolView.plan``)."""
        view = self.view
        view.read_by.add(self.layer)
        window = view.windows.of(self.layer, rule)
        keys, values = view.pool.keys[self.layer], view.pool.values[self.layer]
        heads, dim = keys.shape[1], keys.shape[2]
        by_block = (view.pool.blocks, -1)
        used = 0
        plans = view.plan(rule, window, additive)
        view.blocks_read[self.layer] = sum(table.numel() for _, _, table, _ in plans)
        for start, end, table, mask in plans:
            flat = table.reshape(-1)
            key_buffer, value_buffer = view.buffers()
            key_part = key_buffer[used : used + flat.shape[0]]
            value_part = value_buffer[used : used + flat.shape[0]]
            used += flat.shape[0]
            torch.index_select(keys.view(by_block), 0, flat, out=key_part)
            torch.index_select(values.view(by_block), 0, flat, out=value_part)
            yield (
                start,
                end,
                key_part.view(end - start, -1, heads, dim).transpose(1, 2),
                value_part.view(end - start, -1, heads, dim).transpose(1, 2),
                mask,
            )


def _attend(kernel: Callable, additive: bool, module, query, key, value, attention_mask, **kwargs):
    if not isinstance(key, LayerContext):  # a plain cache: generate (beam search), outside the pool
        mask = attention_mask.materialize(additive) if isinstance(attention_mask, MaskRule) else attention_mask
        return kernel(module, query, key, value, mask, **kwargs)
    if not isinstance(attention_mask, MaskRule):
        raise UnsupportedModel(
            f"{type(module).__name__} builds its attention mask its own way, not through transformers' mask functions"
        )
    window = key.view.windows.kernel_of(key.layer, attention_mask, eligible=not additive)
    if window is not None:  # SDPA's softmax(q k * scale + mask) v, the mask being causal or a window
        return key.attend(query, window, kwargs.get("scaling")), None
    outputs = []
    for start, end, keys, values, mask in key.read(attention_mask, query.dtype if additive else None):
        outputs.append(kernel(module, query[start:end], keys, values, mask, **kwargs)[0])
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention adds it: 0 where visible, the dtype's minimum elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def pool_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    return _attend(sdpa_attention_forward, False, module, query, key, value, attention_mask, **kwargs)


def pool_eager_attention(module, query, key, value, attention_mask, **kwargs):
    return _attend(own_eager_attention(module), True, module, query, key, value, attention_mask, **kwargs)


def own_eager_attention(module) -> Callable:
    """The ``eager_attention_forward`` of the module's own modeling file."""
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise UnsupportedModel(f"{type(module).__name__}'s modeling code has no eager attention function")
    return kernel


AttentionInterface.register(POOL_SDPA, pool_sdpa_attention)
AttentionInterface.register(POOL_EAGER, pool_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(POOL_SDPA, pool_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(POOL_EAGER, pool_mask)


def check_kernel_device(device: torch.device, setting: str = "ATTENTION_BACKEND", other: str = "gather") -> None:
    """Triton's kernels run on CUDA, or on the CPU under Triton's interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{setting}=triton needs the triton package (torch's CUDA builds bring it)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{setting}=triton runs on CUDA; on {device.type} only under Triton's interpreter (TRITON_INTERPRET=1, "
            f"for tests): use {setting}={other}"
        )


def _kernels():
    """The Triton kernels' module, imported when first used: triton is there with torch's CUDA
    builds (and in the dev requirements, for its interpreter), not in the CPU image."""
    from llm_worker.engine import paged_attention as module

    return module


def base_model_of(model):
    """The transformers model inside a ``PeftModel`` (PEFT's ``get_base_model`` fails while its
    active adapter is one just deleted)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def attention_path(model) -> tuple[str, str]:
    """The implementation the engine gives this model, and why (for the start log): SDPA where
    the model's class supports it, else the model's own eager attention (e.g. Gemma 2, whose
    soft-capping SDPA cannot do)."""
    base = base_model_of(model)
    if getattr(type(base), "_supports_sdpa", True):
        return POOL_SDPA, "SDPA over the KV pool"
    return POOL_EAGER, f"{type(base).__name__}'s own eager attention over the KV pool ({type(base).__name__} does not support SDPA)"


def use_pool_attention(model) -> None:
    """Let the model read its context from the pool (and use the same kernels in ``generate``)."""
    name, _ = attention_path(model)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def check_model(model) -> None:
    """Refuse a model the engine cannot serve exactly, before any request: architectural features
    transformers' config names, then what one probe step shows (every layer wrote its keys to
    the pool and read them through the pool's attention)."""
    config = base_model_of(model).config.get_text_config(decoder=True)
    name = type(base_model_of(model)).__name__
    if not getattr(config, "num_attention_heads", None):
        raise UnsupportedModel(f"{name} has no attention layers: the engine's KV pool holds attention keys and values only")
    kinds = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention", "chunked_attention"}
    if kinds:
        raise UnsupportedModel(
            f"{name} has layers of kind {', '.join(sorted(kinds))}: the engine's KV pool holds attention keys and values only"
        )


def check_probe(model, view: PoolView) -> None:
    """After a probe step through ``view``: every decoder layer must have used the pool."""
    layers = base_model_of(model).config.get_text_config(decoder=True).num_hidden_layers
    missing = sorted(set(range(layers)) - (view.written & view.read_by))
    if missing:
        raise UnsupportedModel(
            f"{type(base_model_of(model)).__name__}: layer(s) {missing} did not read their keys and values through "
            "the engine's KV pool (another cache or attention kind)"
        )
