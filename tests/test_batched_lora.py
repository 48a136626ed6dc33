"""Rows of different LoRA adapters through one batched product per layer (``LORA_BACKEND=triton``)
against PEFT's own loop over the adapters. On the CPU the Triton kernels run under its interpreter
(``conftest.py``), in float32."""

import copy
from dataclasses import replace

import pytest
import torch
from conftest import DEVICE
from test_conformance import (  # noqa: F401 (fixtures)
    ENGINE,
    adapter_manager,
    assert_conforms,
    llama_base,
    prompts,
    tokenizer,
    with_every_adapter,
)

from benchmarks.conformance import Case, check
from llm_worker.engine import Engine
from llm_worker.engine import batched_lora
from llm_worker.engine.adapter_rows import MIXED
from llm_worker.engine.batched_lora import BatchedLora, lora_delta_
from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for
from llm_worker.engine.runner import StepInputs, StepRunner

PLAIN = ["qv", "rslora", "mlp64"]  # the conformance suite's plain LoRA adapters (q/v, all linear with rsLoRA, rank 64)
MAX_NEW_TOKENS = 12


def test_the_batched_product_adds_each_rows_own_adapter():
    generator = torch.Generator().manual_seed(0)
    rows, width, inputs, outputs = 4, 3, 40, 70
    a = torch.zeros(2, 8, inputs)
    b = torch.zeros(2, outputs, 8)
    a[0, :4], b[0, :, :4] = torch.randn(4, inputs, generator=generator), torch.randn(outputs, 4, generator=generator)  # rank 4, padded
    a[1], b[1] = torch.randn(8, inputs, generator=generator), torch.randn(outputs, 8, generator=generator)
    scaling = torch.tensor([0.5, 2.0])
    slots = torch.tensor([1, -1, 0, 1])
    x = torch.randn(rows, width, inputs, generator=generator)
    base = torch.randn(rows, width, outputs, generator=generator)
    expected = base.clone()
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[row] += (x[row] @ a[slot].T) @ b[slot].T * scaling[slot]
    out = base.to(DEVICE)
    lora_delta_(out, x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), scaling.to(DEVICE), slots.to(DEVICE))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.cpu()[1], base[1])  # a base row: nothing added


@pytest.mark.parametrize("graph_shapes", [False, True], ids=["eager", "graph shapes"])
def test_plain_adapters_mixed_in_one_burst_answer_as_peft_generate_does(llama_base, tokenizer, prompts, monkeypatch, graph_shapes):  # noqa: F811
    """With ``graph shapes`` the decoding steps run in CUDA graphs' fixed shapes (eagerly here): a
    step of mixed adapters replays the one graph of its bucket, reading the rows' adapters from the
    batched product's buffer, padding rows none."""
    model, _, adapter_dir = llama_base
    calls = []
    product = batched_lora.lora_delta_
    monkeypatch.setattr(batched_lora, "lora_delta_", lambda *args: calls.append(args[-1].tolist()) or product(*args))
    reference = with_every_adapter(copy.deepcopy(model), adapter_dir, PLAIN)
    engine = Engine(
        copy.deepcopy(model), tokenizer, replace(ENGINE, lora_backend="triton", static_shapes=graph_shapes or None), dtype=torch.float32,
        adapters=adapter_manager(adapter_dir),
    )
    try:
        cases = [Case(ids, adapter) for ids in prompts[2:] for adapter in [None, *PLAIN]]  # a chunked prompt, a short one
        comparisons = check(engine, reference, cases, MAX_NEW_TOKENS)
        batched = engine.runner.batched_lora
        mixed = [index for index in engine.runner.graphs if index[0] == MIXED]
    finally:
        engine.close()
    assert_conforms(comparisons, tokenizer)
    assert isinstance(batched, BatchedLora) and sorted(batched.names) == sorted(PLAIN)
    # mixed steps went through it, base rows among them
    assert any(-1 in rows and any(slot >= 0 for slot in rows) for rows in calls), calls[:3]
    if graph_shapes:  # mixed decoding steps replayed graphs of their bucket, the index read in place
        assert mixed and batched.rows.data_ptr() == batched.buffer.data_ptr()
    else:
        assert not mixed


def test_a_captured_mixed_step_reads_each_rows_adapter_from_the_buffer_and_pads_with_none(llama_base):  # noqa: F811
    """Three rows of three adapters in graph shapes: the 4-row graph of the batched product, its
    padding row the base model's, and each row's logits those of the eager batched step."""
    model, _, adapter_dir = llama_base
    lengths, tables = [9, 20, 33], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    inputs = [torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    names = ["qv", None, "mlp64"]
    logits = {}
    for graph_shapes in (False, True):
        peft_model = with_every_adapter(copy.deepcopy(model), adapter_dir, PLAIN).to(DEVICE)  # one batched product per model
        pool = KVPool(KVShape.of(peft_model, torch.float32), 16, torch.device(DEVICE))
        runner = StepRunner(peft_model, pool, torch.device(DEVICE), 8, 4, cuda_graphs=False, static_shapes=graph_shapes, lora_kernel=True)
        with torch.inference_mode():
            for prompt, table, name in zip(inputs, tables, names):
                write = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
                runner.run(StepInputs([prompt], [list(range(len(prompt)))], write, [table[: blocks_for(len(prompt))]]), [name])
            step = StepInputs(
                [[5], [6], [7]], [[n] for n in lengths], [t[n // BLOCK_SIZE] * BLOCK_SIZE + n % BLOCK_SIZE for t, n in zip(tables, lengths)],
                [t[: blocks_for(n + 1)] for t, n in zip(tables, lengths)],
            )
            logits[graph_shapes] = runner.run(step, names).cpu()
        if graph_shapes:
            assert set(runner.graphs) == {(MIXED, 4, 4)}
            slots = runner.batched_lora.slot
            assert runner.batched_lora.rows.tolist() == [slots["qv"], -1, slots["mlp64"], -1]
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
