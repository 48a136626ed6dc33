"""Throughput measurement: the seed's one-at-a-time ``model.generate`` against the engine.

The engine is driven through a RunPod-style async handler (``job -> async iterator of chunks``)
with streaming on, so time to first token is seen as a client sees it. Everything is measured in
one run on the same machine; figures are reported against the machine's memory bandwidth
(decoding reads every weight once per step), gpt-fast style.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from benchmarks.baselines import SeedProcess

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
    outputs: list[str] = field(default_factory=list)  # each job's streamed text, in the jobs' order

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


@dataclass
class Pair:
    """One request the seed's way and the same request through the engine, one after the other."""

    seed_tok_s: float
    engine_tok_s: float
    seed_started: float
    engine_started: float

    @property
    def ratio(self) -> float:
        return self.engine_tok_s / self.seed_tok_s


def median_and_quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return median, q1, q3


async def run_alternating(
    handler: Handler, seed: SeedProcess, jobs: list[dict], label: str = "engine"
) -> tuple[RunStats, RunStats, list[Pair]]:
    """The seed's way and the engine one request at a time, in pairs on the same request (after
    one warm-up request each), the seed first in even pairs and the engine first in odd ones, so
    that neither side is always the one after the other's state or later in a drift; returns
    (seed, engine c=1, the pairs). On a shared CPU the median of the pairs' ratios is the
    trustworthy one-stream figure: totals measured minutes apart compare different machines."""
    seed.generate(jobs[0])
    await run_handler(handler, jobs[:1], 1)
    seed_tokens, seed_times, engine_runs, pairs = 0, [], [], []
    for i, job in enumerate(jobs):
        started = {}
        for side in ("seed", "engine") if i % 2 == 0 else ("engine", "seed"):
            started[side] = time.perf_counter()
            if side == "seed":
                tokens, seconds = seed.generate(job)
                seed_tokens += tokens
                seed_times.append(seconds)
            else:
                engine_runs.append(await run_handler(handler, [job], 1, label))
        pairs.append(Pair(tokens / seconds, engine_runs[-1].tok_s, started["seed"], started["engine"]))
    baseline = RunStats(
        f"seed: sequential model.generate, {seed.dtype}", 1, len(jobs), seed_tokens, sum(seed_times), seed_times, seed_times
    )
    engine = RunStats(
        f"{label} c=1", 1, len(jobs), sum(r.tokens for r in engine_runs), sum(r.seconds for r in engine_runs),
        [t for r in engine_runs for t in r.ttft], [t for r in engine_runs for t in r.latency],
    )
    return baseline, engine, pairs


LLAMA_SHAPES = {
    # LLaMA-7B (hidden 4096, MLP 11008, 32 layers, 32 heads): 6.88 B parameters with the SmolLM2 vocabulary
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    # a few MB, to try the whole benchmark on a CPU before spending GPU time
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
}


def random_llama(shape: str, vocab: int, device: str, dtype: torch.dtype | str, **special_tokens):
    """A LLaMA-shaped model with random weights, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_SHAPES[shape], vocab_size=vocab, max_position_embeddings=4096, **special_tokens)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)


def build_random_llama(shape: str, tokenizer_dir: Path, folder: Path, device: str, dtype: str) -> Path:
    """A LLaMA-shaped model with random weights and the embedded model's tokenizer, saved as a
    normal model folder (no download). Random weights rarely end an answer: use ``fixed_length``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = random_llama(
        shape, len(tokenizer), device, dtype,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def random_model_folder(shape: str, device: str) -> tuple[Path, str, bool]:
    """A LLaMA-shaped model with random weights (``build_random_llama``) in /dev/shm, built once:
    (its folder, its dtype, whether it was built now). Later runs, and other benchmarks of a device
    session, reuse it."""
    import tempfile

    from llm_worker.settings import Settings
    from model_cache import is_complete_model_dir, prepare_default_model

    dtype = "bfloat16" if device == "cpu" or torch.cuda.is_bf16_supported() else "float16"
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    folder = shm / f"llm-worker-random-{shape}-{dtype}"  # the same seed: a later run reuses it
    if is_complete_model_dir(folder):
        return folder, dtype, False
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=shm))
    build_random_llama(shape, prepare_default_model(Settings()), staging, device, dtype)
    staging.rename(folder)
    return folder, dtype, True


async def run_handler(handler: Handler, jobs: list[dict], concurrency: int, label: str = "engine") -> RunStats:
    """Send ``jobs`` through the handler, at most ``concurrency`` at once, streaming."""
    gate = asyncio.Semaphore(concurrency)
    ttft, latency, tokens = [], [], []
    outputs = [""] * len(jobs)

    async def one(index: int, job: dict) -> None:
        async with gate:
            t0 = time.perf_counter()
            first = None
            async for chunk in handler({"id": f"bench-{index}", "input": job}):
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if first is None:
                    first = time.perf_counter() - t0
                outputs[index] += chunk.get("delta", chunk.get("output", ""))
                if "usage" in chunk:
                    tokens.append(chunk["usage"]["completion_tokens"])
            ttft.append(first)
            latency.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    seconds = time.perf_counter() - started
    return RunStats(f"{label} c={concurrency}", concurrency, len(jobs), sum(tokens), seconds, ttft, latency, outputs)


def make_random_adapters(base_model_dir: Path, folder: Path, count: int, rank: int = 8) -> list[str]:
    """``count`` LoRA adapters (Alpaca-LoRA's recipe: rank 8 on q/v) with random weights: they cost
    what trained ones cost, which is all a throughput run needs. PEFT builds them over the base
    model's shape without its weights (on the meta device; a 7B base is not read), and only the
    adapters' own weights are made. Returns their names."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model_dir)
    names = []
    for index in range(count):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(index)
        for name, module in model.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                module.to_empty(device="cpu")
                if name.endswith("lora_A.default"):
                    torch.nn.init.kaiming_uniform_(module.weight, a=5**0.5)  # PEFT's own initialisation of A
                else:
                    torch.nn.init.normal_(module.weight, std=0.01)  # B is zeros in PEFT: an adapter that changes nothing
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
        synchronize(device.type)
        t0 = time.perf_counter()
        for weight in weights:
            torch.nn.functional.linear(inputs[weight.shape[1], weight.dtype], weight)
        synchronize(device.type)
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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compressed_tensors_checkpoint(source: Path, target: Path, scheme: str, device: str = "cpu", group_size: int | None = None) -> Path:
    """``source`` quantized with compressed-tensors' own library and saved as llm-compressor saves
    it: ``scheme`` one of its presets (``W4A16``, ``W8A16``, ``FP8_DYNAMIC``, ...), the scales of
    each weight from its min and max (round to nearest, no calibration data), the LM head kept.
    ``group_size`` overrides the preset's where it does not divide a model's widths."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map={"": device})
    quantization = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        quantization.weights = quantization.weights.model_copy(update={"group_size": group_size})
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": quantization}, ignore=["lm_head"]))
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        weight = module.weight.data.float()
        if args.strategy == "group":
            weight = weight.reshape(weight.shape[0], -1, args.group_size)
        elif args.strategy == "tensor":
            weight = weight.reshape(1, -1)
        elif args.strategy != "channel":
            raise ValueError(f"{scheme}: weights quantized by {args.strategy} are not made here")
        scale, zero = calculate_qparams(weight.amin(-1), weight.amax(-1), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target
