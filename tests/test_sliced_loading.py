"""Tensor parallel: each rank reads only its slices of the checkpoint (``model/sliced.py``), so a
model larger than one card loads, and no rank holds it whole: the slices equal the whole model
cut, a rank's peak memory is its shard's, MERGE_LORA merges into the slices, and a checkpoint
that cannot be read in slices is loaded whole, as the log says."""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm_worker.engine.ranks import Ranks
from llm_worker.model.loading import load_model
from llm_worker.model.quantization import QuantizationError
from llm_worker.model.sharding import Shape, Shard, shard_model
from llm_worker.model.sliced import checkpoint_files, empty_model, load_shard, readable
from llm_worker.parallel import TensorParallel, load
from llm_worker.settings import Settings


def built_model(folder: Path, tokenizer_dir: Path, dtype=torch.float32, shard_size: str = "50GB", **config) -> Path:
    """A LLaMA with random weights saved in ``folder`` (as ``dtype``, in files of ``shard_size``)
    with the embedded tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **{**shape, **config})
    model = LlamaForCausalLM(config)
    for name, parameter in model.named_parameters():
        if name.endswith(".bias"):  # made zero at init: random, for a cut to show
            parameter.data.normal_()
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    tokenizer.save_pretrained(folder)
    return folder


def cut_whole(folder: Path, rank: int, world: int, dtype=torch.float32):
    """The reference: the whole model loaded by transformers, then cut."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    shard_model(model, Shard(rank, world, Shape.of(model)))
    return model


def same_weights(ours, reference) -> list[str]:
    """Names whose tensors differ (or are missing on one side)."""
    mine, theirs = dict(ours.named_parameters()), dict(reference.named_parameters())
    if mine.keys() != theirs.keys():
        return sorted(mine.keys() ^ theirs.keys())
    return [name for name in mine if mine[name].shape != theirs[name].shape or not torch.equal(mine[name], theirs[name])]


def test_each_of_three_ranks_reads_the_embedded_model_s_slices_as_the_whole_model_cut(base_model_dir):
    for rank in range(3):
        model = load_shard(base_model_dir, rank, 3, torch.device("cpu"), torch.float32, trust_remote_code=False)
        shard_model(model, Shard(rank, 3, Shape.of(model)))
        assert same_weights(model, cut_whole(base_model_dir, rank, 3)) == []
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as transformers ties it
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (3 * 64, 576)


def test_biases_shared_kv_heads_and_a_checkpoint_in_several_files(tmp_path, base_model_dir):
    folder = built_model(tmp_path / "biased", base_model_dir, shard_size="300KB", attention_bias=True, mlp_bias=True)
    assert (folder / "model.safetensors.index.json").is_file() and len(set(checkpoint_files(folder).values())) > 1
    for rank in range(4):  # 2 KV heads over 4 ranks: each KV head read by two ranks
        model = load_shard(folder, rank, 4, torch.device("cpu"), torch.float32, trust_remote_code=False)
        shard_model(model, Shard(rank, 4, Shape.of(model)))
        assert same_weights(model, cut_whole(folder, rank, 4)) == []
        o_bias = model.model.layers[0].self_attn.o_proj.bias
        assert bool(o_bias.abs().sum() > 0) == (rank == 0)  # a rowwise bias is added once, by rank 0


PEAK = """
import sys, threading, time, torch
from llm_worker.model.loading import load_model
from llm_worker.model.sliced import empty_model
from llm_worker.settings import Settings

def anonymous():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))

folder, world = sys.argv[1], int(sys.argv[2])
empty_model(folder, torch.float32, False)  # the imports a load makes, before the measure
before, peak, done = anonymous(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.0005)
watch = threading.Thread(target=sample)
watch.start()
loaded = load_model(Settings(base_model=folder, dtype="float32"), None if world == 1 else (0, world))
done.set()
watch.join()
kept = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(max(peak[0], anonymous()) - before, kept)
"""


def test_a_rank_never_holds_the_whole_model_while_it_loads(tmp_path, base_model_dir):
    # stored in bf16 and served in fp32: every weight read is a new tensor of the rank's memory
    folder = built_model(
        tmp_path / "big", base_model_dir, dtype=torch.bfloat16, hidden_size=512, intermediate_size=8192, num_hidden_layers=8, tie_word_embeddings=True,
    )
    peaks = {}
    for world in (1, 4):  # 1: transformers' own whole load
        done = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(world)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[world], kept = (int(n) for n in done.stdout.split()[-2:])
    whole = sum(t.numel() * 4 for t in load_file(next(folder.glob("*.safetensors"))).values())
    assert peaks[1] > 0.9 * whole  # the measure sees a whole load
    # kept: the embeddings (a fifth of the whole, replicated) and a quarter of the rest
    assert kept < 0.45 * whole and peaks[4] < 0.55 * whole, (peaks, kept, whole)


def test_merge_lora_merges_into_each_rank_s_slices_as_into_the_whole_model_cut(pirate_adapter, base_model_dir):
    settings = Settings(dtype="float32", lora_weights=str(pirate_adapter), merge_lora=True, tensor_parallel_size=3)
    whole = load_model(settings.model_copy(update={"tensor_parallel_size": 1})).model
    for rank in range(3):
        parallel = TensorParallel(Ranks(rank, 3, torch.device("cpu"), 60.0), settings)
        threads = torch.get_num_threads()
        try:
            loaded, adapters = load(settings, parallel)
        finally:
            torch.set_num_threads(threads)
        assert loaded.merged_adapter == pirate_adapter.name and adapters.default is None
        assert not hasattr(loaded.model, "peft_config")
        reference = copy.deepcopy(whole)
        shard_model(reference, Shard(rank, 3, Shape.of(reference)))
        mine, theirs = dict(loaded.model.named_parameters()), dict(reference.named_parameters())
        assert mine.keys() == theirs.keys()
        assert all(torch.allclose(mine[n], theirs[n], atol=1e-6) for n in mine)
        hooked = [m for m in loaded.model.modules() if m._forward_hooks]
        assert len(hooked) == 2 * loaded.model.config.num_hidden_layers  # o_proj and down_proj, each reduced once


def test_a_checkpoint_that_cannot_be_read_in_slices_is_loaded_whole_and_the_log_says_why(tmp_path, base_model_dir, caplog):
    folder = built_model(tmp_path / "renamed", base_model_dir)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.wte"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert readable(empty_model(folder, torch.float32, False), checkpoint_files(folder)) == (
        "1 of its parameters are stored under other names (e.g. model.embed_tokens.weight)"
    )
    assert readable(empty_model(folder, torch.float32, False), {}) == "its weights are not in safetensors files"
    with caplog.at_level(logging.WARNING, logger="llm_worker.model.sliced"):
        assert load_shard(folder, 0, 2, torch.device("cpu"), torch.float32, trust_remote_code=False) is None
    assert "each rank loads the whole model before cutting its shard: 1 of its parameters" in caplog.text


def test_a_quantized_checkpoint_under_tensor_parallel_is_refused_naming_the_setting(tmp_path, base_model_dir):
    folder = built_model(tmp_path / "quantized", base_model_dir)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"TENSOR_PARALLEL_SIZE: .* is a quantized checkpoint \(bitsandbytes, int4 weights\); .*TENSOR_PARALLEL_SIZE=1"):
        load_model(Settings(base_model=str(folder), dtype="float32"), rank=(0, 2))
