"""How much of the time the device works, and where the host's time goes: the engine on a simulated GPU.

    python -m benchmarks.simulated_gpu [--concurrency 1 8 32 128] [--max-new-tokens 128] [--requests N]
                                       [--weights-ms 3.2] [--kv-bytes-per-token 524288] [--bandwidth-gb-s 4046]
                                       [--prefill-us-per-token 20]
    python -m benchmarks.simulated_gpu --real [--shape llama-7b]   # on a GPU: the configured model (BASE_MODEL),
                                                                   # or a random LLaMA shape (built once in /dev/shm)

A GPU works while its host lays out the next step, reads tokens back, detokenizes and streams, and
it idles whenever the host makes it wait. What the host does per step can be measured on a CPU, if
the device's work is taken off the host: the simulated GPU (``SimulatedGpu``) is the engine's
device with the two properties of a GPU that matter here. Launching a step returns before its work
is done; reading its sampled tokens back waits for it. Each step takes the time the 7B-on-H200
ideal gives it (docs/performance.md): the weights read once (3.2 ms), plus the keys and values of
every row's context read at the card's bandwidth, plus, for prompt tokens, their compute. The
device is a queue served in order: a step starts when it is launched or when the one before it
ends, whichever is later, and the host sleeps (holding no GIL) only when it reads a step's tokens
before that step's end. The forward and the sampler's tensor work, which a GPU does, cost the host
next to nothing here: the stand-in model's decoding steps are one table lookup over a 1,024-token
vocabulary (``StandInStep``; its prompt chunks run a one-layer LLaMA), in CUDA graphs' fixed shapes.
Everything else is the real engine: scheduler, sampler, lifecycle, text, streaming, through the
RunPod door (``jobs.handle``, what ``handler.py`` runs) with the Alpaca seed tasks, every answer
``--max-new-tokens`` long.

For each concurrency, first as the engine ran before (one step after the other), then with
``OVERLAP_STEPS`` (each step launched before the previous one's tokens are read back), it prints:
- the share: the device's busy time over the wall time while requests are in flight (1.0: the
  device never waited for the host);
- tok/s, beside the ideal of the same steps (tokens over the device's busy time), and the device's
  milliseconds per token, so a share bought with wasted steps shows;
- the host's milliseconds per step, by part (``llm_worker/engine/host_time.py``): scheduling, laying
  out inputs, prompt chunks' forwards (here the stand-in's one layer, eagerly, on the CPU), staging
  and launching decoding steps, sampling glue, accepting tokens, text and streaming, and, apart,
  waiting for the device.
Beside them, how many answers were the same with overlap as without (greedy: all of them, unless
a batch's make-up changes a bf16 answer). The last line is one JSON object: ``share_c<N>`` with
overlap, ``share_c<N>_sequential`` without, and the tok/s of each. With ``--real`` the same runs go
to the real device (CUDA), whose busy time is the sum of the times between two events around each
launch (an upper bound: a launch the host is slow to finish counts the device's wait in it); that
is the ``simulated-gpu`` phase of ``benchmarks.device_check``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from benchmarks.common import format_table, run_handler
from benchmarks.workloads import alpaca_workload
from llm_worker.engine.device import Device, Readback
from llm_worker.engine.forward import StepInputs
from llm_worker.engine.host_time import PARTS, HostClock
from llm_worker.engine.memory import freeze_heap

STAND_IN_VOCAB = 1024


@dataclass(frozen=True)
class StepTimes:
    """A step's time on the simulated device: the weights read once (or, for many prompt tokens,
    their compute, when longer), plus every row's context read from the KV cache. The defaults:
    a LLaMA-7B shape in bf16 on one H200 (docs/performance.md)."""

    weights_ms: float = 3.2
    kv_bytes_per_token: int = 2 * 32 * 4096 * 2  # keys and values, 32 layers of 4,096, bf16: 0.5 MiB
    bandwidth_gb_s: float = 4046.0  # the H200's measured device copy
    prefill_us_per_token: float = 20.0  # 2 x 6.7 GFLOP a token at ~670 TFLOP/s of bf16

    def seconds(self, inputs: StepInputs) -> float:
        tokens = sum(len(ids) for ids in inputs.input_ids)
        read = sum(inputs.context_lengths) * self.kv_bytes_per_token / (self.bandwidth_gb_s * 1e9)
        return max(self.weights_ms / 1000, tokens * self.prefill_us_per_token / 1e6) + read


class SimulatedReadback(Readback):
    """Tokens that reach the host when the step that sampled them ends on the simulated device."""

    def __init__(self, host: torch.Tensor, ready_at: float) -> None:
        super().__init__(host)
        self.ready_at = ready_at

    def values(self) -> list:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the device is working: the host waits, holding no GIL
        return self.host.tolist()


class SimulatedGpu(Device):
    """The engine's device, simulated: a queue of steps served in order, each taking ``times``'
    seconds; tokens read back wait for the end of the step that sampled them. The tensors
    themselves are computed on the CPU when launched (by ``graph_step``, when given, for captured
    decoding steps). Decoding steps run in CUDA graphs' fixed shapes, as on a GPU."""

    static_shapes = True

    def __init__(self, times: StepTimes = StepTimes(), graph_step=None) -> None:
        self.times = times
        self.graph_step = graph_step
        self.free_at = 0.0  # when the device ends the work it was given
        self.busy = 0.0
        self.steps = 0

    @contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        seconds = self.times.seconds(inputs)
        self.free_at = max(time.perf_counter(), self.free_at) + seconds
        self.busy += seconds
        self.steps += 1
        yield

    def readback(self, tensor: torch.Tensor) -> Readback:
        return SimulatedReadback(tensor, self.free_at)

    def busy_seconds(self) -> float:
        return self.busy


