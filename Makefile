# Entry points: `make demo`, `make test` and `make lint`. Each creates .venv when missing and installs
# the pinned dependencies (the dev extra holds ruff and mypy); the stamp file makes the install step
# a no-op until pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moref-installed

.PHONY: demo test lint test-gpu setup browser clean

$(STAMP): pyproject.toml tools/cpu_env/moref_torchvision_cpu_shim.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly pinned, so pip takes the CPU wheel instead of the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) tools/cpu_env/install_shim.py
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moref-index tiny-models .cache/models
	$(VENV)/bin/moref-index run jobs/configs/demo.yaml --show 6

test: $(STAMP) browser
	$(PY) -m pytest -q tests --ignore=tests/gpu

# ruff (lint + import order) and mypy, both configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The report test renders the page in Debian's headless chromium; installed when missing (as root,
# as CI runs), else the test says what to install.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
	  echo "chromium/chromedriver missing: apt-get install chromium chromium-driver (tests/pipeline/test_report.py needs them)"

# CUDA tests (run on a GPU machine; see README "GPU tests").
test-gpu:
	$(PYTHON) -m pytest -q tests/gpu

clean:
	rm -rf $(VENV) .cache demo-output cluster-output
