"""RunPod serverless entry point: a thin shell around ``llm_worker.Worker``.

``python handler.py`` runs ``test_input.json``; ``--test_input '<json>'`` runs that event;
``--rp_serve_api`` starts the SDK's local API server. On RunPod it takes jobs from the queue,
up to ``MAX_CONCURRENCY`` at once.
"""

import atexit
import os
import sys

import runpod

from llm_worker.doors import jobs
from llm_worker.engine.memory import freeze_heap
from llm_worker.logs import configure_logging
from llm_worker.parallel import exit_when_a_rank_is_lost
from llm_worker.service import Worker, collect

configure_logging()  # LOG_LEVEL
worker = Worker.start()  # invalid settings or a failed load: a worker that answers every job with the reason
atexit.register(worker.close)  # stop the engine thread (and any tensor-parallel ranks) before the interpreter tears down
exit_when_a_rank_is_lost(worker)  # with TENSOR_PARALLEL_SIZE: a lost rank fails what is in flight, then the worker exits 1
freeze_heap()  # a full garbage collection of the loaded heap would stall every stream


async def handler(job):
    async for chunk in jobs.handle(worker, job.get("input"), job.get("id")):
        yield chunk


async def handler_collected(job):
    """The SDK's local test mode prints a generator instead of running it: fold the stream here."""
    return await collect(jobs.handle(worker, job.get("input"), job.get("id")))


def concurrency_modifier(current: int) -> int:
    """How many jobs RunPod may hand this worker at once: the engine batches them."""
    return worker.settings.max_concurrency


def local_test_mode() -> bool:
    """The SDK runs one local test job when given --test_input or when not on RunPod (no job queue)."""
    if "--rp_serve_api" in sys.argv:
        return False
    return "--test_input" in sys.argv or "RUNPOD_WEBHOOK_GET_JOB" not in os.environ


if __name__ == "__main__":
    runpod.serverless.start(
        {
            "handler": handler_collected if local_test_mode() else handler,
            "concurrency_modifier": concurrency_modifier,
            "return_aggregate_stream": True,
        }
    )