class StandInStep:
    """What the stand-in's captured decoding step computes: logits that depend on each row's
    token and position, by one lookup in a random table (a GPU's work, costing the host ~nothing)."""

    def __init__(self, vocab: int, rows: int = 4096, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(rows, vocab, generator=generator) * 4

    def __call__(self, model, pool, input_ids, positions, write_index, block_table, **model_kwargs) -> torch.Tensor:
        return self.table.index_select(0, (input_ids[:, -1] * 7919 + positions[:, -1]) % len(self.table))


def stand_in_model(tokenizer, vocab: int = STAND_IN_VOCAB) -> torch.nn.Module:
    """A one-layer LLaMA over the tokenizer's whole vocabulary (prompts embed as they are), whose
    output is the tokenizer's first ``vocab`` tokens only: the sampler's work stays small."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.lm_head = torch.nn.Linear(config.hidden_size, vocab, bias=False)
    return model


def simulated_worker(device: SimulatedGpu, **settings):
    """A worker (settings from the environment, ``settings`` over them) serving the stand-in model
    with the embedded model's tokenizer, on ``device``."""
    from transformers import AutoTokenizer

    from llm_worker.model.adapters import AdapterManager
    from llm_worker.model.loading import LoadedModel
    from llm_worker.service import Worker
    from llm_worker.settings import Settings
    from model_cache import prepare_default_model

    settings = Settings(**settings)
    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model(settings))
    model = stand_in_model(tokenizer)
    loaded = LoadedModel(model, tokenizer, "stand-in", torch.device("cpu"), torch.float32, None, 0.0)
    worker = Worker(settings, loaded, AdapterManager(settings), device=device)
    if worker.load_error:
        raise SystemExit(worker.load_error)
    return worker


@dataclass
class Measured:
    """One run: the requests' figures and the device's and the host's."""

    label: str
    concurrency: int
    overlap: bool
    stats: object  # benchmarks.common.RunStats
    busy: float
    host: HostClock
    same_answers: str = ""  # with overlap: how many answers equal the sequential run's

    @property
    def share(self) -> float:
        return self.busy / self.stats.seconds

    def row(self) -> dict:
        tokens = self.stats.tokens
        per_step = self.host.per_step_ms()
        return {
            "run": self.label, "c": self.concurrency, "share": round(self.share, 3), "tok_s": round(self.stats.tok_s, 1),
            "ideal_tok_s": round(tokens / self.busy, 1) if self.busy else None,
            "device_ms_per_token": round(1000 * self.busy / tokens, 4) if tokens else None,
            "steps": self.host.steps, "host_ms_per_step": round(sum(per_step.values()) - per_step["wait"], 3),
            **{f"{part}_ms": round(ms, 3) for part, ms in per_step.items()},
            "p95_ttft_s": round(self.stats.percentile(self.stats.ttft, 0.95), 3), "same_answers": self.same_answers,
        }


def runpod_door(worker):
    """handler.py's handler: the RunPod door, without the SDK's job loop around it."""
    from llm_worker.doors import jobs

    return lambda job: jobs.handle(worker, job["input"], job["id"])


