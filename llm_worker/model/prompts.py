"""Prompt templates: Alpaca-LoRA's JSON formats, the model's own chat template, or no template.

A template file in ``templates/`` has ``prompt_input``, ``prompt_no_input`` and
``response_split``, and optionally ``new_section``: the text that opens a section after the
answer (``"\\n### "`` in the Alpaca family, where a line starting with ``### `` is a new
section). The answer ends there unless a job asks to keep what follows; Alpaca-LoRA's prompter
kept everything after ``### Response:``, so its answers ran on into ``### Explanation:`` and the
like. Adding a format is adding a file. ``chat`` and ``none`` are built in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from llm_worker.errors import InputError

TEMPLATE_DIR = Path(__file__).parent / "templates"
CHAT = "chat"
RAW = "none"


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt, the marker after which the model's answer starts (if any), and the
    strings at which the answer ends because the template's next part begins."""

    text: str
    add_special_tokens: bool
    response_split: str | None
    stop: tuple[str, ...] = ()


@cache
def file_templates() -> dict[str, dict[str, str]]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(TEMPLATE_DIR.glob("*.json"))}


def template_names() -> list[str]:
    return [*file_templates(), CHAT, RAW]


def render_prompt(
    tokenizer, template: str, instruction: str, input: str = "", *, stop_at_section: bool = True
) -> Prompt:
    """Turn an instruction (and optional input) into the text the model continues.

    ``stop_at_section`` false keeps the text after a new section (Alpaca-LoRA's behaviour)."""
    if template == RAW:
        text = f"{instruction}\n\n{input}" if input else instruction
        return Prompt(text, add_special_tokens=True, response_split=None)
    if template == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "prompt_config.template: 'chat' needs a model with a chat template and this one has none; "
                f"choose one of {', '.join(file_templates())} or {RAW}"
            )
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
    stop = (spec["response_split"],)
    if stop_at_section and spec.get("new_section"):
        stop += (spec["new_section"],)
    return Prompt(text, add_special_tokens=True, response_split=spec["response_split"], stop=stop)
