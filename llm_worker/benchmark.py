"""Throughput measurement: the seed's one-at-a-time ``model.generate`` against the engine.

The engine is driven through a RunPod-style async handler (``job -> async iterator of chunks``)
with streaming on, so time to first token is seen as a client sees it. Everything is measured in
one run on the same machine; figures are reported against the machine's memory bandwidth
(decoding reads every weight once per step), gpt-fast style.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_worker.prompts import render_prompt

SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.jsonl"

Handler = Callable[[dict], AsyncIterator[dict]]


@dataclass
class RunStats:
    label: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]
    latency: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def row(self) -> dict[str, Any]:
        return {
            "run": self.label,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "tok_s": round(self.tok_s, 1),
            "p50_ttft_s": round(self.percentile(self.ttft, 0.5), 3),
            "p95_ttft_s": round(self.percentile(self.ttft, 0.95), 3),
            "p50_latency_s": round(self.percentile(self.latency, 0.5), 2),
            "p95_latency_s": round(self.percentile(self.latency, 0.95), 2),
        }


def read_tasks(path: Path = SEED_TASKS) -> list[dict]:
    """The Alpaca seed tasks, one JSON object a line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alpaca_workload(
    count: int,
    max_new_tokens: int,
    path: Path = SEED_TASKS,
    adapters: list[str | None] | None = None,
    fixed_length: bool = False,
    json_schema: dict | None = None,
) -> list[dict]:
    """Job inputs from the Alpaca seed tasks (alpaca template, greedy), cycled to ``count``. With
    ``adapters``, request i asks for ``adapters[i % len(adapters)]``; with ``fixed_length``, every
    answer is exactly ``max_new_tokens`` long (``min_new_tokens``: random weights rarely end); with
    ``json_schema``, every other request answers in JSON that follows it."""
    tasks = read_tasks(path)
    jobs = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        generation = {"max_new_tokens": max_new_tokens}
        if fixed_length:
            generation["min_new_tokens"] = max_new_tokens
        job = {
            # the seed's way has no section stop: both sides answer until end-of-sequence
            "prompt_config": {"instruction": task["instruction"], "input": task["instances"][0]["input"], "stop_at_section": False},
            "generation_config": generation,
            "stream": True,
        }
        if adapters and adapters[i % len(adapters)] is not None:
            job["adapter"] = adapters[i % len(adapters)]
        if json_schema is not None and i % 2 == 0:
            generation["json_schema"] = json_schema
        jobs.append(job)
    return jobs


def shared_prompt_workload(count: int, max_new_tokens: int, system_tokens: int, tokenizer, path: Path = SEED_TASKS) -> list[dict]:
    """``count`` distinct short questions (Alpaca seed tasks) after one shared system prompt of
    about ``system_tokens`` tokens (the seed tasks' instructions, as house rules), greedy, streamed."""
    tasks = read_tasks(path)
    rules, tokens = [], 0
    for task in tasks:
        rules.append(f"- {task['instruction']}")
        tokens += len(tokenizer(rules[-1] + "\n", add_special_tokens=False)["input_ids"])
        if tokens >= system_tokens:
            break
    system = "You are the help desk of a large library. Follow these house rules:\n" + "\n".join(rules)
    return [
        {
            "prompt_config": {"instruction": f"{system}\n\nQuestion: {tasks[-1 - i % len(tasks)]['instruction']}", "stop_at_section": False},
            "generation_config": {"max_new_tokens": max_new_tokens},
            "stream": True,
        }
        for i in range(count)
    ]


# The structured-output run's schema: an answer with a few typed fields, as an application asks.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "category": {"enum": ["fact", "advice", "creative", "code", "other"]},
    },
    "required": ["answer", "confidence", "keywords", "category"],
}


def in_child_process(function: Callable, *args):
    """Run ``function(*args)`` in a fresh process. On the CPU, torch ops on a second thread of the
    engine's process leave an extra OpenMP thread team behind (it slowed the engine by a third on 2
    cores); on a GPU, the child's memory is all returned before the worker sizes its KV cache."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run_seed_baseline(model_dir: Path, jobs: list[dict], device: str = "cpu", dtype: str = "float32") -> RunStats:
    """The seed's way: one request after another through plain ``model.generate`` (in a child process)."""
    return in_child_process(_seed_baseline, model_dir, jobs, device, dtype)


