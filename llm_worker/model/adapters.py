"""Per-request LoRA adapters: finding them by name, checking them, loading them lazily (LRU).

Names come from four places: the folders of ``ADAPTER_DIR`` (one PEFT adapter folder per
name, looked up at each request), ``LORA_ADAPTERS`` (``name=path_or_hub_id,...``), ``LORA_WEIGHTS``
(the default adapter, named after its last path part) and, with ``ALLOW_RUNTIME_ADAPTERS=1``, the
server's ``/v1/load_lora_adapter`` (``add``; ``remove`` takes one away again). ``base`` always
means the plain base model. Each name has a revision, so that prompt blocks cached under one
adapter are never shared with another adapter loaded later under the same name.

Loading happens on the engine thread between steps (PEFT edits the model's layers, which must
not happen under a running forward); everything that can fail is checked first, from the adapter's
own files, so a refused adapter never touches the model.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_worker.schema import InputError
from llm_worker.settings import ADAPTER_NAME, BASE_ADAPTER_NAME as BASE, Settings, parse_adapter_list
from model_cache import ModelSourceError, plainly_local, resolve_adapter_source

log = logging.getLogger(__name__)

NAME_PATTERN = ADAPTER_NAME
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(RuntimeError):
    """An adapter could not be used; the message says which and why."""


class AdapterSlotsBusy(RuntimeError):
    """Every loaded adapter is in use by a running request: wait for one to finish."""


@dataclass(frozen=True)
class AdapterSource:
    name: str
    source: str  # a folder, or a Hub id
    origin: str  # ADAPTER_DIR | LORA_ADAPTERS | LORA_WEIGHTS | RUNTIME


class AdapterManager:
    def __init__(self, settings: Settings, default: str | None = None, merged: str | None = None) -> None:
        self.settings = settings
        self.default = default  # the LORA_WEIGHTS adapter's name, used when a request names none
        self.merged = merged  # with MERGE_LORA=1: the adapter merged into the weights
        self.configured = parse_adapter_list(settings.lora_adapters)
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.runtime: dict[str, AdapterSource] = {}  # added while serving (/v1/load_lora_adapter)
        self._revisions: dict[str, int] = {}
        self._retired: set[str] = set()  # loaded in the model, but removed: deleted once no request uses them
        self.generation = 0  # counts changes to the model's adapters (its forward changes with them)
        self._templates: dict[str, str | None] = {}  # chat templates adapters ship, by name and revision
        self.sharding = None  # under tensor parallel: checks an adapter can be split, and cuts it once loaded

    # ------------------------------------------------------------------ names
    def known(self) -> dict[str, AdapterSource]:
        found: dict[str, AdapterSource] = {}
        root = self.settings.adapter_dir
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if (
                    NAME_PATTERN.match(folder.name)
                    and self._inside_adapter_dir(folder)
                    and (folder / "adapter_config.json").is_file()
                ):
                    found[folder.name] = AdapterSource(folder.name, str(folder), "ADAPTER_DIR")
        for name, source in self.configured.items():
            found[name] = AdapterSource(name, source, "LORA_ADAPTERS")
        if self.settings.lora_weights and self.default:
            found[self.default] = AdapterSource(self.default, self.settings.lora_weights, "LORA_WEIGHTS")
        found.update(self.runtime)
        return found

    def revision(self, name: str | None) -> str:
        """The adapter's name and revision, as the prefix cache keys its blocks."""
        return "" if name is None else f"{name}#{self._revisions.get(name, 0)}"

    def add(self, name: str, source: str, model, tokenizer=None) -> Path:
        """Serve a new adapter under ``name`` (``ALLOW_RUNTIME_ADAPTERS``): a folder inside
        ``ADAPTER_DIR``, or a Hub id with ``ALLOW_HUB_ADAPTERS``; checked against ``model`` as a configured one is. It loads
        at its first request. Raises ``InputError`` for a bad or taken name, ``AdapterError`` for a
        bad adapter."""
        if not NAME_PATTERN.match(name) or name == BASE:
            raise InputError("lora_name: must be a name of 1-64 letters, digits, '.', '_' or '-', not base")
        if name in self.known() or name == self.merged:
            raise InputError(f"lora_name: an adapter named {name!r} is already served; unload it first, or choose another name")
        folder = self._runtime_source(source)
        check_compatible(model, folder, name, self.settings.max_lora_rank, tokenizer)
        with self._lock:  # a previous version still loaded is replaced at this one's first request
            self.runtime[name] = AdapterSource(name, str(folder), "RUNTIME")
            self._revisions[name] = self._revisions.get(name, 0) + 1
        log.info("Added adapter %s from %s (loads at its first request)", name, folder)
        return folder

    def _runtime_source(self, source: str) -> Path:
        """A folder inside ADAPTER_DIR (absolute, or relative to it; no symlink out of it), or a Hub
        id with ALLOW_HUB_ADAPTERS: a server's client must not make it read any folder it can name."""
        root = self.settings.adapter_dir.resolve()
        local = Path(source).expanduser()
        local = local if local.is_absolute() else self.settings.adapter_dir / local
        if local.exists() or plainly_local(source) or not self.settings.allow_hub_adapters:
            if not local.resolve().is_relative_to(root) or local.resolve() == root:
                raise AdapterError(f"lora_path: {source!r} is not a folder inside ADAPTER_DIR ({root}); copy the adapter there")
            if not (local / "adapter_config.json").is_file():
                raise AdapterError(f"lora_path: {source!r} has no adapter_config.json inside ADAPTER_DIR ({root})")
            return local.resolve()
        try:
            return resolve_adapter_source(source, self.settings, allow_hub=True)
        except ModelSourceError as err:
            raise AdapterError(f"lora_path: {err}") from None

    def chat_template(self, name: str) -> str | None:
        """The chat template an adapter's folder ships (``chat_template.jinja``, or
        ``tokenizer_config.json``'s), if any: the one it was trained with."""
        key = self.revision(name)
        if key not in self._templates:
            folder = self.locate(name)
            template = None
            if (folder / "chat_template.jinja").is_file():
                template = (folder / "chat_template.jinja").read_text()
            elif (folder / "tokenizer_config.json").is_file():
                try:
                    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
                except ValueError:
                    raise AdapterError(f"adapter {name!r}: unreadable tokenizer_config.json") from None
            self._templates[key] = template if isinstance(template, str) else None
        return self._templates[key]

    def remove(self, name: str) -> None:
        """Stop serving an adapter added with ``add``; its weights leave the model once no running
        request uses it (at the next adapter change on the engine thread)."""
        with self._lock:
            if name not in self.runtime:
                origin = self.known().get(name)
                reason = f"it comes from {origin.origin}, not from a load at run time" if origin else "no such adapter"
                raise InputError(f"lora_name: {name!r} cannot be unloaded: {reason}")
            del self.runtime[name]
            if name in self._loaded:
                self._retired.add(name)
        log.info("Removed adapter %s", name)

    def choose(self, requested: str | None) -> str | None:
        """The adapter a request runs with (None: the base model); refuses unknown or unsafe names."""
        if requested is None:
            return self.merged or self.default
        if self.merged:
            if requested != self.merged:
                raise InputError(
                    f"adapter: MERGE_LORA=1 merged {self.merged!r} into the base weights; this worker serves only it"
                )
            return self.merged
        if requested == BASE:
            return None
        if not NAME_PATTERN.match(requested):
            raise InputError(
                "adapter: must be a name of 1-64 letters, digits, '.', '_' or '-' (no paths), "
                f"one of: {self.describe_names()}"
            )
        if requested not in self.known():
            if (self.settings.adapter_dir / requested).exists() and not self._inside_adapter_dir(
                self.settings.adapter_dir / requested
            ):
                raise InputError(f"adapter: {requested!r} links outside ADAPTER_DIR; refused")
            raise InputError(f"adapter: unknown adapter {requested!r}; available: {self.describe_names()}")
        return requested

    def _inside_adapter_dir(self, folder: Path) -> bool:
        """Symlinks may not lead out of ADAPTER_DIR."""
        return folder.resolve().parent == self.settings.adapter_dir.resolve()

    def describe_names(self) -> str:
        return ", ".join([BASE, *self.known()])

    def listing(self) -> dict:
        with self._lock:
            loaded = list(self._loaded)
        return {
            "adapters": [
                {"name": source.name, "origin": source.origin, "loaded": source.name in loaded}
                for source in self.known().values()
            ],
            "loaded": loaded,
            "default": self.merged or self.default or BASE,
            "max_loaded_adapters": self.settings.max_loaded_adapters,
        }

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded and name not in self._retired

    # ------------------------------------------------------------------ loading (engine thread)
    def activate(self, model, name: str, in_use: set[str], tokenizer=None):
        """Make ``name`` loaded (evicting the least recently used idle adapter if needed) and
        return the model to run, which becomes a ``PeftModel`` with the first adapter. Removed
        adapters no request uses are deleted first; ``generation`` counts every change."""
        with self._lock:
            for retired in [n for n in self._retired if n not in in_use]:
                del self._loaded[retired]
                model.delete_adapter(retired)
                self._retired.discard(retired)
                self.generation += 1
                log.info("Unloaded adapter %s (removed)", retired)
            if name in self._retired:
                raise AdapterSlotsBusy(name)  # the new version waits for the old one's requests
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return model
        folder = self.locate(name)
        check_compatible(model, folder, name, self.settings.max_lora_rank, tokenizer)
        if self.sharding is not None:
            try:
                self.sharding.check_adapter(adapter_config(folder, name), name)
            except RuntimeError as err:
                raise AdapterError(str(err)) from None
        with self._lock:
            while len(self._loaded) >= self.settings.max_loaded_adapters:
                idle = next((loaded for loaded in self._loaded if loaded not in in_use), None)
                if idle is None:
                    raise AdapterSlotsBusy(name)
                del self._loaded[idle]
                model.delete_adapter(idle)
                self.generation += 1
                log.info("Unloaded adapter %s (least recently used)", idle)
        model = load_into(model, folder, name)
        if self.sharding is not None:
            self.sharding.adopt(model)
        with self._lock:
            self._loaded[name] = folder
            self.generation += 1
        log.info("Loaded adapter %s from %s", name, folder)
        return model

    def loaded_folders(self) -> list[tuple[str, str, str]]:
        """(name, folder, revision) of every adapter in the model now (the other tensor-parallel ranks follow them)."""
        with self._lock:
            return [(name, str(folder), self.revision(name)) for name, folder in self._loaded.items()]

    def locate(self, name: str) -> Path:
        """The adapter's local folder, kept inside ADAPTER_DIR for names found there."""
        source = self.known().get(name)
        if source is None:
            raise AdapterError(f"adapter {name!r} is no longer available")
        if source.origin == "ADAPTER_DIR":
            folder = Path(source.source)
            if not self._inside_adapter_dir(folder):
                raise AdapterError(f"adapter {name!r} links outside ADAPTER_DIR; refused")
            return folder.resolve()
        allow_hub = source.origin == "LORA_WEIGHTS" or self.settings.allow_hub_adapters
        try:
            return resolve_adapter_source(source.source, self.settings, allow_hub=allow_hub)
        except ModelSourceError as err:
            hint = "" if allow_hub else " (set ALLOW_HUB_ADAPTERS=1 to fetch adapters from the Hub)"
            raise AdapterError(f"adapter {name!r}: {err}{hint}") from None


