"""Loading the base model, its tokenizer and the optional LoRA adapter, as the settings say."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from llm_worker.model import quantization as quantized
from llm_worker.model.cuda_host import check_gpu_usable
from llm_worker.settings import Settings
from model_cache import EMBEDDED_NAME, resolve_adapter_source, resolve_base_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FirstOnly(logging.Filter):
    """Lets the first record whose message starts with ``prefix`` through and drops the repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


# bitsandbytes logs this on every 8-bit matmul whose input is not fp16: hundreds of lines per
# decoding step. Once is enough to tell the operator.
INT8_CAST_WARNING = FirstOnly("MatMul8bitLt: inputs will be cast")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    merged_adapter: str | None  # MERGE_LORA=1: the adapter folded into the weights
    load_seconds: float


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        check_gpu_usable()  # a GPU this torch cannot use fails the start (cuda_host.py)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={setting} but CUDA is not available on this machine")
    return device


def resolve_dtype(setting: str, device: torch.device, load_8bit: bool = False) -> torch.dtype:
    """``auto``: bfloat16 on CUDA with bf16 support (else float16); on the CPU, what
    ``cpu_auto_dtype`` picks from the CPU's reported features. With 8-bit weights ``auto`` is
    float16: bitsandbytes' 8-bit matmul quantizes fp16 inputs, and casts any other dtype to fp16 at
    every matmul (with bf16 an H100 ran 8 jobs at 18.8 tok/s in 8-bit against 90.2 in 4-bit)."""
    if setting != "auto":
        return DTYPES[setting]
    if load_8bit:
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype, reason = cpu_auto_dtype(torch.cpu.get_capabilities())
    log.info("DTYPE=auto on this CPU: %s (%s)", str(dtype).removeprefix("torch."), reason)
    return dtype


def cpu_auto_dtype(capabilities: Mapping[str, object]) -> tuple[torch.dtype, str]:
    """The CPU's ``auto`` dtype and the feature that decided it, from its reported capabilities
    (``torch.cpu.get_capabilities()``): a rule, not a timing, so a restart never changes the
    dtype (and the answers). bfloat16 only where native bf16 vector instructions come without AMX:
    an AMD EPYC (Zen 4, avx512_bf16) ran one stream 1.2-1.9x faster in bf16 and batches much
    faster. On a Xeon with AMX-bf16, torch's bf16 matrix-vector product read 8 GB/s against 19 in
    fp32, so one stream was slower in bf16 (21.5 against 26.0 tok/s) though batches were 3x
    faster. Elsewhere (no native bf16 arithmetic, or not measured) float32, the seed's dtype."""
    if capabilities.get("amx_bf16") or capabilities.get("amx_tile"):
        return torch.float32, "AMX: one stream is slower in bf16 there"
    if capabilities.get("avx512_bf16"):
        return torch.bfloat16, "avx512_bf16 without AMX: bf16 is faster for one stream and for batches"
    return torch.float32, "no avx512_bf16: bf16 was measured faster only with it"


def quantization_config(settings: Settings, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if settings.load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if settings.load_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return None


def fix_special_tokens(model, tokenizer) -> None:
    """Fill missing pad/bos/eos ids from what the tokenizer and config do define.

    Old LLaMA conversions (decapoda-research) shipped configs with wrong or missing ids; the
    seed hard-coded 0/1/2, which is wrong for other vocabularies. Here every id comes from the
    model's own tokenizer, and pad falls back to unk, then eos."""
    config, generation = model.config, model.generation_config
    if tokenizer.eos_token_id is None and generation.eos_token_id is not None:
        eos = generation.eos_token_id
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos[0] if isinstance(eos, list) else eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    for holder in (config, generation):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(holder, name, None) is None:
                setattr(holder, name, getattr(tokenizer, name))
    tokenizer.padding_side = "left"


def load_model(settings: Settings, rank: tuple[int, int] | None = None) -> LoadedModel:
    """The base model as the settings say. ``rank`` (rank, world) under tensor parallel: the rank's
    slices only, where the checkpoint allows (``sliced.py``), and MERGE_LORA left to the caller,
    which merges once the adapter is cut too."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, settings.load_8bit)
    if settings.load_8bit:
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(INT8_CAST_WARNING)
    folder = resolve_base_model(settings)
    name = settings.base_model or EMBEDDED_NAME
    checkpoint = quantized.read(folder)
    if checkpoint is not None:
        quantized.check_runs_here(checkpoint, device, settings.load_8bit, settings.load_4bit)
    quantization = quantization_config(settings, dtype) or (quantized.loading_config(checkpoint) if checkpoint else None)
    how = f" ({'8' if settings.load_8bit else '4'}-bit)" if settings.load_8bit or settings.load_4bit else f" (a quantized checkpoint: {checkpoint.describe()})" if checkpoint else ""
    log.info("Loading %s on %s as %s%s", name, device, dtype, how)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    model = None
    if rank is not None:
        from llm_worker.model.sliced import load_shard

        if checkpoint is not None:
            raise quantized.QuantizationError(
                f"TENSOR_PARALLEL_SIZE: {name} is a quantized checkpoint ({checkpoint.describe()}); tensor parallel splits "
                "plain weights only: serve it on one device (TENSOR_PARALLEL_SIZE=1)"
            )
        model = load_shard(folder, *rank, device, dtype, settings.trust_remote_code)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=settings.trust_remote_code,
            **({"quantization_config": quantization} if quantization else {}),  # None would override a checkpoint's own
        )
    fix_special_tokens(model, tokenizer)
    if device.type == "cpu":
        keep_4bit_weights_unpacked(model)
    if checkpoint is not None:
        how = quantized.settle(model, checkpoint, dtype)
        log.info("Quantized weights (%s): %.2f GiB on %s%s", checkpoint.describe(), weight_bytes(model) / 2**30, device, how)
    merged = None
    if settings.lora_weights and settings.merge_lora and rank is None:
        model, merged = merge_lora(model, settings, tokenizer)
    model.eval()
    return LoadedModel(model, tokenizer, name, device, dtype, merged, time.perf_counter() - started)


def keep_4bit_weights_unpacked(model) -> None:
    """On a CPU with avx512_bf16, bitsandbytes (0.50) repacks each 4-bit layer's weights at its
    first forward; a LoRA adapter PEFT loads after that (any adapter loaded once the engine has
    run its probe step) answers garbage, and bitsandbytes' own inverse does not restore them. The
    layers keep the format they were loaded in: the same answers, and adapters stay right."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def merge_lora(model, settings: Settings, tokenizer, sharding=None):
    """MERGE_LORA=1: fold LORA_WEIGHTS into the base weights (no per-step LoRA cost). Under tensor
    parallel (``sharding``: the rank's ``TensorParallel``) into the rank's slices, the adapter cut
    the same way first."""
    from peft import PeftModel

    from llm_worker.model.adapters import adapter_config, check_compatible

    folder = resolve_adapter_source(settings.lora_weights, settings)
    name = adapter_name(settings.lora_weights)
    check_compatible(model, folder, name, settings.max_lora_rank, tokenizer)
    if sharding is not None:
        sharding.check_adapter(adapter_config(folder, name), name)
    model = PeftModel.from_pretrained(model, folder, adapter_name=name)
    if sharding is not None:
        sharding.adopt(model)
    model = model.merge_and_unload()
    if sharding is not None:
        sharding.adopt(model)
    return model, name


def adapter_name(source: str) -> str:
    """A short name for an adapter given as a folder or Hub id: its last path part."""
    return Path(source.rstrip("/")).name


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoding step for the weights (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
