"""Tensor parallel: one rank's shard of a model, cut as transformers' own plan for its
architecture says (``base_model_tp_plan``), in plain tensors.

- ``colwise`` layers (q/k/v, gate/up) keep a slice of their outputs: the rank's attention heads,
  or its part of the MLP's width. Where a model has fewer KV heads than ranks, each rank keeps
  the one KV head its query heads read (replicated, as vLLM does).
- ``rowwise`` layers (o, down) keep the matching slice of their inputs; their outputs are partial
  sums, added up across ranks by one all-reduce right after the layer (``Reductions``). The
  reduction sits on the outermost module at the plan's path, so that a LoRA adapter's product is
  added before it: one all-reduce carries base and adapter together.
- Everything else (embeddings, norms, the LM head) is replicated. So is a module the plan marks
  ``replicated_with_grad_allreduce`` (a norm whose gradient would be reduced: no gradient here).

LoRA adapters are cut as vLLM cuts them: on a colwise layer B's rows are sliced and A stays whole;
on a rowwise layer A's columns are sliced and B stays whole. A layer keeps its full
``in_features``/``out_features``, which PEFT reads to load an adapter's full-size weights before
they are cut.

Plain tensors, not transformers' own DTensor path: a step stays a function of local tensors that
CUDA graphs capture, and the engine's KV pool holds the rank's own KV heads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm_worker.model.loading import weight_bytes

COLWISE, ROWWISE = "colwise", "rowwise"
REPLICATED = ("replicated_with_grad_allreduce",)  # the same on every rank at inference


class ShardingError(RuntimeError):
    """This model or adapter cannot be split over TENSOR_PARALLEL_SIZE ranks; the message says why."""


@dataclass(frozen=True)
class Shape:
    """What a tensor-parallel split must divide: heads, KV heads, head size."""

    architecture: str
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model) -> Shape:
        config = _base(model).config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        return cls(
            type(_base(model)).__name__, heads, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads,
        )


def plan_of(model) -> dict[str, str]:
    """transformers' plan for this architecture, refused when it has none or asks for a split this
    worker does not make (fused projections, experts, sequence parallel)."""
    base = _base(model)
    plan = dict(getattr(base.config.get_text_config(decoder=True), "base_model_tp_plan", None) or {})
    name = type(base).__name__
    if not plan:
        raise ShardingError(f"TENSOR_PARALLEL_SIZE: transformers has no tensor-parallel plan (base_model_tp_plan) for {name}")
    odd = sorted({style for style in plan.values() if style not in (COLWISE, ROWWISE, *REPLICATED)})
    if odd:
        raise ShardingError(
            f"TENSOR_PARALLEL_SIZE: {name}'s tensor-parallel plan asks for {', '.join(odd)}; this worker splits "
            "colwise and rowwise layers only"
        )
    return plan


def describe_plan(plan: dict[str, str]) -> str:
    """The plan in a few words, for the start log: each style and the layers it cuts."""
    by_style: dict[str, list[str]] = {}
    for path, style in plan.items():
        by_style.setdefault(style, []).append(path.rsplit(".", 1)[-1])
    return "; ".join(f"{style}: {', '.join(names)}" for style, names in by_style.items())


def check_split(shape: Shape, world: int) -> None:
    """Refuse a size that does not divide the heads (or whose KV heads neither divide it nor are
    divided by it), naming the setting."""
    if shape.heads % world:
        raise ShardingError(
            f"TENSOR_PARALLEL_SIZE={world} does not divide {shape.architecture}'s {shape.heads} attention heads: "
            f"use one of {', '.join(str(n) for n in range(1, shape.heads + 1) if shape.heads % n == 0)}"
        )
    if shape.kv_heads % world and world % shape.kv_heads:
        raise ShardingError(
            f"TENSOR_PARALLEL_SIZE={world} and {shape.architecture}'s {shape.kv_heads} KV heads: each must divide "
            "the other (a rank keeps whole KV heads, or one KV head shared with other ranks)"
        )


@dataclass(frozen=True)
class Shard:
    """One rank's part: its query heads, KV heads (``kv_replicas`` ranks share each), and where
    its slices start."""

    rank: int
    world: int
    shape: Shape

    @property
    def heads(self) -> int:
        return self.shape.heads // self.world

    @property
    def kv_heads(self) -> int:
        return max(1, self.shape.kv_heads // self.world)

    @property
    def kv_replicas(self) -> int:
        return max(1, self.world // self.shape.kv_heads)

    def rows(self, size: int) -> slice:
        """The slice of a colwise layer's ``size`` outputs (or a rowwise layer's inputs) this rank
        keeps: its KV head's when the size is the KV heads' width and they are fewer than ranks."""
        if self.kv_replicas > 1 and size == self.shape.kv_heads * self.shape.head_dim:
            head = self.rank // self.kv_replicas
            return slice(head * self.shape.head_dim, (head + 1) * self.shape.head_dim)
        if size % self.world:
            raise ShardingError(f"TENSOR_PARALLEL_SIZE={self.world} does not divide a layer's width of {size}")
        part = size // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def cut(self, style: str, out_features: int, in_features: int) -> tuple:
        """The index of this rank's part of a planned layer's weight: its rows on a colwise layer
        (its bias: the first element), its columns on a rowwise one."""
        return (self.rows(out_features),) if style == COLWISE else (slice(None), self.rows(in_features))

    def describe(self) -> str:
        kv = f"{self.kv_heads} KV head" + ("s" if self.kv_heads > 1 else "")
        if self.kv_replicas > 1:
            kv += f" (each shared by {self.kv_replicas} ranks)"
        return f"rank {self.rank} of {self.world}: {self.heads} of {self.shape.heads} attention heads, {kv} of {self.shape.kv_heads}"


def _base(model):
    """The transformers model inside a ``PeftModel``."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def _paths(plan: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """Each plan entry as a pattern over module names (any prefix: the causal LM's, PEFT's)."""
    return [(re.compile(r"(?:^|\.)" + re.escape(key).replace(r"\*", r"\d+") + "$"), style) for key, style in plan.items()]


def planned_modules(model, plan: dict[str, str]) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, module, style) of the outermost module at each colwise or rowwise path."""
    paths = [(pattern, style) for pattern, style in _paths(plan) if style in (COLWISE, ROWWISE)]
    found = []
    for name, module in model.named_modules():
        style = next((style for pattern, style in paths if pattern.search(name)), None)
        if style is not None:
            found.append((name, module, style))
    return found


