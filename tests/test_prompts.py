"""Prompt templates: the four Alpaca-LoRA formats, the model's chat template, and raw prompts."""

import pytest
from transformers import AutoTokenizer

from llm_worker.model.prompts import file_templates, render_prompt, template_names
from llm_worker.schema import InputError

FILE_TEMPLATES = ["alpaca", "alpaca_legacy", "alpaca_short", "vigogne"]


def test_all_alpaca_lora_formats_are_template_files():
    assert sorted(file_templates()) == sorted(FILE_TEMPLATES)
    for spec in file_templates().values():
        assert {"prompt_input", "prompt_no_input", "response_split"} <= set(spec)
    assert template_names()[-2:] == ["chat", "none"]


@pytest.mark.parametrize("template", FILE_TEMPLATES)
def test_file_templates_place_instruction_and_input(worker, template):
    tokenizer = worker.loaded.tokenizer
    with_input = render_prompt(tokenizer, template, "Translate {this}", "le chat")
    without = render_prompt(tokenizer, template, "Translate {this}")
    assert "Translate {this}" in with_input.text and "le chat" in with_input.text
    assert "Translate {this}" in without.text and "le chat" not in without.text
    assert with_input.text.rstrip().endswith(with_input.response_split)
    assert without.text.rstrip().endswith(without.response_split)


def test_chat_template_uses_the_models_own_format(worker):
    prompt = render_prompt(worker.loaded.tokenizer, "chat", "Say hi", "twice")
    assert "<|im_start|>user\nSay hi\n\ntwice<|im_end|>" in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.response_split is None


@pytest.mark.parametrize("template", FILE_TEMPLATES)
def test_alpaca_family_answers_end_where_a_line_opens_a_new_section(worker, template):
    """A line starting with '### ' is a new section; Alpaca-LoRA's prompter kept it in the answer."""
    prompt = render_prompt(worker.loaded.tokenizer, template, "Name a color.")
    assert prompt.stop == (prompt.response_split, "\n### ")
    kept = render_prompt(worker.loaded.tokenizer, template, "Name a color.", stop_at_section=False)
    assert kept.stop == (prompt.response_split,)
    assert kept.text == prompt.text


@pytest.mark.parametrize("template", ["chat", "none"])
def test_templates_without_sections_add_no_stop_strings(worker, template):
    assert render_prompt(worker.loaded.tokenizer, template, "Name a color.").stop == ()


def test_chat_template_on_a_model_without_one_is_an_input_error_naming_the_field(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenizer.chat_template = None  # as a base LLaMA's tokenizer
    with pytest.raises(InputError, match=r"^prompt_config\.template: 'chat' needs a model with a chat template"):
        render_prompt(tokenizer, "chat", "Say hi")


def test_none_template_is_the_raw_instruction(worker):
    assert render_prompt(worker.loaded.tokenizer, "none", "Once upon a time").text == "Once upon a time"


@pytest.mark.parametrize("template", [*FILE_TEMPLATES, "chat", "none"])
@pytest.mark.parametrize("input_text", ["", "Paris, Berlin, Rome"])
def test_every_template_answers_with_and_without_input(worker, template, input_text):
    result = worker.complete(
        {
            "prompt_config": {"instruction": "List the cities.", "input": input_text, "template": template},
            "generation_config": {"max_new_tokens": 6},
        }
    )
    assert "error" not in result
    assert result["output"].strip()
    assert result["usage"]["completion_tokens"] <= 6
    for marker in ("### Response:", "### Réponse:"):
        assert marker not in result["output"]
