"""The throughput benchmark's CPU protocol: the seed's way alternating with the engine."""

import asyncio

from llm_worker.benchmark import SeedProcess, alpaca_workload, build_random_llama, run_alternating


def test_the_seed_and_the_engine_alternate_request_by_request_and_both_are_counted(started, base_model_dir, tmp_path):
    folder = build_random_llama("tiny", base_model_dir, tmp_path / "tiny", "cpu", "float32")
    worker = started(base_model=str(folder), dtype="float32")
    jobs = alpaca_workload(3, 5, fixed_length=True)
    seed = SeedProcess(folder)
    try:
        baseline, engine = asyncio.run(run_alternating(lambda job: worker.handle(job["input"]), seed, jobs, "engine"))
    finally:
        seed.close()
    assert (baseline.requests, baseline.tokens, len(baseline.latency)) == (3, 15, 3)
    assert (engine.requests, engine.tokens, len(engine.latency), len(engine.ttft)) == (3, 15, 3, 3)
    assert engine.label == "engine c=1" and baseline.label == "seed: sequential model.generate, float32"
    assert baseline.seconds == sum(baseline.latency) and engine.seconds > 0
