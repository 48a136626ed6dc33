"""Rows of different LoRA adapters in one step through one batched product per layer
(``LORA_BACKEND=triton``), instead of PEFT's loop over the adapters present.

For each LoRA-wrapped linear layer the loaded adapters' weights are stacked once (``A`` as
[adapters, rank, in], ``B`` as [adapters, out, rank], ranks padded with zeros) and each token is
indexed to its row's adapter: a shrink kernel computes ``x A^T`` and an expand kernel adds
``(x A^T) B^T * scaling`` to the base layer's output, as Punica's SGMV and vLLM's Triton LoRA ops
do. Rows of the base model (index -1) add nothing. The order of operations is PEFT's (``lora_B(
lora_A(x)) * scaling`` in the adapters' dtype, added in the output's), so answers stay PEFT's up
to the order of each sum.

It serves only what PEFT's per-row mix serves exactly and is plain: LoRA on ``nn.Linear`` layers
(``adapter_rows.mixable``); otherwise the model keeps PEFT's own mixed forward. A step whose rows
all use one adapter (or none) never comes here: PEFT's active adapter serves it.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear as LoraLinear

from llm_worker.engine.adapter_rows import BASE_ADAPTER, mixable


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, index_ptr, h_ptr, stride_x, stride_an, stride_ar, width, in_features, rank,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    adapter = tl.load(index_ptr + token // width)
    if adapter >= 0:
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token * stride_x + k, mask=k < in_features, other=0.0).to(tl.float32)
            a = tl.load(
                a_ptr + adapter * stride_an + r[:, None] * stride_ar + k[None, :],
                mask=(r[:, None] < rank) & (k[None, :] < in_features), other=0.0,
            ).to(tl.float32)
            acc += tl.sum(a * x[None, :], 1)
        tl.store(h_ptr + token * BLOCK_R + r, acc)


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, scaling_ptr, index_ptr, out_ptr, stride_bn, stride_bo, stride_out, width, out_features, rank,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    token = tl.program_id(0)
    adapter = tl.load(index_ptr + token // width)
    if adapter >= 0:
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        r = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + token * BLOCK_R + r)
        b = tl.load(
            b_ptr + adapter * stride_bn + o[:, None] * stride_bo + r[None, :],
            mask=(o[:, None] < out_features) & (r[None, :] < rank), other=0.0,
        ).to(tl.float32)
        delta = tl.sum(b * h[None, :], 1) * tl.load(scaling_ptr + adapter)
        ok = o < out_features
        previous = tl.load(out_ptr + token * stride_out + o, mask=ok)
        tl.store(out_ptr + token * stride_out + o, previous + delta.to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("llm_worker::lora_delta", mutates_args=("out",))
def lora_delta_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor, rows: torch.Tensor) -> None:
    """``out`` [rows, width, out] += each token's ``(x A^T) B^T * scaling`` of its row's adapter
    (``rows`` [rows]: an index into the stacks, -1 for none). A torch custom op: CUDA graphs and
    torch.compile take it whole."""
    width = x.shape[-2] if x.dim() == 3 else 1
    in_features, out_features = x.shape[-1], out.shape[-1]
    x2, out2 = x.reshape(-1, in_features).contiguous(), out.view(-1, out_features)
    tokens, rank = x2.shape[0], a.shape[1]
    block_r = max(16, triton.next_power_of_2(rank))
    h = torch.empty((tokens, block_r), dtype=torch.float32, device=x.device)
    _shrink_kernel[(tokens,)](
        x2, a, rows, h, x2.stride(0), a.stride(0), a.stride(1), width, in_features, rank, BLOCK_R=block_r, BLOCK_K=64
    )
    block_o = 64
    _expand_kernel[(tokens, triton.cdiv(out_features, block_o))](
        h, b, scaling, rows, out2, b.stride(0), b.stride(1), out2.stride(0), width, out_features, rank,
        BLOCK_R=block_r, BLOCK_O=block_o,
    )


@lora_delta_.register_fake
def _(out, x, a, b, scaling, rows) -> None:
    return None


class BatchedLora:
    """The stacks of every LoRA-wrapped linear layer of a PEFT model, and the rows' adapter index
    of the step in progress. Building it swaps each layer's mixed-batch forward for the batched
    one; ``None`` from ``of`` means the model keeps PEFT's own.

    The index lives in one buffer of ``max_rows`` slots, written in place at each step: a step
    captured as a CUDA graph reads it there, so one graph per (rows, context) bucket serves every
    mix of adapters (``MIXED``)."""

    def __init__(self, names: list[str], layers: list[LoraLinear], max_rows: int) -> None:
        self.names = names
        self.slot = {name: i for i, name in enumerate(names)}
        self.device = next(iter(layers[0].lora_A.values())).weight.device
        self.buffer = torch.full((max_rows,), -1, dtype=torch.int64, device=self.device)
        self.rows: torch.Tensor = self.buffer
        self.stacks = {}
        for layer in layers:
            rank = max(layer.lora_A[name].weight.shape[0] for name in names if name in layer.lora_A)
            weight = next(iter(layer.lora_A.values())).weight
            a = torch.zeros((len(names), rank, layer.in_features), dtype=weight.dtype, device=weight.device)
            b = torch.zeros((len(names), layer.out_features, rank), dtype=weight.dtype, device=weight.device)
            scaling = torch.zeros(len(names), dtype=torch.float32, device=weight.device)
            for i, name in enumerate(names):
                if name in layer.lora_A:
                    r = layer.lora_A[name].weight.shape[0]
                    a[i, :r] = layer.lora_A[name].weight
                    b[i, :, :r] = layer.lora_B[name].weight
                    scaling[i] = layer.scaling[name]
            self.stacks[layer] = a, b, scaling
            layer._mixed_batch_forward = types.MethodType(self._forward, layer)

    @classmethod
    def of(cls, model, max_rows: int) -> BatchedLora | None:
        """For a PEFT model whose adapters are all plain LoRA on linear layers, else None."""
        for module in model.modules():  # the previous stacks' forwards, if any
            module.__dict__.pop("_mixed_batch_forward", None)
        configs = getattr(model, "peft_config", {})
        if not configs or not all(getattr(c, "peft_type", None) == "LORA" and mixable(c) for c in configs.values()):
            return None
        lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "lora_embedding_A")]
        if not lora_layers or any(not isinstance(m, LoraLinear) or m.lora_embedding_A or m.merged for m in lora_layers):
            return None
        return cls(sorted(configs), lora_layers, max_rows)

    def index(self, names: list[str | None], size: int | None = None) -> None:
        """The rows' slots in the stacks (-1: the base model), for the step's forward, written into
        the buffer in place; ``size``: the rows of a captured step, the padding rows' slots -1."""
        slots = [self.slot[name] if name not in (None, BASE_ADAPTER) else -1 for name in names]
        size = size or len(slots)
        self.rows = self.buffer[:size]
        self.rows.copy_(torch.tensor(slots + [-1] * (size - len(slots)), dtype=torch.int64), non_blocking=True)

    def _forward(self, layer, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        for key in VARIANT_KWARG_KEYS:  # as PEFT's mixed forward: not the base layer's (none applies to plain LoRA)
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs)
        a, b, scaling = self.stacks[layer]
        lora_delta_(result, x, a, b, scaling, self.rows)
        return result
