"""The batched sampler: the same distributions as transformers' warpers, seeds that hold in any
batch, and a bad row that stays bad alone."""

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_worker.engine.sampler import BAD_ROW, BatchParams, SamplingParams, logits_to_probs, sample, sample_with_logprobs

VOCAB = 300
NO_EOS = torch.zeros(VOCAB, dtype=torch.bool)


def batch(*params: SamplingParams, seen=None) -> BatchParams:
    return BatchParams.build(params, seen, torch.device("cpu"))


def transformers_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


def test_top_k_and_top_p_match_transformers_warpers():
    torch.manual_seed(0)
    settings = [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.5, 20, 0.8), (2.0, 5, 0.3), (1.0, 1, 1.0)]
    logits = torch.randn(len(settings), VOCAB) * 3
    probs, order = logits_to_probs(
        logits,
        torch.tensor([s[0] for s in settings]),
        torch.tensor([s[1] for s in settings]),
        torch.tensor([s[2] for s in settings]),
    )
    ours = torch.zeros_like(probs).scatter(1, order, probs)
    ours = ours / ours.sum(dim=-1, keepdim=True)
    for row, (temperature, top_k, top_p) in enumerate(settings):
        expected = transformers_probs(logits[row : row + 1], temperature, top_k, top_p)[0]
        torch.testing.assert_close(ours[row], expected, rtol=1e-5, atol=1e-6)


