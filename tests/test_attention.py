"""Attention over the KV pool: the model's own mask rules, windows that bound reads, the model's
own kernels outside the pool, and models the pool cannot serve refused at start."""

import copy
import logging

import pytest
import torch
import transformers
from transformers import AutoTokenizer
from transformers.masking_utils import causal_mask_function, chunked_causal_mask_function, sliding_window_causal_mask_function

from llm_worker.engine.attention import PoolView, UnsupportedModel
from llm_worker.engine import Engine, EngineConfig, GenerationRequest
from llm_worker.engine.masks import LayerWindows, MaskRule
from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for
from llm_worker.engine.runner import forward_step, run_view
from llm_worker.schema import GenerationConfig

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def long(values):
    return torch.tensor(values, dtype=torch.long)


def scaled(model):
    """Random weights x4, so that greedy answers depend on the context."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


def rule(function) -> MaskRule:
    return MaskRule({"mask_function": function})


def test_a_layers_sliding_window_is_learned_from_the_models_own_mask_rule():
    assert rule(causal_mask_function).sliding_window(4096) is None
    assert rule(sliding_window_causal_mask_function(32)).sliding_window(4096) == 32
    assert rule(sliding_window_causal_mask_function(4096)).sliding_window(4096) is None  # as long as any sequence
    # chunks look like a window from one position only: read everything, the rule masks
    assert rule(chunked_causal_mask_function(16, torch.zeros(1, dtype=torch.long))).sliding_window(4096) is None


def test_a_rule_is_evaluated_at_each_rows_own_positions():
    positions = long([[40], [5]])
    keys = torch.arange(48)[None].expand(2, -1)
    visible = rule(sliding_window_causal_mask_function(8)).visible(positions, keys)[:, 0, 0]
    assert visible[0].nonzero().flatten().tolist() == list(range(33, 41))
    assert visible[1].nonzero().flatten().tolist() == list(range(0, 6))


def test_a_windowed_layer_reads_only_the_blocks_inside_its_window_and_gives_the_logits_of_a_plain_forward():
    torch.manual_seed(0)
    window = 24
    model = scaled(transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=window)))
    reference = copy.deepcopy(model)  # keeps transformers' own attention
    prompt = torch.randint(0, 256, (150,)).tolist()
    pool = KVPool(KVShape.of(model, torch.float32), 32, torch.device("cpu"))
    blocks = list(range(31, 0, -1))  # scattered, high to low
    windows = LayerWindows(30 * BLOCK_SIZE)

    def where(p):
        return blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE

    stepped, tokens = [], list(prompt)
    with torch.inference_mode():
        for start in range(0, len(prompt), 16):  # chunked prefill
            piece = prompt[start : start + 16]
            positions = list(range(start, start + len(piece)))
            logits = forward_step(
                model, pool, long([piece]), long([positions]), long([where(p) for p in positions]),
                long([blocks[: blocks_for(positions[-1] + 1)]]), windows=windows,
            )
        stepped.append(logits[0])
        for _ in range(12):
            tokens.append(int(stepped[-1].argmax()))
            p = len(tokens) - 1
            view = PoolView(pool, long([where(p)]), long([blocks[: blocks_for(p + 1)]]), long([[p]]), windows=windows)
            stepped.append(run_view(model, long([[tokens[-1]]]), view)[0])
        plain = reference(long([tokens])).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(torch.stack(stepped), plain[: len(stepped)], rtol=1e-4, atol=1e-4)
    assert windows.by_layer == {0: window, 1: window}
    # a decoding step at position ~160 holds 11 blocks, and reads the window's 2 (+1 for alignment) per layer
    assert view.blocks_read == {0: blocks_for(window) + 1, 1: blocks_for(window) + 1}
    assert view.buffers()[0].shape[0] == blocks_for(window) + 1  # every layer is windowed: no room for more
    assert blocks_for(len(tokens)) > blocks_for(window) + 1


def test_beam_search_on_a_soft_capped_windowed_model_equals_its_own_generate(tokenizer):
    """Beam search runs through ``generate`` outside the pool, with the pool's attention
    implementation set: it materialises the model's own masks for the model's own kernel."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        **{**TINY, "vocab_size": len(tokenizer)}, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=False
    )
    model = scaled(transformers.Gemma2ForCausalLM(config))
    reference = copy.deepcopy(model)
    prompt = tokenizer("Write a short story about a lighthouse keeper who finds a message in a bottle.").input_ids
    engine = Engine(model, tokenizer, EngineConfig(max_seq_len=256, kv_cache_tokens=1024, cuda_graphs=False))
    try:
        answer = engine.generate(GenerationRequest(prompt, GenerationConfig(num_beams=3, max_new_tokens=12, temperature=0)))
    finally:
        engine.close()
    expected = reference.generate(
        input_ids=long([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), num_beams=3,
        max_new_tokens=12, early_stopping=True, do_sample=False, eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id,
    )[0, len(prompt) :].tolist()
    assert answer.token_ids == expected[: len(answer.token_ids)] and len(answer.token_ids) > 0


def gemma3n_with_shared_kv():
    return transformers.Gemma3nForCausalLM(
        transformers.Gemma3nTextConfig(
            **{**TINY, "num_hidden_layers": 4}, vocab_size_per_layer_input=256, head_dim=16, num_kv_shared_layers=2,
            hidden_size_per_layer_input=16, laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
            layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=32,
        )
    )


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256)),
         "MambaForCausalLM has no attention layers"),
        (lambda: transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16)),
         "Qwen3NextForCausalLM has layers of kind linear_attention"),
        (gemma3n_with_shared_kv, r"Gemma3nForCausalLM: layer\(s\) \[2, 3\] did not read their keys and values through"),
    ],
    ids=["mamba", "qwen3-next", "gemma3n-shared-kv"],
)
def test_a_model_the_pool_cannot_serve_exactly_is_refused_at_start_naming_why(build, reason, tokenizer):
    with pytest.raises(UnsupportedModel, match=reason):
        Engine(build().eval(), tokenizer, EngineConfig(max_seq_len=64, kv_cache_tokens=256, cuda_graphs=False))


def test_the_start_log_names_the_attention_path_and_the_windows(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="llm_worker.engine.runner")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    engine = Engine(transformers.Gemma2ForCausalLM(config).eval(), tokenizer, EngineConfig(max_seq_len=256, kv_cache_tokens=512))
    engine.close()
    assert "Attention: Gemma2ForCausalLM's own eager attention over the KV pool (Gemma2ForCausalLM does not support SDPA); sliding windows: 32 tokens on layers [0]" in caplog.text

