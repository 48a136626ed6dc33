"""Fine-tuning a LoRA adapter on Alpaca-format examples (instruction, input, output), as
Alpaca-LoRA's finetune.py does: the prompt comes from the same templates the worker serves with,
and only the response tokens (plus end-of-sequence) are learned.

Small enough for a CPU (the tests and the GSM8K notebook train in seconds to minutes); the same
function scales up on a GPU with more steps, a larger rank and a larger batch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_worker.model.prompts import render_prompt

log = logging.getLogger(__name__)


@dataclass
class LoraTraining:
    steps: int = 40
    batch_size: int = 4
    learning_rate: float = 2e-3
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    template: str = "alpaca"
    max_length: int = 256
    seed: int = 0
    losses: list[float] = field(default_factory=list)


def tokenize_example(tokenizer, example: dict, template: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + eos, and labels that ignore the prompt (-100)."""
    prompt = render_prompt(tokenizer, template, example["instruction"], example.get("input", ""))
    prompt_ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    answer_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id)
    labels = torch.full((len(batch), longest), -100)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, (ids, target) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_lora(
    base_model: str | Path,
    examples: Sequence[dict],
    output_dir: str | Path,
    training: LoraTraining | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> LoraTraining:
    """Train a LoRA adapter on ``examples`` and save it (PEFT format) into ``output_dir``.

    Returns the training settings with the loss of every step in ``losses``."""
    training = training or LoraTraining()
    torch.manual_seed(training.seed)
    rng = random.Random(training.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).to(device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=training.rank,
            lora_alpha=training.alpha,
            lora_dropout=training.dropout,
            target_modules=list(training.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    data = [tokenize_example(tokenizer, example, training.template, training.max_length) for example in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training.learning_rate)
    model.train()
    for step in range(training.steps):
        batch = {key: value.to(device) for key, value in collate(rng.sample(data, min(training.batch_size, len(data))), pad_id).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        training.losses.append(loss.item())
        if on_step:
            on_step(step, loss.item())
    model.save_pretrained(output_dir)
    log.info("Saved LoRA adapter to %s (final loss %.3f)", output_dir, training.losses[-1])
    return training


def read_examples(path: str | Path) -> list[dict]:
    """Alpaca-format examples (``instruction``, ``input``, ``output``) from a JSON list or JSON lines."""
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    missing = [i for i, row in enumerate(rows) if not isinstance(row, dict) or not {"instruction", "output"} <= row.keys()]
    if missing:
        raise SystemExit(f"{path}: example {missing[0]} is not an object with 'instruction' and 'output' (Alpaca format)")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m llm_worker.model.finetune --data FILE --out DIR``: a LoRA adapter for the worker's base
    model (``BASE_MODEL``, or the embedded default), saved where ``ADAPTER_DIR`` serves it."""
    import argparse
    import time

    from llm_worker.logs import configure_logging
    from llm_worker.settings import Settings
    from model_cache import resolve_base_model

    parser = argparse.ArgumentParser(prog="python -m llm_worker.model.finetune", description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Alpaca-format examples: a JSON list or JSON lines")
    parser.add_argument("--out", required=True, help="the adapter folder (e.g. model_cache/adapters/NAME)")
    parser.add_argument("--examples", type=int, default=None, help="use the first N examples (default: all)")
    defaults = LoraTraining()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--template", default=defaults.template, help="the prompt template the adapter will be served with")
    args = parser.parse_args(argv)
    configure_logging()
    examples = read_examples(args.data)[: args.examples]
    base = resolve_base_model(Settings())
    training = LoraTraining(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        rank=args.rank, alpha=2 * args.rank, template=args.template,
    )
    started = time.perf_counter()
    train_lora(base, examples, args.out, training)
    print(
        f"trained {args.steps} steps on {len(examples)} examples in {time.perf_counter() - started:.0f} s: "
        f"loss {training.losses[0]:.2f} -> {training.losses[-1]:.2f}; adapter saved to {args.out}"
    )


if __name__ == "__main__":
    main()
