"""The generation engine: requests in, events out, on one thread that owns the model.

``Engine`` (``loop.py``) ties the parts together; each part is a module of this package (see
``loop.py``'s docstring). What goes in and comes out are the plain dataclasses of ``requests.py``.
Nothing here imports the worker, the OpenAI shapes or a door.
"""

from llm_worker.engine import requests
from llm_worker.engine.loop import Engine
from llm_worker.engine.requests import *  # noqa: F403 (the engine's public names, listed in requests.__all__)

__all__ = ["Engine", *requests.__all__]
