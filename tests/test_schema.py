"""Every rule of the job input schema gives an error naming the field and the rule."""

import pytest

from llm_worker.schema import InputError, Limits, parse_job_input

LIMITS = Limits(max_new_tokens=512, max_stop_strings=4, max_stop_chars=10)


def error_for(raw) -> str:
    with pytest.raises(InputError) as caught:
        parse_job_input(raw, LIMITS)
    return str(caught.value)


def with_generation(**generation) -> dict:
    return {"prompt_config": {"instruction": "Hi"}, "generation_config": generation}


def test_valid_minimal_input_gets_defaults():
    job = parse_job_input({"prompt_config": {"instruction": "Hi"}}, LIMITS)
    assert job.prompt_config.template == "alpaca"
    assert job.prompt_config.input == ""
    assert job.generation_config.max_new_tokens == 128
    assert job.generation_config.sampling is False
    assert job.stream is False


@pytest.mark.parametrize("raw", [None, [], "text", 3])
def test_non_object_input_is_refused(raw):
    assert error_for(raw).startswith("input: must be a JSON object")


def test_missing_instruction_is_named():
    assert "prompt_config.instruction: Field required" in error_for({"prompt_config": {}})


def test_missing_prompt_config_is_named():
    assert "prompt_config: Field required" in error_for({"generation_config": {}})


def test_empty_instruction_is_refused():
    assert "prompt_config.instruction" in error_for({"prompt_config": {"instruction": ""}})


@pytest.mark.parametrize("blank", [" ", "\n\t \n", "\u3000"])
def test_whitespace_only_instruction_is_refused_like_an_empty_one(blank):
    assert error_for({"prompt_config": {"instruction": blank}}) == "prompt_config.instruction: must not be only whitespace"


def test_wrong_type_is_named():
    message = error_for(with_generation(max_new_tokens="12"))
    assert "generation_config.max_new_tokens" in message and "integer" in message


def test_bool_is_not_taken_for_a_number():
    assert "generation_config.top_k" in error_for(with_generation(top_k=True))


def test_unknown_keys_are_refused_at_every_level():
    assert "prompt_config.instructions: Extra inputs are not permitted" in error_for(
        {"prompt_config": {"instruction": "x", "instructions": "y"}}
    )
    assert "generation_config.temprature: Extra inputs" in error_for(with_generation(temprature=0.5))
    assert "streaming: Extra inputs" in error_for({"prompt_config": {"instruction": "x"}, "streaming": True})


@pytest.mark.parametrize(
    "event, hint",
    [
        # other APIs' names for our fields (OpenAI, vLLM, TGI, transformers)
        (with_generation(max_tokens=5), "generation_config.max_tokens: Extra inputs are not permitted (did you mean generation_config.max_new_tokens?)"),
        ({"prompt": "Hi"}, "prompt: Extra inputs are not permitted (did you mean prompt_config.instruction?)"),
        (with_generation(stop_sequences=["x"]), "(did you mean generation_config.stop?)"),
        (with_generation(num_return_sequences=2), "(did you mean generation_config.n?)"),
        (with_generation(guided_json={}), "(did you mean generation_config.json_schema?)"),
        ({"inputs": "Hi", "parameters": {}}, "inputs: Extra inputs are not permitted (did you mean prompt_config.instruction?); "
         "parameters: Extra inputs are not permitted (did you mean generation_config?)"),
        ({"prompt_config": {"instruction": "x"}, "model": "m"}, "(did you mean adapter? the base model is the deployment's BASE_MODEL"),
        ({"messages": []}, '(did you mean openai_input? an OpenAI request goes as {"openai_route": "/v1/chat/completions"'),
        # one of our fields in another part of the event
        ({"prompt_config": {"instruction": "x"}, "temperature": 0.5}, "temperature: Extra inputs are not permitted (did you mean generation_config.temperature?)"),
        (with_generation(stream=True), "generation_config.stream: Extra inputs are not permitted (did you mean stream?)"),
        ({"prompt_config": {"instruction": "x", "max_new_tokens": 3}}, "(did you mean generation_config.max_new_tokens?)"),
        # close spellings
        (with_generation(temprature=0.5), "generation_config.temprature: Extra inputs are not permitted (did you mean generation_config.temperature?)"),
        ({"prompt_config": {"instructions": "x"}}, "(did you mean prompt_config.instruction?)"),
        ({"prompt_config": {"instruction": "x"}, "adpter": "a"}, "adpter: Extra inputs are not permitted (did you mean adapter?)"),
    ],
)
def test_an_unknown_key_gets_a_hint_when_it_names_a_field_we_have(event, hint):
    assert hint in error_for(event)


