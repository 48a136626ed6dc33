"""The model side: settings into a loaded model (``loading``), adapters served per request
(``adapters``), prompt templates (``prompts``, ``templates/*.json``) and LoRA fine-tuning
(``finetune``). Light on purpose: ``python -m model_cache`` imports ``prompts`` through the
settings at image build time, before the heavy code is copied."""
