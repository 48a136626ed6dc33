"""Tensor parallel beyond the embedded model: small models built here over 2 and 4 ranks (4 ranks
for 2 KV heads: each KV head shared by two ranks), what is refused at start, and the faults of
ranks: one that fails to start, one killed while serving, SIGTERM. No process is left behind."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from conftest import ROOT, free_port, seed_tasks
from test_tensor_parallel import SMALL, greedy_tokens, no_rank_left, prompt_request

from llm_worker.service import Worker
from llm_worker.settings import Settings, SettingsError


def small_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer LLaMA with 8 heads and 2 KV heads, random weights, the embedded tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_two_and_four_ranks_of_a_model_with_fewer_kv_heads_than_ranks_answer_as_one(tmp_path, base_model_dir):
    folder = small_model(tmp_path / "small", base_model_dir)
    prompts = [task["instruction"] for task in seed_tasks(4, skip=150)]
    answers = {}
    for size in (1, 2, 4):
        worker = Worker.start(Settings(base_model=str(folder), tensor_parallel_size=size, **SMALL))
        try:
            assert worker.load_error is None, worker.load_error
            if size == 4:
                assert worker.parallel.shard.kv_heads == 1 and worker.parallel.shard.kv_replicas == 2
            answers[size] = greedy_tokens(worker, prompts, max_new_tokens=12)
            if size == 1:  # the reference: transformers' own greedy generate on the whole model
                model = worker.loaded.model
                ids = [prompt_request(worker, p, 12).prompt_ids for p in prompts]
                with torch.inference_mode():
                    expected = [model.generate(input_ids=torch.tensor([i]), max_new_tokens=12, do_sample=False)[0, len(i):].tolist() for i in ids]
                assert answers[1] == [e[: len(a)] for a, e in zip(answers[1], expected)]
        finally:
            worker.close()
    assert no_rank_left()
    assert answers[2] == answers[1] and answers[4] == answers[1]


def test_a_size_that_does_not_divide_the_heads_is_refused_at_start_naming_the_setting(base_model_dir):
    worker = Worker.start(Settings(tensor_parallel_size=2, **SMALL))
    assert "TENSOR_PARALLEL_SIZE=2 does not divide LlamaForCausalLM's 9 attention heads: use one of 1, 3, 9" in worker.load_error
    assert worker.engine is None and no_rank_left()


@pytest.mark.parametrize("setting", [{"load_4bit": True}, {"overlap_steps": "on"}, {"decode_compile": "inductor"}])
def test_settings_tensor_parallel_cannot_serve_yet_are_refused_by_name(setting):
    with pytest.raises(SettingsError) as refused:
        Settings(tensor_parallel_size=3, **setting)
    name = next(iter(setting)).upper()
    assert f"TENSOR_PARALLEL_SIZE=3: {name}=" in str(refused.value) and "not served with tensor parallel yet" in str(refused.value)


def test_a_rank_that_fails_to_start_fails_the_start_with_its_reason(tmp_path, monkeypatch, base_model_dir):
    """The other ranks run out of memory as they import torch (a virtual memory limit for them
    alone): the worker's start fails, naming the rank, and leaves no process."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nulimit -v 200000\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    worker = Worker.start(Settings(tensor_parallel_size=3, **SMALL))
    assert worker.engine is None
    assert "tensor-parallel rank" in worker.load_error and "ended at start with code 1" in worker.load_error
    assert no_rank_left()


# ---------------------------------------------------------------------- the server's process
def start_server(**env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_worker.doors.server", "--port", str(port)], cwd=ROOT,
        env={**os.environ, "TENSOR_PARALLEL_SIZE": "3", "DTYPE": "float32", "KV_CACHE_TOKENS": "4096", **env},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        time.sleep(0.5)


def server_ranks(process: subprocess.Popen) -> dict[int, psutil.Process]:
    ranks = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        command = child.cmdline()
        if "--rank" in command:
            ranks[int(command[command.index("--rank") + 1])] = child
    return ranks


def test_a_rank_killed_mid_request_fails_it_and_the_server_exits_non_zero_leaving_no_process():
    process, url = start_server()
    try:
        ranks = server_ranks(process)
        assert sorted(ranks) == [1, 2]
        body = {"model": "base", "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                "max_tokens": 400, "stream": True, "temperature": 0}
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                lines.append(line)
                if sum('"content"' in line for line in lines) == 2:  # mid-answer
                    ranks[2].kill()
        assert any('"error"' in line for line in lines), "the stream ends with an error, not as if it were done"
        assert process.wait(timeout=180) != 0
        for rank in ranks.values():
            assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_ends_the_server_and_every_rank():
    process, url = start_server()
    ranks = server_ranks(process)
    assert httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 4}, timeout=120).status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    psutil.wait_procs(list(ranks.values()), timeout=30)
    assert not [rank for rank in ranks.values() if rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE]


def test_the_benchmark_compares_three_ranks_with_one_device_and_ends_with_its_figures(capsys, monkeypatch, base_model_dir):
    from benchmarks import tensor_parallel

    monkeypatch.setenv("DTYPE", "float32")  # the benchmark's own default, whatever DTYPE the tests run with

    tensor_parallel.main(["--size", "3", "--concurrency", "2", "--requests", "2", "--max-new-tokens", "6"])
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["size"] == 3 and figures["tok_s_c2_tp1"] > 0 and figures["tok_s_c2_tp3"] > 0
    assert figures["ratio_c2"] == pytest.approx(figures["tok_s_c2_tp3"] / figures["tok_s_c2_tp1"], rel=0.02)  # tok/s rounded to 0.01
    assert figures["same_c2"] == figures["answers_c2"] == 2
    assert any("x one device's" in line for line in lines)
    assert no_rank_left()


def test_under_torchrun_the_handler_takes_the_ranks_it_is_given(base_model_dir):
    """``torchrun --nproc-per-node 3 handler.py``: rank 0 answers the event as one device does, the
    others follow it and exit with it."""
    job = {"prompt_config": {"instruction": seed_tasks(1, skip=160)[0]["instruction"]}, "generation_config": {"max_new_tokens": 12}}
    one = Worker.start(Settings(dtype="float32", kv_cache_tokens=2048))
    try:
        expected = one.complete(job)["output"]
    finally:
        one.close()
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_WEBHOOK_GET_JOB"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "3", "handler.py",
         "--test_input", json.dumps({"input": job})],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**env, "TENSOR_PARALLEL_SIZE": "3", "DTYPE": "float32", "KV_CACHE_TOKENS": "2048"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 3" in done.stderr and "rank 2 of 3" in done.stderr
    result = next(line for line in done.stdout.splitlines() if "Job result:" in line)
    assert repr(expected)[1:-1] in result
