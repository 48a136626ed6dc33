"""Every environment variable the worker reads, in one typed object.

The README's configuration table lists the same variables; keep them in step. An invalid value
raises ``SettingsError``, one line per variable: its name, the value given and what it accepts.
"""

from __future__ import annotations

import hmac
import re
from functools import cached_property
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_worker.model.prompts import file_templates

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BASE_ADAPTER_NAME = "base"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = PROJECT_ROOT / "model_cache"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(ValueError):
    """Invalid settings; ``problems`` holds one line per variable, e.g.
    ``DTYPE='fp16': use auto, float32, float16 or bfloat16``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Environment(BaseSettings):
    """Variables read from the environment (names are the upper-case field names); ``values``
    given to the constructor override them. An invalid one raises ``SettingsError``."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True, env_ignore_empty=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError([_problem(type(self), item) for item in err.errors(include_url=False)]) from None


class Settings(Environment):
    """Worker configuration: the model, its adapters, the engine and the limits of a job."""

    base_model: str | None = Field(
        None, description="Hub id or local folder of a causal LM; unset: the embedded SmolLM2-135M-Instruct."
    )
    lora_weights: str | None = Field(None, description="PEFT LoRA adapter (folder or Hub id) loaded as the default adapter.")
    merge_lora: bool = Field(False, description="Merge LORA_WEIGHTS into the base weights (fastest single-adapter serving).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weights and compute dtype; auto: bfloat16 on bf16-capable GPUs (float16 with LOAD_8BIT or "
        "older GPUs); on the CPU bfloat16 where it has avx512_bf16 and no AMX (e.g. AMD Zen 4), float32 elsewhere "
        "(AMX Xeons, CPUs without native bf16): decided by the CPU's features, the same at every start.",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: CUDA when present, else CPU.")
    load_8bit: bool = Field(False, description="Load the weights in 8-bit through bitsandbytes.")
    load_4bit: bool = Field(False, description="Load the weights in 4-bit (NF4) through bitsandbytes.")
    trust_remote_code: bool = Field(False, description="Allow a model's own Python code from the Hub (off: safer).")
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated/private models; never logged.")

    model_cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="Where converted and downloaded weights live.")
    hf_home: Path | None = Field(None, description="Hugging Face cache root; default: MODEL_CACHE_DIR/huggingface.")
    runpod_volume_dir: Path = Field(Path("/runpod-volume"), description="Where RunPod mounts network volumes.")

    adapter_dir: Path = Field(DEFAULT_CACHE_DIR / "adapters", description="One PEFT adapter folder per name.")
    lora_adapters: str | None = Field(None, description="More adapters by name: name=path_or_hub_id,...")
    max_loaded_adapters: int = Field(8, ge=1, le=256, description="Adapters kept loaded; the least recently used goes.")
    max_lora_rank: int = Field(64, ge=1, description="Adapters of a higher LoRA rank are refused.")
    allow_hub_adapters: bool = Field(False, description="Let LORA_ADAPTERS entries be fetched from the Hub.")
    allow_runtime_adapters: bool = Field(
        False, description="Let the HTTP server's POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove adapters."
    )

    max_new_tokens_limit: int = Field(2048, ge=1, description="Largest max_new_tokens a job may ask for.")
    max_input_tokens: int = Field(4096, ge=1, description="Longest prompt in tokens (also capped by the context).")
    max_input_bytes: int = Field(1_000_000, ge=1, description="Largest job input, as JSON bytes.")
    max_concurrency: int = Field(32, ge=1, le=1024, description="Jobs the worker takes from RunPod at once.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Requests decoded together in one step.")
    max_prefill_tokens: int = Field(
        512, ge=16, description="Prompt tokens prefilled per engine step, between decoding steps (chunked prefill)."
    )
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="KV cache capacity in tokens; unset: from GPU_MEMORY_UTILIZATION on CUDA, 32768 on CPU."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of the GPU's memory the worker may use (weights + KV cache)."
    )
    cuda_graphs: bool = Field(True, description="Replay decoding steps as CUDA graphs on CUDA (off: eager, for debugging).")
    attention_backend: Literal["auto", "gather", "triton"] = Field(
        "auto",
        description="Attention over the KV pool: gather (each row's blocks copied out for the model's own kernel), "
        "triton (a paged kernel that reads the pool in place, CUDA only; not yet proven on a GPU), auto: gather.",
    )
    lora_backend: Literal["auto", "peft", "triton"] = Field(
        "auto",
        description="Rows of different LoRA adapters in one step: peft (its loop over the adapters), triton (one "
        "batched product per layer, plain LoRA only, CUDA only; not yet proven on a GPU), auto: peft.",
    )
    decode_compile: Literal["auto", "off", "inductor"] = Field(
        "auto",
        description="Decoding steps (before their CUDA graphs are captured) and prefill chunks compiled by torch.compile: inductor (norms, "
        "rotary, SiLU and residual adds fused; compiled code cached under MODEL_CACHE_DIR/torch_compile; CUDA only; "
        "not yet proven on a GPU), off: the model's own modules, auto: off.",
    )
    overlap_steps: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Launch each decoding step before the previous step's tokens are read back, so that the device "
        "never waits for the host between steps (on; exact, proven against a simulated GPU, not yet on a real one), "
        "or one step after the other (off); auto: off. Steps with a row under a grammar or no_repeat_ngram_size "
        "run one after the other either way.",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64,
        description="Ranks the model is split over, one process per GPU (NCCL; gloo on the CPU): attention heads and MLP "
        "width divided as transformers' plan for the architecture says. Must divide the attention heads. 1: one device.",
    )
    tensor_parallel_timeout: float = Field(
        120.0, gt=0, description="Seconds a tensor-parallel collective may wait for the other ranks before the worker stops."
    )
    enable_prefix_cache: bool = Field(
        True, description="Reuse the keys and values of prompt blocks already computed (a shared preamble or system prompt)."
    )
    max_job_seconds: float = Field(
        540.0, ge=0, description="A job running longer ends with finish_reason time_limit and its text so far; 0: off."
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings a job may give.")
    max_stop_chars: int = Field(200, ge=1, description="Longest stop string, in characters.")
    chat_template: str | None = Field(
        None,
        description="Chat template for /v1/chat/completions: Jinja text, or a prompt_config template name (alpaca, ...) "
        "for one user turn; unset: the model's own.",
    )
    log_level: str = Field(
        "INFO", description="Level of the worker's own log lines: DEBUG, INFO, WARNING or ERROR; DEBUG adds job progress."
    )

    @field_validator("load_4bit")
    @classmethod
    def _one_quantization(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("load_8bit"):
            raise ValueError("LOAD_8BIT and LOAD_4BIT are exclusive: set at most one")
        return value

    @field_validator("tensor_parallel_size")
    @classmethod
    def _splittable(cls, value: int, info: ValidationInfo) -> int:
        if value == 1:
            return value
        refused = [
            f"{name}={info.data.get(field)}" for name, field, bad in (
                ("LOAD_8BIT", "load_8bit", True), ("LOAD_4BIT", "load_4bit", True), ("OVERLAP_STEPS", "overlap_steps", "on"),
                ("LORA_BACKEND", "lora_backend", "triton"), ("DECODE_COMPILE", "decode_compile", "inductor"),
            ) if info.data.get(field) == bad
        ]
        if refused:
            raise ValueError(
                f"{' and '.join(refused)} {'is' if len(refused) == 1 else 'are'} not served with tensor parallel yet: "
                "use TENSOR_PARALLEL_SIZE=1, or leave them unset"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"use {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}")
        return value.upper()

    @field_validator("chat_template")
    @classmethod
    def _template_or_name(cls, value: str | None) -> str | None:
        if value is not None and value not in file_templates() and "{{" not in value and "{%" not in value:
            raise ValueError(f"use a Jinja chat template or one of {', '.join(file_templates())}")
        return value

    @field_validator("lora_adapters")
    @classmethod
    def _adapter_list(cls, value: str | None) -> str | None:
        parse_adapter_list(value)
        return value

    @cached_property
    def hub_cache_dir(self) -> Path:
        """Where Hub downloads go, following HF_HOME conventions (HF_HOME/hub)."""
        return (self.hf_home or self.model_cache_dir / "huggingface") / "hub"

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None

    def ineffective(self) -> list[str]:
        """Settings that are valid but do nothing in this combination, one line each."""
        found = []
        if self.merge_lora and not self.lora_weights:
            found.append("MERGE_LORA=1 does nothing without LORA_WEIGHTS")
        if self.allow_hub_adapters and not self.lora_adapters:
            found.append("ALLOW_HUB_ADAPTERS=1 does nothing without LORA_ADAPTERS")
        if self.base_model is None and self.trust_remote_code:
            found.append("TRUST_REMOTE_CODE=1 does nothing for the embedded default model (BASE_MODEL is unset)")
        if self.hf_token and not (self.base_model or self.lora_weights or self.lora_adapters):
            found.append("HF_TOKEN is set, but BASE_MODEL, LORA_WEIGHTS and LORA_ADAPTERS name nothing to fetch")
        return found


class ServerSettings(Environment):
    """The HTTP server's own variables (``python -m llm_worker.doors.server``); the RunPod worker reads none."""

    api_key: SecretStr | None = Field(
        None, description="Every route but / and /health needs Authorization: Bearer <API_KEY>; never logged."
    )
    shutdown_grace_seconds: float = Field(
        8.0,
        ge=0,
        description="On SIGTERM, how long running requests may finish before they are failed (under docker stop's 10 s).",
    )
    max_waiting_requests: int = Field(
        128, ge=1, description="Generation requests waiting for the engine past which new ones get 429 with Retry-After."
    )
    cors_origins: str | None = Field(
        None, description="Origins browsers may call from, comma-separated (* for any); unset: no CORS headers."
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        for origin in origins(value):
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port] (no path), comma-separated, or *")
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        return origins(self.cors_origins)

    def authorizes(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """A request's raw headers carry ``Authorization: Bearer <API_KEY>`` or, as Anthropic's
        clients send it, ``x-api-key: <API_KEY>`` (always, without a key); compared in constant time."""
        if self.api_key is None:
            return True
        key = self.api_key.get_secret_value().encode()
        given = dict(headers)
        scheme, _, bearer = given.get(b"authorization", b"").decode("latin-1").partition(" ")
        by_bearer = scheme.lower() == "bearer" and hmac.compare_digest(bearer.strip().encode(), key)
        return hmac.compare_digest(given.get(b"x-api-key", b"").strip(), key) or by_bearer


def origins(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


SECRETS = ("hf_token", "api_key")
SPECIAL_VALUES = {"device": "use auto, cpu, cuda or cuda:N"}


def _problem(settings: type[Environment], item: dict[str, Any]) -> str:
    """One validation error as ``NAME=value: what it accepts``."""
    name = str(item["loc"][0]) if item["loc"] else ""
    rule = item["msg"].removeprefix("Value error, ")
    if name not in settings.model_fields:
        return rule
    value = "(hidden)" if name in SECRETS else repr(item["input"])
    if item["type"] != "value_error":  # a type or bound error: say what the variable accepts instead
        rule = SPECIAL_VALUES.get(name) or _accepted(settings.model_fields[name])
    return f"{name.upper()}={value}: {rule}"


def _accepted(field: FieldInfo) -> str:
    """What a setting accepts, in words, from its type and bounds."""
    kind = field.annotation
    if get_origin(kind) is UnionType:  # X | None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if get_origin(kind) is Literal:
        *first, last = get_args(kind)
        return f"use {', '.join(first)} or {last}"
    if kind is bool:
        return "use 1 or 0 (true/false, yes/no and on/off work too)"
    bounds = {key: getattr(meta, key) for meta in field.metadata for key in ("gt", "ge", "le") if hasattr(meta, key)}
    number = {int: "a whole number", float: "a number", Path: "a folder path"}.get(kind, "text")
    if "ge" in bounds and "le" in bounds:
        return f"use {number} from {bounds['ge']} to {bounds['le']}"
    words = {"gt": "above {}", "ge": "at least {}", "le": "at most {}"}
    limits = " and ".join(words[key].format(value) for key, value in bounds.items())
    return f"use {number} {'of ' if limits.startswith('at') else ''}{limits}".strip()


def parse_adapter_list(value: str | None) -> dict[str, str]:
    """LORA_ADAPTERS (``name=path_or_hub_id,...``) as a dict; refuses malformed entries and bad names."""
    entries: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not source or not ADAPTER_NAME.match(name) or name == BASE_ADAPTER_NAME:
            raise ValueError(
                f"{item!r} is not name=path_or_hub_id; use name=path_or_hub_id,... with names of 1-64 letters, "
                "digits, '.', '_' or '-' (not 'base')"
            )
        entries[name] = source
    return entries
