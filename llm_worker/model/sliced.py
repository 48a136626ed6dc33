"""Tensor parallel: each rank reads only its own slices of the checkpoint, so that a model larger
than one card (a 70B in bf16 over 2 or 4 GPUs) loads at all, and no rank ever holds it whole.

The model is built with its parameters on the meta device (no memory); then each parameter is
read from the safetensors files on its own. A layer that transformers' plan cuts (``sharding.py``)
is read as the rank's rows (colwise) or columns (rowwise), through safetensors' slices, which
read only those bytes; every other weight (embeddings, norms, the LM head) is read whole. Weights
go one at a time to the rank's device in the model's dtype: a rank's peak is its shard plus one
tensor. ``shard_model`` then finds each layer already cut and only regroups the attention heads.

Where the files cannot be read this way (no safetensors, names that transformers maps on load,
a quantized checkpoint's own formats), ``readable`` says why, and the rank loads the whole model
before cutting it, as the start log says.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from llm_worker.model.sharding import COLWISE, Shape, Shard, check_split, plan_of, planned_modules

log = logging.getLogger(__name__)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Each tensor's name -> the safetensors file holding it (one file, or an index of shards)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def empty_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The model built from its config with every parameter on the meta device (buffers, such as
    rotary frequencies, are real: they are computed, not read)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config._name_or_path = str(folder)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the one made from the config stays
        pass
    return model


def readable(model, files: dict[str, Path]) -> str | None:
    """Why this checkpoint cannot be read slice by slice into ``model``, or None when it can."""
    if not files:
        return "its weights are not in safetensors files"
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [name for name, _ in model.named_parameters() if name not in files and name not in tied]
    if missing:
        return f"{len(missing)} of its parameters are stored under other names (e.g. {missing[0]})"
    return None


def load_slices(model, files: dict[str, Path], shard: Shard, device: torch.device) -> int:
    """Read each parameter of ``model`` (on the meta device) from ``files``: this rank's slice of
    each planned layer, the rest whole; then tie the tied weights. Returns the bytes read."""
    check_split(shard.shape, shard.world)
    cuts: dict[str, tuple] = {}
    for name, module, style in planned_modules(model, plan_of(model)):
        cut = shard.cut(style, module.out_features, module.in_features)
        cuts[f"{name}.weight"] = cut
        if style == COLWISE and module.bias is not None:
            cuts[f"{name}.bias"] = cut[:1]
    handles: dict[Path, object] = {}
    read = 0
    try:
        for name, parameter in list(model.named_parameters()):
            if name not in files:  # tied to another (checked by ``readable``)
                continue
            path = files[name]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt", device="cpu")
            stored = handles[path].get_slice(name)
            tensor = stored[cuts[name]] if name in cuts else stored[:]
            tensor = tensor.to(device=device, dtype=parameter.dtype)  # the model's dtype (from_config's)
            read += tensor.numel() * tensor.element_size()
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner)._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=False)
    finally:
        handles.clear()
    model.tie_weights()
    left = [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensor parallel: {len(left)} parameters were not read from the checkpoint (e.g. {left[0]})")
    return read


def load_shard(folder: Path, rank: int, world: int, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """This rank's shard of the checkpoint in ``folder``, read slice by slice; None (the reason
    logged) where the files cannot be read that way."""
    model = empty_model(folder, dtype, trust_remote_code)
    files = checkpoint_files(folder)
    reason = readable(model, files)
    if reason is not None:
        log.warning("Tensor parallel: each rank loads the whole model before cutting its shard: %s", reason)
        return None
    shard = Shard(rank, world, Shape.of(model))
    read = load_slices(model, files, shard, device)
    log.info("Tensor parallel: rank %d read only its slices of the checkpoint, %.2f GiB", rank, read / 2**30)
    return model
