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


def alpaca_workload(count: int, max_new_tokens: int, path: Path = SEED_TASKS, adapters: list[str | None] | None = None) -> list[dict]:
    """Job inputs from the Alpaca seed tasks (alpaca template, greedy, eos allowed), cycled to ``count``.
    With ``adapters``, request i asks for ``adapters[i % len(adapters)]``."""
    tasks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    jobs = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        job = {
            "prompt_config": {"instruction": task["instruction"], "input": task["instances"][0]["input"]},
            "generation_config": {"max_new_tokens": max_new_tokens},
            "stream": True,
        }
        if adapters and adapters[i % len(adapters)] is not None:
            job["adapter"] = adapters[i % len(adapters)]
        jobs.append(job)
    return jobs


def run_seed_baseline(model_dir: Path, jobs: list[dict]) -> RunStats:
    """The seed's way: one request after another through plain ``model.generate``, fp32.

    Runs in a child process: torch ops on a second thread of the engine's process leave an extra
    OpenMP thread team behind, which on 2 cores slowed the engine's thread by a third."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_seed_baseline, model_dir, jobs).result()


def _seed_baseline(model_dir: Path, jobs: list[dict]) -> RunStats:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = []
    for job in jobs:
        prompt = render_prompt(tokenizer, "alpaca", job["prompt_config"]["instruction"], job["prompt_config"]["input"])
        prompts.append(tokenizer(prompt.text, return_tensors="pt"))
    max_new_tokens = jobs[0]["generation_config"]["max_new_tokens"]

    def generate(inputs):
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return output.shape[1] - inputs["input_ids"].shape[1]

    generate(prompts[0])  # the first generate in a process is slower
    tokens, latency = 0, []
    started = time.perf_counter()
    for inputs in prompts:
        t0 = time.perf_counter()
        tokens += generate(inputs)
        latency.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    return RunStats("seed: sequential model.generate, fp32", 1, len(jobs), tokens, seconds, latency, latency)


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


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoding step for the weights (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def memory_bandwidth_gb_s(size_mb: int = 1024, repeats: int = 5) -> float:
    """Measured read bandwidth of this machine's memory (summing a large tensor), best of a few."""
    data = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t0)
    return data.numel() * 4 / best / 1e9


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    widths = [max(len(str(h)), *(len(str(r[h])) for r in rows)) for h in headers]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)) + " |" for r in rows]
    return "\n".join(lines)