def _keep(parameter: torch.nn.Parameter, index: tuple) -> torch.nn.Parameter:
    return torch.nn.Parameter(parameter.data[index].clone(), requires_grad=False)


def shard_model(model, shard: Shard) -> int:
    """Cut ``model``'s planned layers to this rank's slices, in place (the attention modules told
    their new head grouping); returns the bytes of weights the rank keeps."""
    check_split(shard.shape, shard.world)
    plan = plan_of(model)
    for name, module, style in planned_modules(model, plan):
        layer = getattr(module, "base_layer", module)
        if type(layer) is not torch.nn.Linear:  # quantized layers, fused kernels: not cut here
            raise ShardingError(f"TENSOR_PARALLEL_SIZE: {name} is a {type(layer).__name__}; this worker splits plain linear layers")
        cut = shard.cut(style, layer.out_features, layer.in_features)
        if layer.weight.shape == (layer.out_features, layer.in_features):  # not yet cut (``sliced.py`` reads it cut)
            layer.weight = _keep(layer.weight, cut)
            if style == COLWISE and layer.bias is not None:
                layer.bias = _keep(layer.bias, cut[:1])
        if style != COLWISE and layer.bias is not None and shard.rank:  # added once, by rank 0's part of the sum
            layer.bias.data.zero_()
    groups = shard.heads // shard.kv_heads
    for module in _base(model).modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "q_proj"):
            module.num_key_value_groups = groups
    return weight_bytes(model)


def check_adapter(config: dict, name: str, world: int) -> None:
    """Refuse, before it is loaded, a LoRA adapter whose parts cannot be cut by rank."""
    reasons = []
    if config.get("use_dora"):
        reasons.append("DoRA (its magnitude normalises each whole weight)")
    if config.get("lora_bias"):
        reasons.append("LoRA biases")
    if config.get("modules_to_save"):
        reasons.append(f"whole modules saved with it ({', '.join(config['modules_to_save'])})")
    if reasons:
        raise ShardingError(
            f"adapter {name!r}: {' and '.join(reasons)} cannot be split over TENSOR_PARALLEL_SIZE={world} ranks; "
            "merge it into the base model and serve that as BASE_MODEL, or serve it on one device"
        )


def shard_adapter(model, shard: Shard, name: str) -> None:
    """Cut adapter ``name``'s LoRA weights on the planned layers: B's rows on colwise layers, A's
    columns on rowwise layers (a no-op for layers already cut)."""
    for _, module, style in planned_modules(model, plan_of(model)):
        if name not in getattr(module, "lora_A", {}):
            continue
        layer = module.get_base_layer()
        if style == COLWISE:
            b = module.lora_B[name]
            rows = shard.rows(layer.out_features)
            if b.weight.shape[0] == layer.out_features:
                b.weight = _keep(b.weight, (rows,))
        else:
            a = module.lora_A[name]
            if a.weight.shape[1] == layer.in_features:
                a.weight = _keep(a.weight, (slice(None), shard.rows(layer.in_features)))


@dataclass
class Reductions:
    """The all-reduce after each rowwise layer, as a forward hook on the outermost module at the
    plan's path; ``install`` again after PEFT wraps a layer (the hook moves to the wrapper)."""

    reduce: Callable[[torch.Tensor], None]
    _hooks: dict[int, object] = field(default_factory=dict)

    def install(self, model) -> None:
        outer = {id(module): module for _, module, style in planned_modules(model, plan_of(model)) if style == ROWWISE}
        for key in [key for key in self._hooks if key not in outer]:
            self._hooks.pop(key).remove()
        for key, module in outer.items():
            if key not in self._hooks:
                self._hooks[key] = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.reduce(output)
        return output
