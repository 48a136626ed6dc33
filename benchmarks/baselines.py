"""The baselines the engine is measured against, in child processes: the seed's one-at-a-time
``model.generate`` (once, or alternated request by request with the engine) and transformers'
own batched generation."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import RunStats, synchronize
from llm_worker.model.prompts import render_prompt


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
    synchronize(device)
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
        synchronize(device)
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        synchronize(device)
    seconds = time.perf_counter() - started
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return RunStats(f"transformers generate_batch, {dtype}", len(jobs), len(jobs), tokens, seconds, [], [])
