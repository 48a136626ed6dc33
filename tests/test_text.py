"""Incremental answer text: deltas that join to the answer, whole characters only, stop strings."""

import random

import pytest
from transformers import AutoTokenizer

from llm_worker.engine.text import REPLACEMENT, AnswerText

SAMPLES = [
    "Bonjour, ça va très bien ! Déjà vu, naïve façade.",
    "東京は日本の首都です。おやすみなさい。",
    "Emoji: 🚀🔥👩‍💻 and 🇫🇷 flags, then plain text.",
    "  leading spaces, a tab\tand\nnew lines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(params=[True, False], ids=["decode_stream", "offsets"])
def answer_text(request, tokenizer):
    """Both ways of decoding incrementally: tokenizers' DecodeStream and the offsets fallback."""
    return lambda stops=(): AnswerText(tokenizer, stops, use_decode_stream=request.param)


def feed(tokenizer, answer_text, text, stops=()):
    answer = answer_text(stops)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        answer.add(token)
        deltas.append(answer.delta())
        if answer.stopped:
            break
    deltas.append(answer.delta(final=True))
    return answer, deltas


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_join_to_the_full_decode(tokenizer, answer_text, text):
    answer, deltas = feed(tokenizer, answer_text, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(deltas) == answer.answer == tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert REPLACEMENT not in "".join(deltas)


@pytest.mark.parametrize("text", SAMPLES)
def test_unstripped_deltas_join_to_the_text_exactly_as_generated(tokenizer, text):
    """``strip=False`` (OpenAI's completions): leading and trailing whitespace stay; a stop string still cuts."""
    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    for use_decode_stream in (True, False):
        answer = AnswerText(tokenizer, (), use_decode_stream=use_decode_stream, strip=False)
        deltas = []
        for token in ids:
            answer.add(token)
            deltas.append(answer.delta())
        deltas.append(answer.delta(final=True))
        assert "".join(deltas) == answer.answer == tokenizer.decode(ids, skip_special_tokens=True)
    cut = AnswerText(tokenizer, (" France",), strip=False)
    for token in tokenizer(" Paris is in France, of course", add_special_tokens=False)["input_ids"]:
        cut.add(token)
        if cut.stopped:
            break
    assert cut.stopped and cut.answer == cut.delta(final=True) == " Paris is in"


def test_an_answer_cut_inside_a_character_drops_the_incomplete_character(tokenizer, answer_text):
    ids = tokenizer("おやすみなさい🚀", add_special_tokens=False)["input_ids"]
    cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT)]
    assert cuts, "the sample should have tokens that end inside a character"
    for n in cuts:
        answer = answer_text()
        streamed = ""
        for token in ids[:n]:
            answer.add(token)
            streamed += answer.delta()
        streamed += answer.delta(final=True)
        assert REPLACEMENT not in answer.answer and streamed == answer.answer
        assert tokenizer.decode(ids[:n]).startswith(answer.answer)


def test_stop_string_spanning_tokens_cuts_the_answer_and_never_streams_its_start(tokenizer, answer_text):
    text = "The answer is 42.\n### Explanation: more text here"
    answer, deltas = feed(tokenizer, answer_text, text, stops=("\n### ",))
    assert answer.stopped
    assert answer.answer == "The answer is 42."
    streamed = "".join(deltas)
    assert streamed == "The answer is 42."
    for delta in deltas:
        assert "#" not in delta


def test_partial_stop_string_is_held_back_until_it_cannot_complete(tokenizer, answer_text):
    answer = answer_text(("STOP HERE",))
    sent = ""
    for token in tokenizer("go STOP HER", add_special_tokens=False)["input_ids"]:
        answer.add(token)
        sent += answer.delta()
    assert sent == "go"  # " STOP HER" could still become the stop string (and its space waits with it)
    for token in tokenizer("X and on", add_special_tokens=False)["input_ids"]:
        answer.add(token)
        sent += answer.delta()
    assert not answer.stopped
    assert sent + answer.delta(final=True) == answer.answer
    assert "STOP HERX" in answer.answer


def test_whitespace_before_a_held_back_stop_start_is_not_streamed(tokenizer, answer_text):
    """'Paris.\\n\\n###' may become 'Paris.\\n### ...': the newline before the held '\\n###' must
    wait too, or the stream ends with whitespace the answer does not have."""
    answer, deltas = feed(tokenizer, answer_text, "The capital of France is Paris.\n\n### Explanation: more", stops=("\n### ",))
    assert answer.stopped
    assert "".join(deltas) == answer.answer == "The capital of France is Paris."


def test_the_held_back_tail_is_the_longest_stop_prefix_the_text_ends_with(tokenizer):
    """Against the definition, tried every way: random texts and stops over a small alphabet (so
    that prefixes overlap and repeat), the stops' last characters included."""
    rng = random.Random(0)
    answer = AnswerText(tokenizer)
    for _ in range(20_000):
        stops = ["".join(rng.choice("ab#\n ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        answer.text, answer.stops = "".join(rng.choice("ab#\n ") for _ in range(rng.randint(0, 8))), stops
        expected = max(
            (size for stop in stops for size in range(1, len(stop)) if answer.text.endswith(stop[:size])), default=0
        )
        assert answer._held_back() == expected, (answer.text, stops)