def measure(worker, jobs: list[dict], concurrency: int, overlap: bool) -> Measured:
    """``jobs`` through the RunPod door at ``concurrency``, the engine overlapping steps or not."""
    engine = worker.engine
    engine.overlap = overlap
    clock = HostClock()
    engine.measure_host(clock)
    busy = engine.target.busy_seconds()
    label = "overlapping" if overlap else "sequential"
    try:
        stats = asyncio.run(run_handler(runpod_door(worker), jobs, concurrency, label))
    finally:
        engine.measure_host(None)
    return Measured(label, concurrency, overlap, stats, engine.target.busy_seconds() - busy, clock)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default: 8, or 2x the concurrency)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--real", action="store_true", help="the configured model on the real device (CUDA)")
    parser.add_argument("--shape", choices=["llama-7b", "tiny"], help="with --real: a random-weight LLaMA shape instead")
    defaults = StepTimes()
    parser.add_argument("--weights-ms", type=float, default=defaults.weights_ms)
    parser.add_argument("--kv-bytes-per-token", type=int, default=defaults.kv_bytes_per_token)
    parser.add_argument("--bandwidth-gb-s", type=float, default=defaults.bandwidth_gb_s)
    parser.add_argument("--prefill-us-per-token", type=float, default=defaults.prefill_us_per_token)
    return parser.parse_args(argv)


def start_worker(args: argparse.Namespace):
    settings = {"max_batch_size": max(args.concurrency)}
    if args.real:
        from benchmarks.common import random_model_folder
        from llm_worker.service import Worker
        from llm_worker.settings import Settings

        if args.shape:
            folder, dtype, _ = random_model_folder(args.shape, "cuda" if torch.cuda.is_available() else "cpu")
            os.environ.update(BASE_MODEL=str(folder), DTYPE=dtype)

        worker = Worker.start(Settings(**settings))
        if worker.load_error:
            raise SystemExit(worker.load_error)
        if not hasattr(worker.engine.target, "timing"):
            raise SystemExit(f"--real needs a GPU: the worker runs on {worker.engine.device}")
        worker.engine.target.timing = True
        return worker, f"{worker.loaded.name} on {torch.cuda.get_device_name()}"
    times = StepTimes(args.weights_ms, args.kv_bytes_per_token, args.bandwidth_gb_s, args.prefill_us_per_token)
    device = SimulatedGpu(times, StandInStep(STAND_IN_VOCAB))
    kv_tokens = max(args.concurrency) * (1536 + args.max_new_tokens)  # the longest seed prompt is ~1,400 tokens
    return simulated_worker(device, kv_cache_tokens=kv_tokens, **settings), f"a simulated GPU ({times})"


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    worker, where = start_worker(args)
    if argv is None:  # a process of its own, serving this worker until it exits: as handler.py does
        freeze_heap()
    print(f"the engine on {where}; ready in {time.perf_counter() - started:.1f} s", flush=True)
    try:
        asyncio.run(run_handler(runpod_door(worker), alpaca_workload(4, 8, fixed_length=True), 4, "warm-up"))
        runs, sequential = [], {}
        for overlap in (False, True):  # today's figure first
            for c in args.concurrency:
                count = args.requests or max(8, 2 * c)
                run = measure(worker, alpaca_workload(count, args.max_new_tokens, fixed_length=True), c, overlap)
                if overlap:
                    same = sum(a == b for a, b in zip(run.stats.outputs, sequential[c].stats.outputs))
                    run.same_answers = f"{same}/{count}"
                sequential.setdefault(c, run)
                runs.append(run)
                row = run.row()
                print(f"{run.label} c={c}: share {row['share']:.3f}, {row['tok_s']} tok/s of {row['ideal_tok_s']} ideal, "
                      f"host {row['host_ms_per_step']:.3f} ms a step over {row['steps']} steps", flush=True)
    finally:
        worker.close()
    print()
    print(format_table([run.row() for run in runs]))
    print()
    print("host parts:", ", ".join(PARTS))
    figures = {f"share_c{run.concurrency}{'' if run.overlap else '_sequential'}": round(run.share, 3) for run in runs}
    figures.update({f"tok_s_c{run.concurrency}{'' if run.overlap else '_sequential'}": round(run.stats.tok_s, 1) for run in runs})
    figures["where"] = where
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    main()
