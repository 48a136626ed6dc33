"""Steps in flight: launched on the device, their sampled tokens not yet read by the host.

Each launch (a prefill chunk's first tokens, a decoding step) starts its tokens' way back to the
host at once (``Device.readback``) and is read back later, in launch order (``resolve``). With
overlapping steps (``OVERLAP_STEPS``) the engine launches step N+1 before it reads step N back:
a row still decoding feeds the token step N sampled straight from the device (``decode_inputs``:
its input id stands for an entry of ``carry``), and the host accepts, detokenizes and streams
step N's tokens while N+1 runs. A row that step N ended (end token, stop string or token, cancel,
time limit, failure) has the token N+1 made for it dropped when N+1 is read back: never streamed,
never counted. Its KV write went into the row's own blocks, past its prompt (never a block of the
prefix cache), and whatever takes those blocks next writes them before it reads them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llm_worker.engine.device import Device, Readback
from llm_worker.engine.forward import StepInputs
from llm_worker.engine.host_time import HostClock, NoClock
from llm_worker.engine.requests import TokenLogprob
from llm_worker.engine.sequence import Sequence, decode_inputs
from llm_worker.engine.step_sampling import SampledRows

Accept = Callable[[Sequence, int, TokenLogprob | None], None]


@dataclass(eq=False)
class Launch:
    seqs: list[Sequence]
    sampled: SampledRows
    readback: Readback


class InFlight:
    """The launches whose tokens the host has not read yet, oldest first."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.launches: deque[Launch] = deque()
        self.clock: HostClock = NoClock()
        self.overlapped = 0  # launches made while an earlier one was still unread (a count for tests and benchmarks)

    def __len__(self) -> int:
        return len(self.launches)

    def launch(self, seqs: list[Sequence], sampled: SampledRows) -> None:
        """The rows' tokens are sampled (on the device): start their way back."""
        launch = Launch(seqs, sampled, self.device.readback(sampled.outgoing))
        self.overlapped += bool(self.launches)
        for row, seq in enumerate(seqs):
            seq.ahead += 1
            seq.newest = (launch, row)
        self.launches.append(launch)

    def decode_inputs(self, seqs: list[Sequence]) -> StepInputs:
        """A decoding step of ``seqs``: a row whose newest token is still in flight feeds it from
        the device, the others their newest accepted token."""
        if not any(seq.ahead for seq in seqs):
            return decode_inputs(seqs, [seq.generated[-1] for seq in seqs])
        offsets, at = {}, 0
        for launch in self.launches:
            offsets[launch] = at
            at += len(launch.seqs)
        ids = []
        for seq in seqs:
            if seq.ahead:
                launch, row = seq.newest
                ids.append(-1 - (offsets[launch] + row))
            else:
                ids.append(seq.generated[-1])
        tokens = [launch.sampled.tokens for launch in self.launches]
        return decode_inputs(seqs, ids, tokens[0] if len(tokens) == 1 else torch.cat(tokens))

    def resolve(self, count: int, accept: Accept) -> None:
        """Read back the ``count`` oldest launches, in order, and hand each row's token to
        ``accept``, unless its request has ended meanwhile (the token is dropped)."""
        for _ in range(min(count, len(self.launches))):
            launch = self.launches.popleft()
            values = launch.readback.values()
            self.clock.lap("wait")
            rows = launch.sampled.unpack(launch.seqs, values)
            self.clock.lap("sampling")
            for seq, (token, logprob) in zip(launch.seqs, rows):
                seq.ahead -= 1
                if not seq.ahead:
                    seq.newest = None  # no cycle left between a request and its launches
                if seq.finish_reason is None:
                    accept(seq, token, logprob)

    def drain(self, accept: Accept) -> None:
        self.resolve(len(self.launches), accept)
