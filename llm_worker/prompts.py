"""Prompt templates: Alpaca-LoRA's JSON formats, the model's own chat template, or no template.

A template file in ``templates/`` has ``prompt_input``, ``prompt_no_input`` and
``response_split``; adding a format is adding a file. ``chat`` and ``none`` are built in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
CHAT = "chat"
RAW = "none"


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and the marker after which the model's answer starts (if any)."""

    text: str
    add_special_tokens: bool
    response_split: str | None


@cache
def file_templates() -> dict[str, dict[str, str]]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(TEMPLATE_DIR.glob("*.json"))}


def template_names() -> list[str]:
    return [*file_templates(), CHAT, RAW]


def render_prompt(tokenizer, template: str, instruction: str, input: str = "") -> Prompt:
    """Turn an instruction (and optional input) into the text the model continues."""
    if template == RAW:
        text = f"{instruction}\n\n{input}" if input else instruction
        return Prompt(text, add_special_tokens=True, response_split=None)
    if template == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_config.template: 'chat' needs a model with a chat template; this one has none")
        content = f"{instruction}\n\n{input}" if input else instruction
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return Prompt(text, add_special_tokens=False, response_split=None)
    spec = file_templates()[template]
    if input:
        text = spec["prompt_input"].format(instruction=instruction, input=input)
    else:
        text = spec["prompt_no_input"].format(instruction=instruction)
    return Prompt(text, add_special_tokens=True, response_split=spec["response_split"])