def test_draws_follow_the_distribution():
    """Over many steps of one seed, token frequencies match the warped probabilities."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (VOCAB - 5)])
    params = batch(SamplingParams(sample=True, temperature=1.0, seed=11))
    draws = torch.stack([sample(logits, params, torch.tensor([step]), NO_EOS) for step in range(6000)])[:, 0]
    frequencies = torch.bincount(draws, minlength=VOCAB)[:5].float() / len(draws)
    expected = torch.softmax(logits[0], dim=-1)[:5]
    assert (frequencies - expected).abs().max() < 0.02, (frequencies, expected)


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    others = [SamplingParams(sample=True, temperature=1.5, seed=5), SamplingParams(), SamplingParams(sample=True, top_k=3, seed=9)]
    for mine in (SamplingParams(sample=True, temperature=0.9, top_p=0.95, seed=1234), SamplingParams(sample=True, seed=77)):
        for step in range(8):  # a plain row next to a truncating one, and the other way round
            alone = sample(logits[2:3], batch(mine), torch.tensor([step]), NO_EOS)
            together = sample(logits[[0, 1, 2, 3]], batch(others[0], others[1], mine, others[2]), torch.tensor([7, 0, step, 3]), NO_EOS)
            assert together[2] == alone[0]


def test_seeds_and_steps_change_the_draw():
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is the noise's choice
    draws = {int(sample(logits, batch(SamplingParams(sample=True, seed=s)), torch.tensor([0]), NO_EOS)) for s in range(20)}
    steps = {int(sample(logits, batch(SamplingParams(sample=True, seed=3)), torch.tensor([n]), NO_EOS)) for n in range(20)}
    assert len(draws) > 10 and len(steps) > 10


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    tokens = sample(logits, batch(SamplingParams(), SamplingParams(sample=True, seed=1), SamplingParams()), torch.zeros(3, dtype=torch.long), NO_EOS)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_non_finite_logits_mark_only_their_row():
    logits = torch.randn(3, VOCAB)
    logits[1, 7] = float("nan")
    tokens = sample(logits, batch(SamplingParams(), SamplingParams(), SamplingParams(sample=True, seed=2)), torch.zeros(3, dtype=torch.long), NO_EOS)
    assert tokens[1] == BAD_ROW
    assert tokens[0] == logits[0].argmax() and tokens[2] >= 0


def test_min_new_tokens_bans_end_of_sequence_until_reached():
    logits = torch.zeros(2, VOCAB)
    logits[:, 42] = 10.0
    eos = torch.zeros(VOCAB, dtype=torch.bool)
    eos[42] = True
    params = batch(SamplingParams(min_new_tokens=3), SamplingParams(min_new_tokens=3))
    tokens = sample(logits, params, torch.tensor([2, 3]), eos)
    assert tokens[0] != 42 and tokens[1] == 42


def test_repetition_penalty_applies_to_seen_tokens_and_records_new_ones():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 2.0, 1.5
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[5] = True
    params = batch(SamplingParams(repetition_penalty=2.0), seen=[seen])
    assert int(sample(logits, params, torch.tensor([0]), NO_EOS)) == 6  # 2.0 / 2 < 1.5
    assert params.seen[0, 6]
    assert int(sample(logits, params, torch.tensor([1]), NO_EOS)) == 5  # both seen now: 1.0 against 0.75


def test_logprobs_come_from_the_distribution_the_sampler_used():
    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB) * 2
    params = batch(SamplingParams(), SamplingParams(sample=True, temperature=0.7, top_k=10, seed=4), SamplingParams(repetition_penalty=1.8), seen=[torch.zeros(VOCAB, dtype=torch.bool)] * 3)
    tokens, chosen, top, top_ids = sample_with_logprobs(logits, params, torch.zeros(3, dtype=torch.long), NO_EOS, None, 5)
    assert tokens[0] == logits[0].argmax()
    assert chosen[0] == top[0, 0] and top_ids[0, 0] == tokens[0], "greedy: the chosen token is the most likely"
    full = torch.log_softmax(logits / torch.tensor([1.0, 0.7, 1.0])[:, None], dim=-1)
    torch.testing.assert_close(chosen[1], full[1, tokens[1]])  # temperature applied, top-k not
    assert torch.all(top[:, :-1] >= top[:, 1:])
    assert torch.allclose(full.exp().sum(dim=-1), torch.ones(3))


def test_vanishing_temperature_or_top_p_samples_the_top_token():
    torch.manual_seed(5)
    logits = torch.randn(3, VOCAB) * 4
    params = batch(
        SamplingParams(sample=True, temperature=1e-300, seed=1),
        SamplingParams(sample=True, top_p=1e-300, seed=2),
        SamplingParams(sample=True, top_k=1, seed=3),
    )
    for step in range(5):
        assert sample(logits, params, torch.full((3,), step), NO_EOS).tolist() == logits.argmax(dim=-1).tolist()


def test_min_p_matches_transformers_warper():
    from transformers.generation.logits_process import MinPLogitsWarper

    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 3
    for min_p in (0.05, 0.3, 0.9):
        probs, order = logits_to_probs(logits, torch.full((3,), 0.8), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.full((3,), min_p))
        ours = torch.zeros_like(probs).scatter(1, order, probs)
        ours = ours / ours.sum(-1, keepdim=True)
        theirs = torch.softmax(MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(0.8)(None, logits.clone())), dim=-1)
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_openai_penalties_count_generated_tokens_and_bias_shifts_logits():
    """OpenAI's definition: logit - count * frequency_penalty - (count > 0) * presence_penalty, on
    the tokens this row generated; logit_bias is added first."""
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 3.0
    logits[:, 8] = 2.5
    params = BatchParams.build(
        [SamplingParams(frequency_penalty=0.4, presence_penalty=0.3), SamplingParams(logit_bias=((9, 5.0),))],
        None, torch.device("cpu"), [torch.zeros(VOCAB), torch.zeros(VOCAB)], VOCAB,
    )
    steps = torch.zeros(2, dtype=torch.long)
    first = sample(logits, params, steps, NO_EOS).tolist()
    assert first == [7, 9] and params.counts[0, 7] == 1 and params.counts[1, 9] == 1
    # row 0 after one 7: 3.0 - 0.4 - 0.3 = 2.3 < 2.5, so 8 comes next; then 8 at 1.8 < 7 at 2.3
    assert sample(logits, params, steps + 1, NO_EOS).tolist()[0] == 8
    assert sample(logits, params, steps + 2, NO_EOS).tolist()[0] == 7 and params.counts[0, 7] == 2
