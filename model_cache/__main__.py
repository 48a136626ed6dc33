"""Fill the model cache for the current settings: ``python -m model_cache``.

Run by ``make run`` before the first start and by the Dockerfile at build time, so that a worker
never converts or downloads at start-up.
"""

import logging

from llm_worker.settings import Settings
from model_cache import resolve_adapter_source, resolve_base_model


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    print(f"base model: {resolve_base_model(settings)}")
    if settings.lora_weights:
        print(f"LoRA weights: {resolve_adapter_source(settings.lora_weights, settings)}")


if __name__ == "__main__":
    main()
