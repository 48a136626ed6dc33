"""A step's launches: prompt chunks and decoding rows through the step runner and the sampler,
their sampled tokens on their way back to the host (``inflight.py``), accepted when read.

The host's parts of each launch are timed into ``clock`` when a benchmark asks (``host_time.py``),
and the device is told of each launch (``Device.step``: a simulated GPU times it). Faults stay
with their request: a failed prefill is retried one request at a time, and a decoding step out of
memory drops the newest request and runs again for the rest.
"""

from __future__ import annotations

import logging

import torch

from llm_worker.engine.device import Device
from llm_worker.engine.host_time import HostClock, NoClock
from llm_worker.engine.inflight import InFlight
from llm_worker.engine.lifecycle import Lifecycle
from llm_worker.engine.ranks import RankLost
from llm_worker.engine.prompt_scoring import score_chunks, wants_scores
from llm_worker.engine.requests import TokenLogprob
from llm_worker.engine.runner import StepRunner
from llm_worker.engine.scheduler import PrefillChunk
from llm_worker.engine.sequence import Sequence, prefill_inputs
from llm_worker.engine.step_sampling import SamplingInputs, StepSampler

log = logging.getLogger("llm_worker.engine.loop")  # told under the engine's name, as before


class StepLauncher:
    """Launches the engine's forwards and samplings, and reads their tokens back."""

    def __init__(self, runner: StepRunner, sampler: StepSampler, life: Lifecycle, device: Device, pad_id: int) -> None:
        self.runner, self.sampler, self.life, self.device, self.pad_id = runner, sampler, life, device, pad_id
        self.inflight = InFlight(device)
        self.clock: HostClock = NoClock()

    def prefill(self, group: list[PrefillChunk[Sequence]]) -> None:
        """One forward over prompt chunks of similar widths; if it fails, each chunk alone."""
        try:
            self._prefill_forward(group)
        except RankLost:
            raise
        except Exception as err:
            if len(group) == 1:
                log.exception("prefill failed for %s", group[0].seq.label)
                self.life.fail([group[0].seq], f"generation failed: {type(err).__name__}: {err}")
                return
            log.warning("prefill of %d prompts failed (%s); retrying them one by one", len(group), type(err).__name__)
            if self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            for chunk in group:
                self.prefill([chunk])

    def _prefill_forward(self, group: list[PrefillChunk[Sequence]]) -> None:
        finishing = [i for i, c in enumerate(group) if c.last]
        seqs = [group[i].seq for i in finishing]
        inputs = prefill_inputs(group, self.pad_id)
        self.clock.lap("layout")
        sampling = self.sampler.prepare(seqs, fresh=True) if seqs else None
        self.clock.lap("sampling")
        scoring = wants_scores(group)
        with self.device.step(inputs):
            logits = self.runner.run(inputs, [c.seq.request.adapter for c in group], scoring)
            self.clock.lap("prefill")
            if scoring:
                score_chunks(group, logits, self.life.send, lambda tensor: self.device.readback(tensor).values())
                logits = logits[:, -1]
            for chunk in group:
                self.life.scheduler.prefilled(chunk)
            if seqs:
                self._launch(seqs, logits[finishing], sampling)

    def decode(self, seqs: list[Sequence]) -> None:
        """One decoding step for ``seqs``. Out of memory, the newest request is dropped (with an
        error) and the step retried for the rest: the writes of a failed step sit at positions the
        retry overwrites."""
        while True:
            inputs = self.inflight.decode_inputs(seqs)
            self.clock.lap("layout")
            sampling = self.sampler.prepare(seqs)  # host-to-device copies go out before the forward
            self.clock.lap("sampling")
            try:
                with self.device.step(inputs):
                    logits = self.runner.run(inputs, [s.request.adapter for s in seqs])
                    self.clock.lap("launch")
                    self._launch(seqs, logits, sampling)
                return
            except torch.OutOfMemoryError:
                if len(seqs) == 1:
                    raise
                newest = max(seqs, key=lambda s: s.submitted)
                log.warning("out of memory in a step of %d requests: dropping the newest", len(seqs))
                self.life.fail([newest], "out of memory: the batch could not hold this request; retry it")
                seqs = [s for s in seqs if s is not newest]

    def _launch(self, seqs: list[Sequence], logits: torch.Tensor, sampling: SamplingInputs) -> None:
        self.inflight.launch(seqs, self.sampler.launch(seqs, logits, sampling))
        self.clock.lap("sampling")

    def resolve(self, count: int) -> None:
        """Read back the ``count`` oldest launches and accept their tokens."""
        self.inflight.resolve(count, self._accept)

    def drain(self) -> None:
        """Read back every launch still in flight."""
        self.inflight.drain(self._accept)

    def _accept(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.life.accept(seq, token)
