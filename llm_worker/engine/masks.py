"""The model's own mask rules, kept as rules: transformers' mask function for a layer type,
evaluated later at each row's own positions (rows of a batch sit at different positions), and
what each layer's rule is: a sliding window (reads are cut to it), and whether the paged kernel
computes it exactly (causal, or causal within a window)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import eager_mask, sdpa_mask


class MaskRule:
    """A layer type's mask as the model asked for it: transformers' mask function (and the
    arguments its mask interface got), evaluated later at any positions."""

    def __init__(self, arguments: dict) -> None:
        self.arguments = arguments
        self.function: Callable = arguments["mask_function"]

    def visible(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """``query_positions`` [rows, width], ``key_positions`` [rows, keys] -> bool [rows, 1, width, keys]."""
        rows, width = query_positions.shape
        batch = torch.arange(rows, device=query_positions.device)[:, None, None, None]
        head = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=query_positions.device)
        mask = self.function(batch, head, query_positions[:, None, :, None], key_positions[:, None, None, :])
        return torch.as_tensor(mask, device=query_positions.device).expand(rows, 1, width, key_positions.shape[1])

    def materialize(self, additive: bool):
        """transformers' own mask for a plain cache (SDPA's boolean one, or eager's float one)."""
        return (eager_mask if additive else sdpa_mask)(**self.arguments)

    def sliding_window(self, horizon: int) -> int | None:
        """The window this rule keeps within ``horizon`` positions, or None (it sees every earlier
        key, or its shape is not a fixed window: then everything is read and the rule masks)."""
        keys = torch.arange(horizon)[None]
        windows = set()
        for query in (horizon - 1, horizon - 6):
            if query < 0:
                return None
            seen = self.visible(torch.tensor([[query]]), keys)[0, 0, 0].nonzero().flatten().tolist()
            if not seen or seen[-1] != query or len(seen) != seen[-1] - seen[0] + 1:
                return None
            windows.add(len(seen) if seen[0] > 0 else None)
        return windows.pop() if len(windows) == 1 else None


    def kernel_window(self, horizon: int) -> int | None:
        """The rule as the paged kernel computes it (``paged_attention.py``): 0 for causal, ``w``
        for causal within a sliding window of ``w`` tokens; None when it is neither on a grid of
        query positions up to ``horizon`` (then the kernel must not serve it)."""
        window = self.sliding_window(horizon) or 0
        queries = torch.tensor([sorted({q for q in (0, 1, 15, 16, 17, horizon // 2, horizon - 2, horizon - 1) if 0 <= q < horizon})])
        keys = torch.arange(horizon)[None]
        seen = self.visible(queries, keys)[0, 0].cpu()
        expected = (keys <= queries.T) & ((keys > queries.T - window) if window else True)
        return window if torch.equal(seen, expected) else None


def pool_mask(**arguments) -> MaskRule:
    """The mask interface of the pool's attention implementations: keep the rule."""
    return MaskRule(arguments)


class LayerWindows:
    """Each layer's sliding window (None: none), learned from its mask rule the first time the
    layer runs; owned by the runner, shared by its forwards. With ``kernel`` (``ATTENTION_BACKEND
    =triton``) also whether the paged kernel computes the layer's rule exactly (``kernel_of``)."""

    def __init__(self, horizon: int, kernel: bool = False) -> None:
        self.horizon = horizon
        self.kernel = kernel
        self.by_layer: dict[int, int | None] = {}
        self.kernel_by_layer: dict[int, int | None] = {}  # layer -> its kernel window (0: causal), None: gathered

    def describe(self) -> str:
        """E.g. ``4096 tokens on layers [0, 2]`` (empty: no layer has a window)."""
        layers: dict[int, list[int]] = {}
        for layer, window in sorted(self.by_layer.items()):
            if window is not None:
                layers.setdefault(window, []).append(layer)
        return ", ".join(f"{window} tokens on layers {found}" for window, found in sorted(layers.items()))

    def of(self, layer: int, rule: MaskRule) -> int | None:
        if layer not in self.by_layer:
            self.by_layer[layer] = rule.sliding_window(self.horizon)
        return self.by_layer[layer]

    def kernel_of(self, layer: int, rule: MaskRule, eligible: bool = True) -> int | None:
        """The window the paged kernel attends this layer with (0: causal), or None: gathered.
        ``eligible``: the layer's kernel is SDPA's (not the model's own eager attention)."""
        if not self.kernel:
            return None
        if layer not in self.kernel_by_layer:
            self.kernel_by_layer[layer] = rule.kernel_window(self.horizon) if eligible else None
        return self.kernel_by_layer[layer]

    @property
    def all_in_kernel(self) -> bool:
        """Every layer seen so far attends through the paged kernel (none reads gathered blocks)."""
        return self.kernel and bool(self.kernel_by_layer) and None not in self.kernel_by_layer.values()

    def describe_kernel(self) -> str:
        """Which layers the paged kernel serves, for the start log (empty without the kernel)."""
        if not self.kernel:
            return ""
        gathered = sorted(layer for layer, window in self.kernel_by_layer.items() if window is None)
        if not gathered:
            return "paged Triton kernel on every layer (ATTENTION_BACKEND=triton)"
        return (
            f"paged Triton kernel (ATTENTION_BACKEND=triton), except layers {gathered}, whose mask or attention function "
            "it does not compute: they read gathered blocks"
        )