class SeedProcess:
    """The seed's way in a child process that stays alive between requests, so that they can
    alternate with the engine's (``run_alternating``): on a shared CPU whose speed drifts by a
    third over minutes, phases measured one after the other compare different machines."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32") -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_seed_process_load, initargs=(model_dir, device, dtype),
        )
        self.dtype = dtype

    def generate(self, job: dict) -> tuple[int, float]:
        """One request the seed's way: (new tokens, seconds)."""
        return self._pool.submit(_seed_process_generate, job).result()

    def close(self) -> None:
        self._pool.shutdown()


_seed_process = {}


def _seed_process_load(model_dir: Path, device: str, dtype: str) -> None:
    _seed_process["model"], _seed_process["tokenizer"] = _load_plain(model_dir, device, dtype)
    _seed_process["device"] = device


def _seed_process_generate(job: dict) -> tuple[int, float]:
    model, tokenizer, device = _seed_process["model"], _seed_process["tokenizer"], _seed_process["device"]
    (ids,) = _prompt_ids(tokenizer, [job])
    t0 = time.perf_counter()
    tokens = _seed_generate(model, tokenizer, ids, job["generation_config"], device)
    return tokens, time.perf_counter() - t0


async def run_alternating(handler: Handler, seed: SeedProcess, jobs: list[dict], label: str = "engine") -> tuple[RunStats, RunStats]:
    """The seed's way and the engine one request at a time, alternating request by request
    (after one warm-up request each); returns (seed, engine c=1)."""
    seed.generate(jobs[0])
    await run_handler(handler, jobs[:1], 1)
    seed_tokens, seed_times, engine_runs = 0, [], []
    for job in jobs:
        tokens, seconds = seed.generate(job)
        seed_tokens += tokens
        seed_times.append(seconds)
        engine_runs.append(await run_handler(handler, [job], 1, label))
    baseline = RunStats(
        f"seed: sequential model.generate, {seed.dtype}", 1, len(jobs), seed_tokens, sum(seed_times), seed_times, seed_times
    )
    engine = RunStats(
        f"{label} c=1", 1, len(jobs), sum(r.tokens for r in engine_runs), sum(r.seconds for r in engine_runs),
        [t for r in engine_runs for t in r.ttft], [t for r in engine_runs for t in r.latency],
    )
    return baseline, engine


def _load_plain(model_dir: Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map={"": device}).eval()
    return model, tokenizer


def _prompt_ids(tokenizer, jobs: list[dict]) -> list[list[int]]:
    prompts = []
    for job in jobs:
        prompt = render_prompt(tokenizer, "alpaca", job["prompt_config"]["instruction"], job["prompt_config"]["input"])
        prompts.append(tokenizer(prompt.text)["input_ids"])
    return prompts


