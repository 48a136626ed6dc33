"""The device as the engine thread sees it: where a step's sampled tokens come back to the host,
and, for benchmarks, how long the device was busy.

A step's sampled tokens start their way to the host as soon as they are sampled, without waiting:
on CUDA a copy into pinned memory with an event behind it, so the host waits only when it reads
them (``Readback.values``). Meanwhile it can lay out and launch the next step (``OVERLAP_STEPS``):
the device then never waits for the host between steps. On the CPU the work is done by the time
it is launched, and the copy is the tensor itself.

A device may also say how its steps run: ``graph_step`` (what a captured decoding step computes;
None: the model's forward) and ``static_shapes`` (decoding steps in CUDA graphs' fixed shapes).
A simulated GPU (``benchmarks/simulated_gpu.py``) sets both, and times each step (``step``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from llm_worker.engine.forward import StepInputs


class Readback:
    """A tensor on its way to the host; ``values`` waits for it (an event, on CUDA)."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        self.host = host
        self.event = event

    def values(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Device:
    """A device whose work is done when it is launched (the CPU)."""

    graph_step: Callable | None = None  # what a captured decoding step runs; None: the model's forward
    static_shapes: bool | None = None  # None: as the engine's configuration says

    @contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        """Around one launch: its forward, its sampling and its readback's start."""
        yield

    def readback(self, tensor: torch.Tensor) -> Readback:
        return Readback(tensor)

    def busy_seconds(self) -> float | None:
        """How long the device has worked on steps so far, when it keeps count (``timing``)."""
        return None


class CudaDevice(Device):
    """A CUDA device: readbacks through pinned memory, each behind an event; with ``timing`` on,
    every launch is bracketed by two events, whose elapsed times sum to the device's busy time."""

    def __init__(self) -> None:
        self.timing = False
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._busy = 0.0

    @contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        if not self.timing:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._spans.append((start, end))

    def readback(self, tensor: torch.Tensor) -> Readback:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Readback(host, event)

    def busy_seconds(self) -> float | None:
        if not self.timing:
            return None
        if self._spans:
            self._spans[-1][1].synchronize()
            self._busy += sum(start.elapsed_time(end) for start, end in self._spans) / 1000
            self._spans.clear()
        return self._busy


def device_for(device: torch.device) -> Device:
    return CudaDevice() if device.type == "cuda" else Device()
