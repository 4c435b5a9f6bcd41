# armdi developer entry points. `make up` and `make test` are the README's quick start.
VENV ?= .venv
PY := $(VENV)/bin/python
ARMDI := $(VENV)/bin/armdi
MODEL ?= efficientnet_lite0
NODES ?= 3
PYTEST_ARGS ?=

.PHONY: install up test fuzz lint typecheck check bench report zoo screenshot clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py appliance/wire/_codec.c
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat: the checkout itself on sys.path (a .pth line), so PYTHONPATH=<a worktree> runs
	# that worktree's code, as docs/benchmarks.md's old-code runs do; the C codec is built in place
	$(PY) -m pip install --quiet -e '.[builder,dev]' --config-settings editable_mode=compat
	touch $@

up: install
	$(ARMDI) up --model $(MODEL) --nodes $(NODES)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fuzzers of `make test` (10,000 inputs per decoder, 2,000 API requests), 20x longer.
FUZZ_SCALE ?= 20
fuzz: install
	ARMDI_HYPOTHESIS=explore ARMDI_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest -q -m fuzz -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck test

bench: install
	$(ARMDI) bench pipeline --json docs/results/pipeline.json

# docs/benchmarks.md from docs/benchmarks.template.md and the JSON in docs/results/.
report: install
	$(ARMDI) bench report --out docs/benchmarks.md

# Export nine torchvision families (random weights) and build each from its file; minutes.
zoo: install
	$(PY) benchmarks/zoo.py

# The README's picture of the status page under load (armdi up + Debian's chromium).
screenshot: install
	$(PY) tools/screenshot.py --out docs/status-page.png --model $(MODEL) --nodes $(NODES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
