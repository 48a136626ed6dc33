"""Which adapter each row of a step runs with: one shared adapter becomes PEFT's active adapter
(or the base model, with adapters disabled), a mix goes through PEFT's per-row
``adapter_names``, and adapters PEFT cannot mix run as one forward each."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIXED = "__batched_lora__"  # the graph key of decoding steps whose rows mix adapters through the batched product (LORA_BACKEND=triton)


AdapterState = tuple[Callable[[], contextlib.AbstractContextManager], dict, str | None]


def adapter_state(model, names: list[str | None]) -> AdapterState:
    """How to run rows that use these adapters (None: the base model): a context to run in (a
    factory: capture enters it twice), the forward's extra arguments, and a key naming the state
    for graph capture (None: mixed, run eagerly). One shared adapter becomes PEFT's active
    adapter; a mix uses PEFT's per-row ``adapter_names`` (only where ``adapter_groups`` allows)."""
    if not hasattr(model, "peft_config"):
        return contextlib.nullcontext, {}, BASE_ADAPTER
    distinct = set(names)
    if distinct == {None}:
        return model.disable_adapter, {}, BASE_ADAPTER
    if len(distinct) == 1:
        (name,) = distinct
        if model.active_adapter != name:
            model.set_adapter(name)
        return contextlib.nullcontext, {}, name
    return contextlib.nullcontext, {"adapter_names": [n or BASE_ADAPTER for n in names]}, None


def adapter_groups(model, names: list[str | None]) -> list[list[int]]:
    """Rows that run as one forward: all of them, unless they use several adapters and PEFT
    cannot mix the loaded ones per row; then one forward per adapter, so that no answer depends
    on what shares its step."""
    if len(set(names)) == 1 or all(mixable(config) for config in getattr(model, "peft_config", {}).values()):
        return [list(range(len(names)))]
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return list(groups.values())


def mixable(config) -> bool:
    """Whether PEFT's per-row ``adapter_names`` serves this adapter exactly: plain LoRA only.
    PEFT refuses DoRA there, and a loaded adapter with ``modules_to_save`` (or trainable tokens)
    breaks every mixed forward, even one it is not part of."""
    return not (
        getattr(config, "use_dora", False)
        or getattr(config, "modules_to_save", None)
        or getattr(config, "trainable_token_indices", None)
        or getattr(config, "target_parameters", None)
        or getattr(config, "lora_bias", False)
    )