def _seed_generate(model, tokenizer, ids: list[int], generation: dict, device: str) -> int:
    """One request through plain ``model.generate``, greedy: the number of new tokens."""
    input_ids = torch.tensor([ids], device=device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=generation["max_new_tokens"],
            min_new_tokens=generation.get("min_new_tokens", 0),
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    _synchronize(device)
    return output.shape[1] - input_ids.shape[1]


def _seed_baseline(model_dir: Path, jobs: list[dict], device: str, dtype: str) -> RunStats:
    model, tokenizer = _load_plain(model_dir, device, dtype)
    generation = jobs[0]["generation_config"]
    prompts = _prompt_ids(tokenizer, jobs)
    _seed_generate(model, tokenizer, prompts[0], generation, device)  # the first generate in a process is slower
    tokens, latency = 0, []
    started = time.perf_counter()
    for ids in prompts:
        t0 = time.perf_counter()
        tokens += _seed_generate(model, tokenizer, ids, generation, device)
        latency.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    return RunStats(f"seed: sequential model.generate, {dtype}", 1, len(jobs), tokens, seconds, latency, latency)


def run_transformers_batch(model_dir: Path, jobs: list[dict], device: str, dtype: str) -> RunStats:
    """The peer: transformers' own continuous batching (``generate_batch``) on the same prompts."""
    return in_child_process(_transformers_batch, model_dir, jobs, device, dtype)


def _transformers_batch(model_dir: Path, jobs: list[dict], device: str, dtype: str) -> RunStats:
    from transformers import GenerationConfig

    model, tokenizer = _load_plain(model_dir, device, dtype)
    generation = jobs[0]["generation_config"]
    config = GenerationConfig(
        max_new_tokens=generation["max_new_tokens"],
        min_new_tokens=generation.get("min_new_tokens", 0),
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    prompts = _prompt_ids(tokenizer, jobs)
    with torch.inference_mode():
        model.generate_batch(inputs=prompts[:4], generation_config=config)  # warm-up
        _synchronize(device)
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        _synchronize(device)
    seconds = time.perf_counter() - started
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return RunStats(f"transformers generate_batch, {dtype}", len(jobs), len(jobs), tokens, seconds, [], [])


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


LLAMA_SHAPES = {
    # LLaMA-7B (hidden 4096, MLP 11008, 32 layers, 32 heads): 6.88 B parameters with the SmolLM2 vocabulary
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    # a few MB, to try the whole benchmark on a CPU before spending GPU time
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
}


def build_random_llama(shape: str, tokenizer_dir: Path, folder: Path, device: str, dtype: str) -> Path:
    """A LLaMA-shaped model with random weights and the embedded model's tokenizer, saved as a
    normal model folder (no download). Random weights rarely end an answer: use ``fixed_length``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **LLAMA_SHAPES[shape],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


async def run_handler(handler: Handler, jobs: list[dict], concurrency: int, label: str = "engine") -> RunStats:
    """Send ``jobs`` through the handler, at most ``concurrency`` at once, streaming."""
    gate = asyncio.Semaphore(concurrency)
    ttft, latency, tokens = [], [], []

    async def one(index: int, job: dict) -> None:
        async with gate:
            t0 = time.perf_counter()
            first = None
            async for chunk in handler({"id": f"bench-{index}", "input": job}):
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if first is None:
                    first = time.perf_counter() - t0
                if "usage" in chunk:
                    tokens.append(chunk["usage"]["completion_tokens"])
            ttft.append(first)
            latency.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    seconds = time.perf_counter() - started
    return RunStats(f"{label} c={concurrency}", concurrency, len(jobs), sum(tokens), seconds, ttft, latency)


def make_random_adapters(base_model_dir: Path, folder: Path, count: int, rank: int = 8) -> list[str]:
    """``count`` LoRA adapters (Alpaca-LoRA's recipe: rank 8 on q/v) with random weights: they cost
    what trained ones cost, which is all a throughput run needs. Returns their names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for index in range(count):
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(index)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.01)
        names.append(f"bench-lora-{index}")
        model.save_pretrained(folder / names[-1])
    return names


def memory_bandwidth_gb_s(device: str = "cpu", size_mb: int = 1024, repeats: int = 5) -> float:
    """Measured memory bandwidth, best of a few: reading a large tensor on the CPU (summing it); on
    CUDA, a device-to-device copy counted as read + write."""
    if device.startswith("cuda"):
        source = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
        target = torch.empty_like(source)
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            target.copy_(source)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return 2 * source.numel() * 4 / best / 1e9
    data = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t0)
    return data.numel() * 4 / best / 1e9


def matmul_ceiling_tok_s(model: torch.nn.Module, rows: int = 1, repeats: int = 5) -> float:
    """Tokens per second of steps of ``rows`` rows that did nothing but the model's matrix
    products (every floating-point ``nn.Linear`` once, the output layer included), timed with
    this machine's torch kernels: no engine can go past it with these kernels and this dtype.
    On a CPU, torch's matrix-vector kernels read the weights well below memory speed. One input
    per width and dtype: PEFT keeps LoRA weights in fp32 beside a bf16 or fp16 base."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype.is_floating_point]
    device = weights[0].device
    inputs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1], dtype=w.dtype, device=device) for w in weights}

    def one_step() -> float:
        _synchronize(device.type)
        t0 = time.perf_counter()
        for weight in weights:
            torch.nn.functional.linear(inputs[weight.shape[1], weight.dtype], weight)
        _synchronize(device.type)
        return time.perf_counter() - t0

    with torch.inference_mode():
        one_step()  # warm-up
        best = min(one_step() for _ in range(repeats))
    return rows / best


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    widths = [max(len(str(h)), *(len(str(r[h])) for r in rows)) for h in headers]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)) + " |" for r in rows]
    return "\n".join(lines)

