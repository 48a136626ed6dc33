"""Logging for the worker: one line format, ``LOG_LEVEL`` for the worker's own loggers, and
filters for known third-party messages that an operator cannot act on.

``quiet_known_noise`` runs when ``llm_worker`` is imported, before peft or bitsandbytes are, so
the filters apply in the handler, notebooks and scripts alike. Each filter drops one known
message from one logger; everything else, warnings included, stays visible.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from llm_worker.settings import LOG_LEVELS

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_LOGGERS = ("llm_worker", "model_cache")
# One line per job, from every door: done (its counts), cancelled, failed, or refused (the reason,
# which names fields and limits). Never the job's text.
job_log = logging.getLogger("llm_worker.jobs")


def log_refused(job_id: str | None, reason: str) -> None:
    job_log.info("Job %s refused: %s", job_id or "-", reason)


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# bitsandbytes looks for an optional CPU kernel package (`kernels`, fetched from the Hub) on
# every import, and warns when it is missing: the 4-bit CPU path works without it.
NOISE = {
    "bitsandbytes.backends.cpu.ops": DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"),
}


def quiet_known_noise() -> None:
    """Install the filters for known noise (idempotent)."""
    for name, noise in NOISE.items():
        logging.getLogger(name).addFilter(noise)
    # peft reads the model's `is_gradient_checkpointing`, which transformers 5 deprecated, each time
    # it wraps a model. This is a warning, not a log record: filter that one message of that module.
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module="transformers.modeling_utils",
    )


def configure_logging(level: str | None = None, prefix: str = "") -> None:
    """Log one line per record with its level and logger. The worker's own loggers log at
    ``level`` (default: ``LOG_LEVEL``, INFO when unset), other libraries at INFO or above, so
    DEBUG shows the worker's details (a running job's progress) without every library's.

    ``LOG_LEVEL`` is read here rather than from ``Settings`` because logging has to be set up
    before the settings are read, to log their errors; an invalid value logs at INFO here and is
    reported by ``Worker.start`` like any other invalid setting. ``prefix`` starts every line (a
    tensor-parallel rank's ``[rank N]``)."""
    name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    worker_level = logging.getLevelName(name) if name in LOG_LEVELS else logging.INFO
    # force: importing runpod already configured the root logger, without levels or logger names
    logging.basicConfig(level=max(worker_level, logging.INFO), format=prefix + FORMAT, force=True)
    for logger in WORKER_LOGGERS:
        logging.getLogger(logger).setLevel(worker_level)
    quiet_known_noise()
    quiet_runpod_sdk()
    from transformers.utils import logging as transformers_logging

    # transformers logs through a handler of its own, in another format, and draws progress bars,
    # which a log collector shows as hundreds of partial lines: use ours, and no bars
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()


def quiet_runpod_sdk() -> None:
    """The RunPod SDK logs at DEBUG unless told otherwise, and at DEBUG it prints every job's
    output and every streamed chunk: users' text in the operator's logs. Unless the operator set
    ``RUNPOD_LOG_LEVEL`` (or the SDK's older ``RUNPOD_DEBUG_LEVEL``), it logs at INFO: a job's
    start and end, with its id. Only where the SDK is in use (the handler imports it first)."""
    if "runpod" not in sys.modules or "RUNPOD_LOG_LEVEL" in os.environ or "RUNPOD_DEBUG_LEVEL" in os.environ:
        return
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger.level = "INFO"  # what set_level("INFO") sets, without its own log line
