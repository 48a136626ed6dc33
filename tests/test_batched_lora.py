"""Rows of different LoRA adapters through one batched product per layer (``LORA_BACKEND=triton``)
against PEFT's own loop over the adapters. On the CPU the Triton kernels run under its interpreter
(``conftest.py``), in float32."""

import copy
from dataclasses import replace

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
from llm_worker.engine.batched_lora import BatchedLora, lora_delta_

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


def test_plain_adapters_mixed_in_one_burst_answer_as_peft_generate_does(llama_base, tokenizer, prompts, monkeypatch):  # noqa: F811
    model, _, adapter_dir = llama_base
    calls = []
    product = batched_lora.lora_delta_
    monkeypatch.setattr(batched_lora, "lora_delta_", lambda *args: calls.append(args[-1].tolist()) or product(*args))
    reference = with_every_adapter(copy.deepcopy(model), adapter_dir, PLAIN)
    engine = Engine(
        copy.deepcopy(model), tokenizer, replace(ENGINE, lora_backend="triton"), dtype=torch.float32, adapters=adapter_manager(adapter_dir)
    )
    try:
        cases = [Case(ids, adapter) for ids in prompts[2:] for adapter in [None, *PLAIN]]  # a chunked prompt, a short one
        comparisons = check(engine, reference, cases, MAX_NEW_TOKENS)
        batched = engine.runner.batched_lora
    finally:
        engine.close()
    assert_conforms(comparisons, tokenizer)
    assert isinstance(batched, BatchedLora) and sorted(batched.names) == sorted(PLAIN)
    # mixed steps went through it, base rows among them
    assert any(-1 in rows and any(slot >= 0 for slot in rows) for rows in calls), calls[:3]