def test_an_unknown_key_with_nothing_close_gets_no_hint():
    message = error_for({"prompt_config": {"instruction": "x"}, "generation_config": {"zebra": 1}, "list_adapters_please": 1})
    assert message.endswith("generation_config.zebra: Extra inputs are not permitted; list_adapters_please: Extra inputs are not permitted")
    assert error_for({"list_adapters": True, "prompt_config": {}}) == "prompt_config: Extra inputs are not permitted"


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("temperature", -0.1, "greater than or equal to 0"),
        ("temperature", 6.0, "less than or equal to 5"),
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("top_k", -1, "greater than or equal to 0"),
        ("num_beams", 0, "greater than or equal to 1"),
        ("num_beams", 9, "less than or equal to 8"),
        ("max_new_tokens", 0, "greater than or equal to 1"),
        ("min_new_tokens", -1, "greater than or equal to 0"),
        ("repetition_penalty", 0.0, "greater than 0"),
        ("no_repeat_ngram_size", -2, "greater than or equal to 0"),
        ("seed", -1, "greater than or equal to 0"),
    ],
)
def test_out_of_range_numbers_name_field_and_bound(field, value, rule):
    generation = {field: value}
    if field in ("top_p", "top_k", "seed"):
        generation["do_sample"] = True
    message = error_for(with_generation(**generation))
    assert f"generation_config.{field}" in message and rule in message


def test_max_new_tokens_is_bounded_by_the_deployment_limit():
    assert "at most 512 (MAX_NEW_TOKENS_LIMIT)" in error_for(with_generation(max_new_tokens=513))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_infinity_are_refused(value):
    assert "generation_config.temperature" in error_for(with_generation(temperature=value))


def test_unknown_template_lists_the_choices():
    message = error_for({"prompt_config": {"instruction": "x", "template": "llama2"}})
    assert "prompt_config.template" in message and "alpaca, alpaca_legacy" in message and "chat, none" in message


def test_min_new_tokens_above_max_is_refused():
    assert "min_new_tokens must not exceed max_new_tokens" in error_for(with_generation(max_new_tokens=4, min_new_tokens=5))


def test_sampling_settings_without_sampling_are_not_silently_dropped():
    message = error_for(with_generation(do_sample=False, temperature=0.7, top_p=0.9, seed=1))
    assert message == "generation_config: temperature, top_p and seed only apply when sampling, and do_sample is false"


@pytest.mark.parametrize("temperature, why", [(None, "temperature is unset"), (0.0, "temperature is 0")])
def test_a_seed_without_temperature_says_how_to_turn_sampling_on(temperature, why):
    generation = {"seed": 1} if temperature is None else {"seed": 1, "temperature": temperature}
    assert error_for(with_generation(**generation)) == (
        f"generation_config: seed only applies when sampling, and sampling is off because {why}: "
        "set temperature > 0 (e.g. 0.7)"
    )


def test_zero_temperature_with_do_sample_is_contradictory():
    assert "temperature must be > 0 when do_sample is true" in error_for(with_generation(do_sample=True, temperature=0))


def test_temperature_alone_turns_sampling_on():
    """Alpaca-LoRA's generate.py never set do_sample, so temperature did nothing; here it samples."""
    job = parse_job_input(with_generation(temperature=0.7), LIMITS)
    assert job.generation_config.sampling is True


def test_stop_strings_are_bounded_in_count_and_length():
    assert "at most 4 stop strings (MAX_STOP_STRINGS)" in error_for(with_generation(stop=["a"] * 5))
    assert "1 to 10 characters (MAX_STOP_CHARS)" in error_for(with_generation(stop=["x" * 11]))
    assert "1 to 10 characters" in error_for(with_generation(stop=[""]))


@pytest.mark.parametrize("limit, default", [(512, 128), (64, 64)])
def test_default_max_new_tokens_never_exceeds_the_deployment_limit(limit, default):
    limits = Limits(max_new_tokens=limit)
    for raw in ({"prompt_config": {"instruction": "Hi"}}, with_generation(temperature=0.5)):
        assert parse_job_input(raw, limits).generation_config.max_new_tokens == default


def test_stop_at_section_is_on_unless_the_job_turns_it_off():
    assert parse_job_input({"prompt_config": {"instruction": "Hi"}}, LIMITS).prompt_config.stop_at_section is True
    kept = parse_job_input({"prompt_config": {"instruction": "Hi", "stop_at_section": False}}, LIMITS)
    assert kept.prompt_config.stop_at_section is False
    assert "prompt_config.stop_at_section: Input should be a valid boolean" in error_for(
        {"prompt_config": {"instruction": "Hi", "stop_at_section": "no"}}
    )


def test_an_unknown_key_with_a_line_break_keeps_the_error_on_one_line():
    message = error_for({"prompt_config": {"instruction": "Hi", "a\nb": 1}, "": 2})
    assert message.splitlines() == [message]
    assert 'prompt_config."a\\nb": Extra inputs are not permitted' in message
    assert '"": Extra inputs are not permitted' in message
