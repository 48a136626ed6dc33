"""The worker's core: settings, job schema, prompts, model loading, adapters, engine, service."""

from llm_worker.logs import quiet_known_noise

quiet_known_noise()  # before peft or bitsandbytes are imported: their known noise is filtered from the start
