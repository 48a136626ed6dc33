"""Settings from the environment: a bad value is one line naming the variable, its value and what it
accepts; the worker stays up and answers every job with it; settings that do nothing are warned
about; logs carry the worker's lines at LOG_LEVEL without known third-party noise."""

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, job, post, wait_until_up

from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings, SettingsError

FRANCE = job("What is the capital of France?", max_new_tokens=8)


@pytest.fixture
def environ(monkeypatch):
    """Set environment variables for this test only."""

    def set_env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_env


def problems_for(environ, **variables) -> list[str]:
    environ(**variables)
    with pytest.raises(SettingsError) as caught:
        Settings()
    return caught.value.problems


@pytest.mark.parametrize(
    "variables, problem",
    [
        ({"DTYPE": "fp16"}, "DTYPE='fp16': use auto, float32, float16 or bfloat16"),
        ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY='0': use a whole number from 1 to 1024"),
        ({"LOAD_8BIT": "maybe"}, "LOAD_8BIT='maybe': use 1 or 0 (true/false, yes/no and on/off work too)"),
        ({"LOAD_8BIT": "1", "LOAD_4BIT": "1"}, "LOAD_4BIT='1': LOAD_8BIT and LOAD_4BIT are exclusive: set at most one"),
        ({"DEVICE": "gpu"}, "DEVICE='gpu': use auto, cpu, cuda or cuda:N"),
        ({"MAX_JOB_SECONDS": "-1"}, "MAX_JOB_SECONDS='-1': use a number of at least 0"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL='verbose': use DEBUG, INFO, WARNING or ERROR"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable_its_value_and_what_it_accepts(environ, variables, problem):
    assert problems_for(environ, **variables) == [problem]


def test_a_malformed_adapter_list_names_the_bad_entry(environ):
    (problem,) = problems_for(environ, LORA_ADAPTERS="good=/adapters/good,/path")
    assert problem.startswith("LORA_ADAPTERS='good=/adapters/good,/path': '/path' is not name=path_or_hub_id; use ")


def test_several_bad_settings_give_one_line_each(environ):
    problems = problems_for(environ, DTYPE="fp16", MAX_CONCURRENCY="0", LOAD_8BIT="maybe")
    assert [problem.split("=")[0] for problem in problems] == ["DTYPE", "LOAD_8BIT", "MAX_CONCURRENCY"]
    assert all("\n" not in problem for problem in problems)


TEXT_SETTINGS = {
    "base_model",
    "lora_weights",
    "hf_token",
    "model_cache_dir",
    "hf_home",
    "runpod_volume_dir",
    "adapter_dir",
}


@pytest.mark.parametrize("name", sorted(set(Settings.model_fields) - TEXT_SETTINGS))
def test_every_setting_that_can_be_wrong_says_what_it_accepts(environ, name):
    (problem,) = problems_for(environ, **{name.upper(): "nonsense!"})
    assert problem.startswith(f"{name.upper()}='nonsense!': ")
    assert " use " in problem and not problem.endswith("use text"), problem


@pytest.mark.parametrize("name", sorted(TEXT_SETTINGS))
def test_names_paths_and_secrets_take_any_text(environ, name):
    environ(**{name.upper(): "nonsense!"})
    Settings()


def test_a_secret_is_never_repeated_in_an_error():
    with pytest.raises(SettingsError) as caught:
        Settings(hf_token=12345678)
    assert str(caught.value) == "HF_TOKEN=(hidden): use text"


def test_log_level_takes_any_case(environ):
    environ(LOG_LEVEL="debug")
    assert Settings().log_level == "DEBUG"


def test_invalid_settings_give_a_worker_that_answers_every_job_with_them(environ, caplog):
    environ(DTYPE="fp16", MAX_CONCURRENCY="0")
    with caplog.at_level(logging.ERROR, logger="llm_worker.service"):
        worker = Worker.start()
    assert worker.engine is None
    expected = (
        "invalid configuration: DTYPE='fp16': use auto, float32, float16 or bfloat16; "
        "MAX_CONCURRENCY='0': use a whole number from 1 to 1024"
    )
    for _ in range(2):
        assert worker.complete(FRANCE) == {"error": expected}
    assert worker.complete({"list_adapters": True}) == {"error": expected}
    assert [record.getMessage() for record in caplog.records] == [
        "Invalid setting: DTYPE='fp16': use auto, float32, float16 or bfloat16",
        "Invalid setting: MAX_CONCURRENCY='0': use a whole number from 1 to 1024",
    ]


@pytest.mark.parametrize(
    "settings, warning",
    [
        ({"merge_lora": True}, "MERGE_LORA=1 does nothing without LORA_WEIGHTS"),
        ({"allow_hub_adapters": True}, "ALLOW_HUB_ADAPTERS=1 does nothing without LORA_ADAPTERS"),
        ({"trust_remote_code": True}, "TRUST_REMOTE_CODE=1 does nothing for the embedded default model"),
        ({"hf_token": "hf_x"}, "HF_TOKEN is set, but BASE_MODEL, LORA_WEIGHTS and LORA_ADAPTERS name nothing to fetch"),
    ],
)
def test_settings_that_do_nothing_are_named(settings, warning):
    (found,) = Settings(**settings).ineffective()
    assert found.startswith(warning)


def test_settings_that_act_are_not_warned_about():
    assert Settings().ineffective() == []
    assert Settings(merge_lora=True, lora_weights="/adapters/a", hf_token="hf_x").ineffective() == []
    assert Settings(base_model="org/model", trust_remote_code=True, hf_token="hf_x").ineffective() == []


# ---------------------------------------------------------------------------- the handler process


def handler_env(**variables) -> dict[str, str]:
    """This process's environment without RunPod's queue (so the SDK runs its local modes), plus ``variables``."""
    env = {key: value for key, value in os.environ.items() if key != "RUNPOD_WEBHOOK_GET_JOB"}
    return {**env, **variables}


def run_handler(event: dict, **variables) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": event})],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=handler_env(**variables),
        timeout=300,
    )


def test_handler_with_bad_settings_logs_one_line_each_and_answers_the_job():
    done = run_handler(FRANCE, DTYPE="fp16", LOAD_8BIT="maybe")
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert "ERROR llm_worker.service: Invalid setting: DTYPE='fp16': use auto, float32, float16 or bfloat16" in output
    assert "ERROR llm_worker.service: Invalid setting: LOAD_8BIT='maybe': use 1 or 0" in output
    # the SDK's test mode reports a job's error and exits 1; on RunPod the worker keeps serving
    assert "failed with error: invalid configuration: DTYPE='fp16'" in output


def test_the_local_api_server_with_bad_settings_stays_up_and_answers_every_job():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        cwd=ROOT,
        env=handler_env(MAX_CONCURRENCY="0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/docs", server)
        expected = [{"error": "invalid configuration: MAX_CONCURRENCY='0': use a whole number from 1 to 1024"}]
        for _ in range(2):
            assert post(f"http://127.0.0.1:{port}/runsync", {"input": FRANCE})["output"] == expected
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def untrained_adapter(base_model_dir, tmp_path_factory):
    """A LoRA adapter folder (untrained: loading it is what matters here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapters") / "untrained"
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def test_a_start_with_peft_and_bitsandbytes_logs_no_known_noise_but_warns_about_idle_settings(untrained_adapter):
    done = run_handler(FRANCE, LORA_WEIGHTS=str(untrained_adapter), ALLOW_HUB_ADAPTERS="1")
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "Loaded adapter untrained" in output and "'adapter': 'untrained'" in output  # peft did load
    assert "gemm_4bit_forward" not in output and "kernels-community" not in output
    assert "is_gradient_checkpointing" not in output
    assert "Loading weights" not in output  # no progress bars in a log
    assert output.count("WARNING llm_worker.service: ALLOW_HUB_ADAPTERS=1 does nothing without LORA_ADAPTERS") == 1
    assert "INFO llm_worker.service: Settings: LORA_WEIGHTS=" in output


NOISE_PROBE = """
import logging
import warnings

import llm_worker  # and nothing else set up, as in a notebook
import peft  # imports bitsandbytes, whose CPU backend warns when the optional `kernels` package is missing
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, vocab_size=8)
# wrapping a model reads its deprecated is_gradient_checkpointing
peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real problem")
warnings.warn("another deprecation", FutureWarning)
"""


def test_importing_the_core_filters_only_the_known_noise():
    done = subprocess.run([sys.executable, "-c", NOISE_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr and "is_gradient_checkpointing" not in done.stderr
    assert "a real problem" in done.stderr and "FutureWarning: another deprecation" in done.stderr


LOG_PROBE = """
import logging
from llm_worker.logs import configure_logging
configure_logging()
logging.getLogger("llm_worker.engine").debug("engine progress")
logging.getLogger("llm_worker.service").info("worker info")
logging.getLogger("urllib3.connectionpool").debug("library detail")
logging.getLogger("transformers.modeling_utils").warning("library warning")
"""


@pytest.mark.parametrize(
    "level, shown, hidden",
    [
        (None, ["INFO llm_worker.service: worker info", "WARNING transformers.modeling_utils: library warning"],
         ["engine progress", "library detail"]),
        ("debug", ["DEBUG llm_worker.engine: engine progress", "INFO llm_worker.service: worker info",
                   "WARNING transformers.modeling_utils: library warning"], ["library detail"]),
        ("WARNING", ["WARNING transformers.modeling_utils: library warning"], ["engine progress", "worker info"]),
    ],
)
def test_log_level_sets_the_workers_own_lines_and_keeps_libraries_at_info(level, shown, hidden):
    env = handler_env()
    env.pop("LOG_LEVEL", None)
    if level:
        env["LOG_LEVEL"] = level
    done = subprocess.run([sys.executable, "-c", LOG_PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in shown:
        assert line in done.stderr
    for text in hidden:
        assert text not in done.stderr


def test_the_servers_settings_hide_the_key_and_say_what_they_accept(environ):
    environ(API_KEY="sk-secret-value", SHUTDOWN_GRACE_SECONDS="12.5")
    config = ServerSettings()
    assert config.api_key.get_secret_value() == "sk-secret-value" and "sk-secret-value" not in repr(config)
    assert config.shutdown_grace_seconds == 12.5
    environ(SHUTDOWN_GRACE_SECONDS="soon")
    with pytest.raises(SettingsError) as caught:
        ServerSettings()
    assert str(caught.value) == "SHUTDOWN_GRACE_SECONDS='soon': use a number of at least 0"
    with pytest.raises(SettingsError) as caught:
        ServerSettings(api_key=12345678, shutdown_grace_seconds=1)
    assert str(caught.value) == "API_KEY=(hidden): use text"


def test_the_servers_front_settings_say_what_they_accept(environ):
    environ(CORS_ORIGINS="https://chat.example.com, http://localhost:5173", MAX_WAITING_REQUESTS="16")
    config = ServerSettings()
    assert config.cors_origin_list == ["https://chat.example.com", "http://localhost:5173"] and config.max_waiting_requests == 16
    assert ServerSettings.model_fields["shutdown_grace_seconds"].default < 10  # docker stop kills after 10 s
    for value, message in [
        ("chat.example.com", "CORS_ORIGINS='chat.example.com': 'chat.example.com' is not an origin"),
        ("https://chat.example.com/app", "is not an origin: use scheme://host[:port] (no path)"),
    ]:
        environ(CORS_ORIGINS=value)
        with pytest.raises(SettingsError) as caught:
            ServerSettings()
        assert message in str(caught.value)
    environ(CORS_ORIGINS="*", MAX_WAITING_REQUESTS="0")
    with pytest.raises(SettingsError) as caught:
        ServerSettings()
    assert str(caught.value) == "MAX_WAITING_REQUESTS='0': use a whole number of at least 1"
