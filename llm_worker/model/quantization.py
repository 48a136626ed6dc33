"""Quantized checkpoints: a model folder whose ``config.json`` carries a ``quantization_config``
(bitsandbytes, GPTQ, AWQ, compressed-tensors, FP8, ...) loads through transformers' own quantizer.

Before anything loads, ``check_runs_here`` refuses a method whose kernels cannot run on this
device, naming what it needs: transformers would otherwise dequantize an FP8 checkpoint to bf16
on a CPU or an older GPU without a word (twice the memory, none of the speed). The start log
names the method and the bytes of weights loaded (``describe``).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

FP8_CAPABILITY = (8, 9)  # Ada and Hopper (L4, L40S, RTX 4090, H100, H200) and newer


class QuantizationError(RuntimeError):
    """This quantized checkpoint cannot run here; the message says what it needs."""


@dataclass(frozen=True)
class Quantization:
    """What a checkpoint's ``quantization_config`` says: its method and, where it says, the weights'
    bits and number kind."""

    method: str
    bits: int | None = None
    kind: str = "int"  # int or float (FP8)

    @property
    def fp8(self) -> bool:
        return self.kind == "float" and self.bits == 8

    def describe(self) -> str:
        bits = f", {self.kind}{self.bits} weights" if self.bits else ""
        return f"{self.method}{bits}"


def read(folder: Path) -> Quantization | None:
    """The checkpoint's quantization, or None for plain weights."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not quantization:
        return None
    method = str(quantization.get("quant_method", "unknown"))
    if method in ("fp8", "fbgemm_fp8"):
        return Quantization(method, 8, "float")
    if method == "bitsandbytes":
        return Quantization(method, 4 if quantization.get("load_in_4bit") else 8)
    if method == "compressed-tensors":
        weights = [group.get("weights") or {} for group in (quantization.get("config_groups") or {}).values()]
        bits = {w.get("num_bits") for w in weights if w}
        kinds = {w.get("type", "int") for w in weights if w}
        return Quantization(method, bits.pop() if len(bits) == 1 else None, "float" if "float" in kinds else "int")
    return Quantization(method, quantization.get("bits") or quantization.get("w_bit"))


def check_runs_here(quantization: Quantization, device: torch.device, load_8bit: bool = False, load_4bit: bool = False) -> None:
    """Refuse what cannot run on ``device`` as the checkpoint was made, naming what it needs."""
    if load_8bit or load_4bit:
        raise QuantizationError(
            f"the checkpoint is already quantized ({quantization.describe()}): unset {'LOAD_8BIT' if load_8bit else 'LOAD_4BIT'}"
        )
    if quantization.fp8:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_CAPABILITY:
            where = f"a GPU of compute capability {capability[0]}.{capability[1]}" if capability else f"the {device.type}"
            raise QuantizationError(
                f"{quantization.describe()}: FP8 weights need a GPU of compute capability 8.9 or newer (L4, L40S, RTX 4090, "
                f"H100, H200); this worker runs on {where}, where transformers would silently dequantize them to bf16. "
                "Serve the unquantized model, or a 4-bit (GPTQ, AWQ, bitsandbytes) or int8 checkpoint"
            )
    needs = {"gptq": "gptqmodel", "awq": "gptqmodel", "compressed-tensors": "compressed_tensors", "bitsandbytes": "bitsandbytes"}
    package = needs.get(quantization.method)
    if package and importlib.util.find_spec(package) is None:
        raise QuantizationError(
            f"{quantization.describe()}: loading it needs the {package} package, which this image lacks "
            f"(pip install {package.replace('_', '-')})"
        )


def loading_config(quantization: Quantization):
    """What ``from_pretrained`` is given beside the checkpoint's own ``quantization_config``:
    compressed-tensors FP8 keeps its FP8 weights and runs transformers' FP8 matmuls
    (``use_optimized_inference``; ``check_runs_here`` has made sure the GPU has them), where
    transformers' default would dequantize them."""
    if quantization.method == "compressed-tensors" and quantization.fp8:
        from transformers import CompressedTensorsConfig

        return CompressedTensorsConfig(use_optimized_inference=True)
    return None


def settle(model, quantization: Quantization, dtype: torch.dtype) -> str:
    """After the load: compressed-tensors integer weights (W4A16, W8A16) decompressed now, as
    transformers would at the first forward (it has no integer kernels for them), so that the KV
    cache is sized on the memory they really take. Returns what the start log adds."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if quantization.method != "compressed-tensors" or quantization.fp8 or compressor is None:
        return ""
    compressor.decompress_model(model)
    return (
        f", decompressed to {str(dtype).removeprefix('torch.')} at load: transformers has no integer kernels for "
        "compressed-tensors, so the checkpoint saves download and disk, not memory"
    )
