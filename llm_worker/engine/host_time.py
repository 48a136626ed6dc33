"""Where the engine thread's time goes, part by part: for benchmarks (``benchmarks.simulated_gpu``),
off unless one is given to ``Engine.measure_host``.

The parts of a step, in the order the engine runs them:
- ``schedule``: dropping cancelled and expired requests, admission, the prefill plan, the rows to decode;
- ``layout``: the step's inputs as the host lays them out (token ids, positions, pool slots, block tables);
- ``prefill``: a prompt chunk's forward (eager, or compiled: the host launches each of its kernels;
  on the CPU the forward itself);
- ``launch``: a decoding step's inputs staged for the device and its forward launched (a CUDA
  graph's replay; on the CPU the forward itself);
- ``sampling``: the sampler's glue (parameter tensors, its launch, unpacking what came back);
- ``wait``: waiting for the device to hand back sampled tokens (the host idle, not working);
- ``accept``: each token taken by its request (end token, stop tokens, grammar, length);
- ``text``: incremental text, stop strings and the events streamed to callers.
"""

from __future__ import annotations

import time

PARTS = ("schedule", "layout", "prefill", "launch", "sampling", "wait", "accept", "text")


class HostClock:
    """Seconds spent in each part, and the steps counted."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.steps = 0
        self._last = time.perf_counter()

    def start(self) -> None:
        """A step begins: what came before it is nobody's."""
        self.steps += 1
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        """The time since the last lap was spent in ``part``."""
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now

    def per_step_ms(self) -> dict[str, float]:
        return {part: 1000 * seconds / max(self.steps, 1) for part, seconds in self.seconds.items()}


class NoClock(HostClock):
    """Nothing measured (the default): laps cost one method call."""

    def start(self) -> None:
        pass

    def lap(self, part: str) -> None:
        pass
