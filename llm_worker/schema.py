"""The job input: one typed, bounded pydantic model per part of the event.

``parse_job_input`` is the only way in; its errors name the field and the rule broken.
Limits that depend on the deployment (``MAX_NEW_TOKENS_LIMIT``, stop strings) come in through
the validation context, so the schema itself stays free of global state.
"""

from __future__ import annotations

from dataclasses import dataclass
import difflib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llm_worker.errors import InputError
from llm_worker.model.prompts import template_names


def _utf8(value: str) -> str:
    """pydantic refuses lone surrogates only where it converts the string (e.g. for a length
    check); the tokenizer refuses them everywhere, so every text field checks."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (it holds a lone surrogate such as \\ud800)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


DEFAULT_MAX_NEW_TOKENS = 128
CONSTRAINTS = ("json_schema", "regex", "choice")


@dataclass(frozen=True)
class Limits:
    max_input_bytes: int = 1_000_000
    max_new_tokens: int = 2048
    max_stop_strings: int = 16
    max_stop_chars: int = 200


class PromptConfig(_Strict):
    instruction: Text = Field(min_length=1)
    input: Text = ""
    template: str = "alpaca"
    stop_at_section: bool = True  # Alpaca family: end the answer where a line starts with "### "

    @field_validator("instruction")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be only whitespace")
        return value

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in template_names():
            raise ValueError(f"unknown template {value!r}; choose one of {', '.join(template_names())}")
        return value


class GenerationConfig(_Strict):
    """Decoding settings. Sampling happens when ``do_sample`` is true, or when it is unset and
    ``temperature`` > 0 (Alpaca-LoRA's generate.py silently ignored temperature; we don't)."""

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    num_beams: int = Field(1, ge=1, le=8)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    do_sample: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[Text] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=16)  # answers to the same prompt; with a seed, choice i uses seed + i
    logprobs: int | None = Field(None, ge=0, le=20)  # each token's logprob and this many alternatives
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # sampling: drop tokens below min_p x the most likely one's probability
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # OpenAI's: minus this once from each token generated so far
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # OpenAI's: minus this per time a token was generated so far
    logit_bias: dict[Annotated[str, Field(pattern=r"^\d{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=300
    )  # token id (as text, as in OpenAI's JSON) -> added to its logit
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=64)  # end the answer (not in its text)
    ignore_eos: bool = False  # the end-of-sequence token is never chosen: the answer runs to max_new_tokens or a stop
    # constrained decoding (at most one): the answer follows a JSON schema, a regex, or is one of the choices
    json_schema: dict[str, Any] | None = None
    regex: Text | None = Field(None, min_length=1)
    choice: list[Annotated[Text, Field(min_length=1)]] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _default_within_deployment_limit(cls, data: Any, info: ValidationInfo) -> Any:
        """Unset ``max_new_tokens`` is 128, or ``MAX_NEW_TOKENS_LIMIT`` where that is lower."""
        if isinstance(data, dict) and "max_new_tokens" not in data:
            data = {**data, "max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, _limits(info).max_new_tokens)}
        return data

    @field_validator("max_new_tokens")
    @classmethod
    def _within_deployment_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_new_tokens
        if value > limit:
            raise ValueError(f"must be at most {limit} (MAX_NEW_TOKENS_LIMIT)")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stop_strings(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limits = _limits(info)
        if len(value) > limits.max_stop_strings:
            raise ValueError(f"at most {limits.max_stop_strings} stop strings (MAX_STOP_STRINGS)")
        for text in value:
            if not 1 <= len(text) <= limits.max_stop_chars:
                raise ValueError(f"each stop string must have 1 to {limits.max_stop_chars} characters (MAX_STOP_CHARS)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if self.sampling:
            if self.temperature == 0:
                raise ValueError("temperature must be > 0 when do_sample is true (or leave temperature unset)")
        else:
            ignored = [name for name in ("top_p", "top_k", "min_p", "seed") if getattr(self, name) is not None]
            if self.temperature:
                ignored.insert(0, "temperature")
            if ignored:
                names = f"{', '.join(ignored[:-1])} and {ignored[-1]}" if ignored[1:] else ignored[0]
                rule = f"{names} only {'apply' if ignored[1:] else 'applies'} when sampling"
                if self.do_sample is False:
                    raise ValueError(f"{rule}, and do_sample is false")
                why = "temperature is unset" if self.temperature is None else "temperature is 0"
                raise ValueError(f"{rule}, and sampling is off because {why}: set temperature > 0 (e.g. 0.7)")
        return self

    @model_validator(mode="after")
    def _logprobs_come_from_the_sampler(self) -> GenerationConfig:
        if self.logprobs is not None and self.num_beams > 1:
            raise ValueError("logprobs are not available with num_beams > 1 (beam search scores beams, not tokens)")
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationConfig:
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are exclusive: give at most one constraint")
        if given:
            clashes = {
                "num_beams": self.num_beams > 1,
                "min_new_tokens": self.min_new_tokens > 0,
                "ignore_eos": self.ignore_eos,
                "no_repeat_ngram_size": self.no_repeat_ngram_size > 0,
            }
            for name, clash in clashes.items():
                if clash:
                    raise ValueError(
                        f"{name} cannot be combined with {given[0]} (it could forbid every token the constraint allows)"
                        if name != "num_beams"
                        else f"num_beams > 1 cannot be combined with {given[0]}: beam search is not constrained"
                    )
        return self

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """The constraint's field name and value, if the job has one."""
        return next(((name, getattr(self, name)) for name in CONSTRAINTS if getattr(self, name) is not None), None)

    @property
    def sampling(self) -> bool:
        if self.do_sample is not None:
            return self.do_sample
        return bool(self.temperature)