def adapter_config(folder: Path, name: str) -> dict:
    path = folder / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"adapter {name!r}: unreadable adapter_config.json ({type(err).__name__})") from None


def adapter_weight_shapes(folder: Path, name: str) -> dict[str, tuple[int, ...]]:
    for file in WEIGHT_FILES:
        path = folder / file
        if not path.is_file():
            continue
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as weights:
                return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}

        return {key: tuple(value.shape) for key, value in torch.load(path, weights_only=True).items()}
    raise AdapterError(f"adapter {name!r}: no {' or '.join(WEIGHT_FILES)} in its folder")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "added_tokens.json", "vocab.json")


def check_compatible(model, folder: Path, name: str, max_rank: int, tokenizer=None) -> None:
    """Refuse, before PEFT touches the model, an adapter that is not LoRA, whose rank exceeds
    MAX_LORA_RANK, that changes the model's structure or activates by itself (layer replication,
    aLoRA), whose weights do not fit this base model's layers (another base model), or that was
    trained with tokens the base model's tokenizer lacks (resized embeddings, or a tokenizer saved
    with the adapter whose vocabulary differs): the worker encodes prompts with the base
    model's tokenizer, so such an adapter would be answered wrong."""
    config = adapter_config(folder, name)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: only LoRA adapters are served, this one is {config.get('peft_type')!r}")
    rank = int(config.get("r", 0))
    ranks = [rank, *map(int, (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {max(ranks)} exceeds MAX_LORA_RANK={max_rank}")
    for option, what in (("layer_replication", "layer replication (it adds layers)"), ("alora_invocation_tokens", "activated LoRA (aLoRA)")):
        if config.get(option):
            raise AdapterError(f"adapter {name!r}: {what} is not served; merge it into the base model and serve that as BASE_MODEL")
    base = model.base_model.model if hasattr(model, "peft_config") else model
    modules = dict(base.named_modules())
    if config.get("use_dora") and _int8_on_cpu(base):
        raise AdapterError(
            f"adapter {name!r}: DoRA over an 8-bit base model is not served on the CPU: PEFT's DoRA layer replaces the "
            "8-bit weight at every forward there and drops its scales, so its second forward fails. Serve it on a GPU, "
            "with LOAD_4BIT=1 or without quantization, or merged (MERGE_LORA=1)"
        )
    trained_for = config.get("base_model_name_or_path") or "an unnamed base model"
    for key, shape in adapter_weight_shapes(folder, name).items():
        path = key.removeprefix("base_model.model.")
        if ".lora_A." not in key and ".lora_B." not in key:
            _check_saved_module(modules, path, shape, name, trained_for)
            continue
        path = path.split(".lora_")[0]
        module = modules.get(path)
        if module is None or not hasattr(module, "in_features"):
            raise AdapterError(f"adapter {name!r} (trained for {trained_for}) targets {path}, which this base model lacks")
        expected_dim = module.in_features if ".lora_A." in key else module.out_features
        actual_dim = shape[1] if ".lora_A." in key else shape[0]
        if actual_dim != expected_dim:
            raise AdapterError(
                f"adapter {name!r} was trained for another base model ({trained_for}): {key} has shape "
                f"{list(shape)}, this model's {path} needs {expected_dim}"
            )
    if tokenizer is not None and any((folder / file).is_file() for file in TOKENIZER_FILES):
        _check_tokenizer(folder, name, tokenizer)


def _int8_on_cpu(model) -> bool:
    return any(type(module).__name__ == "Linear8bitLt" and module.weight.device.type == "cpu" for module in model.modules())


def _check_saved_module(modules: dict, path: str, shape: tuple[int, ...], name: str, trained_for: str) -> None:
    """A whole module saved with the adapter (``modules_to_save``) must have the base module's shape."""
    owner, _, parameter = path.rpartition(".")
    module = modules.get(owner)
    expected = getattr(module, parameter, None) if module is not None else None
    if not isinstance(expected, torch.Tensor) or tuple(expected.shape) == tuple(shape):
        return
    if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)) and expected.shape[1:] == tuple(shape[1:]):
        raise AdapterError(
            f"adapter {name!r} was trained with a resized vocabulary ({shape[0]} tokens in its {owner}; this base model "
            f"has {expected.shape[0]}): merge it into the base model and serve that, with its tokenizer, as BASE_MODEL"
        )
    raise AdapterError(
        f"adapter {name!r} was trained for another base model ({trained_for}): {path} has shape {list(shape)}, "
        f"this model's has {list(expected.shape)}"
    )


def _check_tokenizer(folder: Path, name: str, tokenizer) -> None:
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # a broken tokenizer file is the adapter's problem, named as such
        raise AdapterError(f"adapter {name!r}: its tokenizer files do not load ({type(err).__name__}: {err})") from None
    added = sorted(set(own.get_vocab()) - set(tokenizer.get_vocab()))
    if added:
        raise AdapterError(
            f"adapter {name!r} comes with a tokenizer that has {len(added)} token(s) the base model's tokenizer lacks "
            f"(e.g. {added[:3]}): merge it into the base model and serve that, with its tokenizer, as BASE_MODEL"
        )


def load_into(model, folder: Path, name: str):
    """Load a checked adapter; the first one wraps the model in a ``PeftModel``."""
    if hasattr(model, "peft_config"):
        model.load_adapter(str(folder), adapter_name=name)
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), adapter_name=name).eval()

