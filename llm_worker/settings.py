"""Every environment variable the worker reads, in one typed object.

The README's configuration table lists the same variables; keep them in step.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = PROJECT_ROOT / "model_cache"


class Settings(BaseSettings):
    """Worker configuration, read from the environment (names are the upper-case field names)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True, env_ignore_empty=True)

    base_model: str | None = Field(
        None, description="Hub id or local folder of a causal LM; unset: the embedded SmolLM2-135M-Instruct."
    )
    lora_weights: str | None = Field(None, description="PEFT LoRA adapter (folder or Hub id) loaded as the default adapter.")
    merge_lora: bool = Field(False, description="Merge LORA_WEIGHTS into the base weights (fastest single-adapter serving).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    load_8bit: bool = False
    load_4bit: bool = False
    trust_remote_code: bool = False
    hf_token: SecretStr | None = None

    model_cache_dir: Path = DEFAULT_CACHE_DIR
    hf_home: Path | None = Field(None, description="Hugging Face cache root; default: MODEL_CACHE_DIR/huggingface.")
    runpod_volume_dir: Path = Field(Path("/runpod-volume"), description="Where RunPod mounts network volumes.")

    max_new_tokens_limit: int = Field(2048, ge=1)
    max_input_tokens: int = Field(4096, ge=1)
    max_concurrency: int = Field(32, ge=1, le=1024)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_prefill_tokens: int = Field(4096, ge=1)
    max_job_seconds: float = Field(540.0, ge=0)
    max_stop_strings: int = Field(16, ge=0)
    max_stop_chars: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _one_quantization(self) -> Settings:
        if self.load_8bit and self.load_4bit:
            raise ValueError("LOAD_8BIT and LOAD_4BIT are exclusive: set at most one")
        return self

    @cached_property
    def hub_cache_dir(self) -> Path:
        """Where Hub downloads go, following HF_HOME conventions (HF_HOME/hub)."""
        return (self.hf_home or self.model_cache_dir / "huggingface") / "hub"

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None
