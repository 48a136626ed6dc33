"""The generation engine: requests in, events out, on one thread that owns the model.

``Engine`` (``loop.py``) ties the parts together; each part is a module of this package (see
``loop.py``'s docstring). Nothing here imports the worker, the OpenAI shapes or a door.
"""

from llm_worker.engine.loop import Engine
from llm_worker.engine.requests import (
    Completion,
    Delta,
    EngineConfig,
    EngineError,
    EngineStats,
    Event,
    Failed,
    GenerationRequest,
    RequestHandle,
    Sink,
    TokenLogprob,
)

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "Event",
    "Failed",
    "GenerationRequest",
    "RequestHandle",
    "Sink",
    "TokenLogprob",
]