class JobInput(_Strict):
    prompt_config: PromptConfig
    generation_config: GenerationConfig = Field(default_factory=dict, validate_default=True)  # default under the limits
    stream: bool = False
    adapter: Text | None = Field(None, min_length=1, max_length=200)


class ListAdaptersInput(_Strict):
    list_adapters: Literal[True]


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits", Limits())


# Names that other APIs (OpenAI, vLLM, TGI, transformers' generate) give a field of the event, or
# that people type first: an unknown key among them gets a hint naming ours.
GEN, PROMPT = "generation_config", "prompt_config"
ALIASES = {
    "max_tokens": f"{GEN}.max_new_tokens",
    "max_completion_tokens": f"{GEN}.max_new_tokens",
    "max_length": f"{GEN}.max_new_tokens (it counts the answer's tokens only)",
    "stop_sequences": f"{GEN}.stop",
    "stop_words": f"{GEN}.stop",
    "stop_strings": f"{GEN}.stop",
    "num_return_sequences": f"{GEN}.n",
    "best_of": f"{GEN}.n",
    "top_logprobs": f"{GEN}.logprobs",
    "random_seed": f"{GEN}.seed",
    "response_format": f"{GEN}.json_schema",
    "guided_json": f"{GEN}.json_schema",
    "guided_regex": f"{GEN}.regex",
    "guided_choice": f"{GEN}.choice",
    "prompt": f"{PROMPT}.instruction",
    "inputs": f"{PROMPT}.instruction",
    "text": f"{PROMPT}.instruction",
    "query": f"{PROMPT}.instruction",
    "question": f"{PROMPT}.instruction",
    "context": f"{PROMPT}.input",
    "parameters": GEN,
    "sampling_params": GEN,
    "generate_kwargs": GEN,
    "generation_kwargs": GEN,
    "streaming": "stream",
    "lora": "adapter",
    "lora_name": "adapter",
    "lora_request": "adapter",
    "adapter_name": "adapter",
    "adapter_id": "adapter",
    "model": "adapter",
    "messages": "openai_input",
}
NOTES = {  # said after the hint
    "model": "the base model is the deployment's BASE_MODEL, and a job names one of its adapters",
    "messages": 'an OpenAI request goes as {"openai_route": "/v1/chat/completions", "openai_input": {"messages": [...]}}',
}


def _sections() -> dict[str, tuple[str, ...]]:
    """Each part of the event (``""``: the top level) and its fields."""
    return {"": tuple(JobInput.model_fields), PROMPT: tuple(PromptConfig.model_fields), GEN: tuple(GenerationConfig.model_fields)}


def hint(location: tuple[str | int, ...]) -> str | None:
    """What an unknown key was probably meant to be: another API's name for one of our fields,
    one of our fields in another part of the event, or a close spelling."""
    key, section = str(location[-1]), ".".join(str(part) for part in location[:-1])
    sections = _sections()
    if section not in sections:
        return None
    if key.lower() in ALIASES:
        meant = f"did you mean {ALIASES[key.lower()]}?"
        return f"{meant} {NOTES[key.lower()]}" if key.lower() in NOTES else meant
    elsewhere = [f"{name}.{key}" if name else key for name, fields in sections.items() if name != section and key in fields]
    if elsewhere:
        return f"did you mean {elsewhere[0]}?"
    close = difflib.get_close_matches(key.lower(), sections[section], n=1, cutoff=0.75)
    if close:
        return f"did you mean {f'{section}.{close[0]}' if section else close[0]}?"
    return None


def describe(error: ValidationError, hints: bool = True) -> str:
    """All problems on one line: ``field.path: rule; ...``; with ``hints``, an unknown key of a
    generation job gets a hint when a known name is close or is another API's name for the field."""
    parts = []
    for item in error.errors(include_url=False):
        location = ".".join(_field_name(part) for part in item["loc"]) or "input"
        message = item["msg"].removeprefix("Value error, ")
        if hints and item["type"] == "extra_forbidden" and item["loc"]:
            meant = hint(item["loc"])
            if meant:
                message += f" ({meant})"
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def _field_name(part: str | int) -> str:
    """A key as sent, quoted and escaped where it is empty or holds a line break or other
    unprintable character (an unknown key must not break the one-line error)."""
    text = str(part)
    return text if text.isprintable() and text else json.dumps(text)


def parse_job_input(raw: Any, limits: Limits) -> JobInput | ListAdaptersInput:
    if not isinstance(raw, dict):
        raise InputError(f"input: must be a JSON object, got {type(raw).__name__}")
    try:
        size = len(json.dumps(raw).encode())
    except (TypeError, ValueError, RecursionError):
        raise InputError("input: must be plain JSON (objects, arrays, strings, numbers, booleans, null)") from None
    if size > limits.max_input_bytes:
        raise InputError(f"input: {size} bytes exceeds MAX_INPUT_BYTES={limits.max_input_bytes}")
    model = ListAdaptersInput if "list_adapters" in raw else JobInput
    try:
        return model.model_validate(raw, context={"limits": limits})
    except ValidationError as err:
        raise InputError(describe(err, hints=model is JobInput)) from None
