"""The benchmarks' workloads: the Alpaca seed tasks (``../shared/data``) as jobs, a shared-prompt
workload for the prefix cache, and the JSON schema of the structured-output run."""

from __future__ import annotations

import json
from pathlib import Path


SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.jsonl"


def read_tasks(path: Path = SEED_TASKS) -> list[dict]:
    """The Alpaca seed tasks, one JSON object a line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alpaca_workload(
    count: int,
    max_new_tokens: int,
    path: Path = SEED_TASKS,
    adapters: list[str | None] | None = None,
    fixed_length: bool = False,
    json_schema: dict | None = None,
) -> list[dict]:
    """Job inputs from the Alpaca seed tasks (alpaca template, greedy), cycled to ``count``. With
    ``adapters``, request i asks for ``adapters[i % len(adapters)]``; with ``fixed_length``, every
    answer is exactly ``max_new_tokens`` long (``min_new_tokens``: random weights rarely end); with
    ``json_schema``, every other request answers in JSON that follows it."""
    tasks = read_tasks(path)
    jobs = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        generation = {"max_new_tokens": max_new_tokens}
        if fixed_length:
            generation["min_new_tokens"] = max_new_tokens
        job = {
            # the seed's way has no section stop: both sides answer until end-of-sequence
            "prompt_config": {"instruction": task["instruction"], "input": task["instances"][0]["input"], "stop_at_section": False},
            "generation_config": generation,
            "stream": True,
        }
        if adapters and adapters[i % len(adapters)] is not None:
            job["adapter"] = adapters[i % len(adapters)]
        if json_schema is not None and i % 2 == 0:
            generation["json_schema"] = json_schema
        jobs.append(job)
    return jobs


def shared_prompt_workload(count: int, max_new_tokens: int, system_tokens: int, tokenizer, path: Path = SEED_TASKS) -> list[dict]:
    """``count`` distinct short questions (Alpaca seed tasks) after one shared system prompt of
    about ``system_tokens`` tokens (the seed tasks' instructions, as house rules), greedy, streamed."""
    tasks = read_tasks(path)
    rules, tokens = [], 0
    for task in tasks:
        rules.append(f"- {task['instruction']}")
        tokens += len(tokenizer(rules[-1] + "\n", add_special_tokens=False)["input_ids"])
        if tokens >= system_tokens:
            break
    system = "You are the help desk of a large library. Follow these house rules:\n" + "\n".join(rules)
    return [
        {
            "prompt_config": {"instruction": f"{system}\n\nQuestion: {tasks[-1 - i % len(tasks)]['instruction']}", "stop_at_section": False},
            "generation_config": {"max_new_tokens": max_new_tokens},
            "stream": True,
        }
        for i in range(count)
    ]


# The structured-output run's schema: an answer with a few typed fields, as an application asks.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "category": {"enum": ["fact", "advice", "creative", "code", "other"]},
    },
    "required": ["answer", "confidence", "keywords", "category"],
}
